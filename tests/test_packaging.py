"""The installed layout: console script, presets in the wheel, no `tokenizers` shadowing."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_import_tokenizers_never_resolves_into_the_repository(tmp_path):
    code = ("import importlib.util as u; s = u.find_spec('tokenizers'); "
            "print(s.origin if s and s.origin else '')")
    origin = run("-c", code, cwd=tmp_path).stdout.strip()
    assert not origin or REPO not in Path(origin).resolve().parents
    import minigpt_tokenizers
    assert minigpt_tokenizers.__name__ == "minigpt_tokenizers"


def test_the_folder_refuses_to_be_imported_as_tokenizers():
    # From the checkout's root the folder is on sys.path; it must not pose as Hugging Face's.
    result = run("-c", "import tokenizers", cwd=REPO)
    spec_origin = run("-c", "import importlib.util as u; print(u.find_spec('tokenizers').origin)",
                      cwd=REPO).stdout.strip()
    if Path(spec_origin).resolve().parent == REPO / "tokenizers":
        assert result.returncode != 0
        assert "minigpt_tokenizers" in result.stderr


def test_builtin_tokenizers_register_through_entry_points():
    import minigpt_tokenizers
    assert {"byte", "char", "tiktoken", "sentencepiece"} <= set(minigpt_tokenizers.available())


def test_python_m_and_version():
    result = run("-m", "minigpt_cli", "--version", cwd=REPO)
    assert result.returncode == 0, result.stderr
    from minigpt_cli import __version__
    assert result.stdout.strip() == f"minigpt {__version__}"


def test_wheel_holds_presets_and_minigpt_tokenizers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                             str(tmp_path), str(REPO)], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("no package index reachable to fetch the build backend")
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("minigpt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "minigpt_presets/tiny.yaml" in names
    assert "minigpt_presets/small.yaml" in names
    assert "minigpt_presets/gpt2.yaml" in names
    assert "minigpt_tokenizers/__init__.py" in names
    assert "minigpt_cli/cli.py" in names
    assert not any(n.startswith("tokenizers/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[minigpt.tokenizers]" in text and "minigpt = minigpt_cli.cli:main" in text


def test_startup_does_not_import_the_compiler():
    """torch._dynamo takes about a second to import: only --compile may pay for it."""
    code = ("import sys, minigpt_cli.cli, minigpt_cli.training; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
