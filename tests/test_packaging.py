"""The installed layout: console script, every package in the wheel, no `tokenizers`
shadowing, a fast start-up."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_import_tokenizers_from_the_root_finds_hugging_faces_package():
    """The top-level tokenizers/ folder has no __init__.py: run from the checkout's root,
    `import tokenizers` still finds the installed Hugging Face package."""
    pytest.importorskip("tokenizers", reason="Hugging Face's tokenizers is not installed")
    assert not (REPO / "tokenizers" / "__init__.py").exists()
    result = run("-c", "import tokenizers; print(tokenizers.__file__, tokenizers.Tokenizer)",
                 cwd=REPO)
    assert result.returncode == 0, result.stderr
    origin = Path(result.stdout.split()[0]).resolve()
    assert REPO / "tokenizers" not in [origin, *origin.parents]
    assert "site-packages" in origin.parts or "dist-packages" in origin.parts
    import minigpt_tokenizers
    assert REPO / "tokenizers" / "minigpt_tokenizers" in Path(minigpt_tokenizers.__file__).parents


def test_builtin_tokenizers_register_through_entry_points():
    import minigpt_tokenizers
    assert {"byte", "char", "tiktoken", "sentencepiece"} <= set(minigpt_tokenizers.available())


def test_python_m_and_version():
    result = run("-m", "minigpt_cli", "--version", cwd=REPO)
    assert result.returncode == 0, result.stderr
    from minigpt_cli import __version__
    assert result.stdout.strip() == f"minigpt {__version__}"


def test_wheel_holds_every_module_presets_and_minigpt_tokenizers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                             str(tmp_path), str(REPO)], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("no package index reachable to fetch the build backend")
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("minigpt-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "minigpt_cli").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    plugins = {f"minigpt_tokenizers/{p.name}"
               for p in (REPO / "tokenizers" / "minigpt_tokenizers").glob("*.py")}
    assert "minigpt_tokenizers/__init__.py" in plugins and plugins <= names
    presets = {f"minigpt_presets/{p.name}" for p in (REPO / "presets").glob("*.yaml")}
    assert "minigpt_presets/tiny.yaml" in presets and presets <= names
    assert not any(n.startswith("tokenizers/") for n in names)
    page = {f"minigpt_cli/serve/static/{p.name}"
            for p in (REPO / "minigpt_cli" / "serve" / "static").iterdir()}
    assert "minigpt_cli/serve/static/index.html" in page and page <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[minigpt.tokenizers]" in text and "minigpt = minigpt_cli.cli.app:main" in text


def test_startup_imports_no_heavy_package():
    """`minigpt --help` loads the commands, not the core: torch, numpy, datasets,
    tiktoken, sentencepiece and safetensors are imported by the command that runs."""
    heavy = ["torch", "numpy", "datasets", "tiktoken", "sentencepiece", "safetensors",
             "prompt_toolkit", "matplotlib"]
    code = (f"import sys, minigpt_cli.cli.app; print(sorted(set({heavy!r}) & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_training_setup_does_not_import_the_compiler():
    """torch._dynamo takes about a second to import: only --compile may pay for it."""
    code = "import sys, minigpt_cli.train.setup; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
