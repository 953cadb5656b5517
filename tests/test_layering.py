"""The layering, read from the source: every import of every module (inside functions
too), and the messages that core code raises.

- Only ``minigpt_cli.cli`` renders: nothing else imports typer, rich or prompt_toolkit,
  and nothing else imports ``minigpt_cli.cli``.
- No import cycle between modules.
- Core errors name settings (``temperature``), never command-line flags (``--temperature``):
  the CLI says which flag sets a setting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"minigpt_cli": REPO / "minigpt_cli",
         "minigpt_tokenizers": REPO / "tokenizers" / "minigpt_tokenizers"}
UI_PACKAGES = ("typer", "rich", "prompt_toolkit", "click")
CLI = "minigpt_cli.cli"
ENTRY_POINTS = {"minigpt_cli.__main__"}  # `python -m minigpt_cli` runs the CLI


def module_files() -> dict[str, Path]:
    out = {}
    for top, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([top, *parts])] = path
    return out


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function; ``from P import x``
    counts as an import of ``P.x`` when that is a module, else of ``P``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def core_modules() -> list[str]:
    return [m for m in MODULES if not is_under(m, CLI) and m not in ENTRY_POINTS]


def test_the_tree_is_read():
    assert len(MODULES) > 40
    assert {"minigpt_cli.model.gpt", "minigpt_cli.cli.app", "minigpt_tokenizers"} <= set(MODULES)


@pytest.mark.parametrize("module", core_modules())
def test_core_modules_never_render(module):
    bad = sorted(i for i in GRAPH[module]
                 if any(is_under(i, ui) for ui in UI_PACKAGES) or is_under(i, CLI))
    assert not bad, f"{module} imports {bad}: only {CLI} may render"


def test_no_import_cycles():
    local = {m: {i for i in deps if i in MODULES and i != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(local[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(local):
        if m not in state:
            visit(m)


def raised_strings(path: Path) -> list[tuple[int, str]]:
    """The string pieces of every ``raise``'s arguments."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append((sub.lineno, sub.value))
    return out


@pytest.mark.parametrize("module", core_modules())
def test_core_errors_name_settings_not_flags(module):
    flags = [(line, text) for line, text in raised_strings(MODULES[module])
             if " --" in f" {text}" and "minigpt " not in text]  # a whole command is fine
    assert not flags, f"{module}: errors that name flags: {flags}"
