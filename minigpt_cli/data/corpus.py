"""The built-in ``stdlib-docs`` corpus: docstrings of the installed Python standard library.

It needs no network on any machine. The text is extracted with :mod:`ast` (no module is
imported) from module, class and function docstrings (nested ones included, in source
order), over the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted order of
their relative paths. Test suites (any folder named ``test``, ``tests`` or ``idle_test``),
``site-packages``/``dist-packages`` and files that do not parse are skipped. Each docstring
is passed through :func:`inspect.cleandoc` and followed by a blank line.

The text and an index of each module's byte range are cached in
``<cache_dir>/corpus/`` keyed by the stdlib path, the Python version and
:data:`EXTRACTOR_VERSION`; the index JSON is written last and marks the entry valid.

Split rule: a module belongs to the validation split when the first 32 bits of
``sha256(relative path)`` fall below ``val_fraction * 2**32``; everything else is training
text. The split is deterministic, does not depend on file order, and samples the whole
library rather than its alphabetical tail.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import sysconfig
import time
from pathlib import Path

from minigpt_cli.errors import DataError
from minigpt_cli.fileio import atomic_write

NAME = "stdlib-docs"
EXTRACTOR_VERSION = 1
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                       "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# (relative module path, start byte, end byte) in the cached text file
ModuleRange = tuple[str, int, int]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """The stdlib ``.py`` files that feed the corpus, sorted by relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel)
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def module_docstrings(tree: ast.AST) -> list[str]:
    """Cleaned, non-empty docstrings of a module and its classes/functions, in source order."""
    docs: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _DOC_NODES):
            raw = ast.get_docstring(node, clean=False)
            if raw:
                text = inspect.cleandoc(raw).replace("\x00", "")
                if text.strip():
                    docs.append(text)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child)

    visit(tree)
    return docs


def extract(root: Path) -> tuple[bytes, list[ModuleRange]]:
    """Parse every corpus file under ``root``; return the UTF-8 text and per-module ranges."""
    parts: list[bytes] = []
    index: list[ModuleRange] = []
    pos = 0
    for path in source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError):
            continue
        docs = module_docstrings(tree)
        if not docs:
            continue
        blob = "".join(d + "\n\n" for d in docs).encode("utf-8", errors="backslashreplace")
        parts.append(blob)
        index.append((path.relative_to(root).as_posix(), pos, pos + len(blob)))
        pos += len(blob)
    return b"".join(parts), index


def cache_key(root: Path) -> str:
    ident = f"{root.resolve()}\0{sys.version}\0{EXTRACTOR_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def load_or_extract(cache_dir: Path) -> tuple[Path, list[ModuleRange], dict]:
    """The cached corpus text file, its module index and its metadata; extract if needed."""
    root = stdlib_dir()
    folder = cache_dir / "corpus"
    stem = f"{NAME}-{cache_key(root)}"
    text_path, meta_path = folder / f"{stem}.txt", folder / f"{stem}.json"
    meta = _read_meta(meta_path, text_path)
    if meta is None:
        if not root.is_dir():
            raise DataError(f"the Python standard library was not found at {root}",
                            "use a local text file or folder as data.dataset instead")
        t0 = time.perf_counter()
        text, index = extract(root)
        if not text:
            raise DataError(f"no docstrings found in the Python standard library at {root}",
                            "use a local text file or folder as data.dataset instead")
        meta = {"version": EXTRACTOR_VERSION, "stdlib": str(root), "python": sys.version,
                "bytes": len(text), "modules": [list(m) for m in index],
                "seconds": round(time.perf_counter() - t0, 3)}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(text_path, text)
            atomic_write(meta_path, json.dumps(meta).encode())
        except OSError as e:
            raise DataError(f"cannot write the {NAME} corpus cache in {folder}: "
                            f"{e.strerror or e}",
                            "set MINIGPT_CACHE_DIR to a writable folder") from e
    index = [(str(m[0]), int(m[1]), int(m[2])) for m in meta["modules"]]
    return text_path, index, meta


def split_ranges(index: list[ModuleRange],
                 val_fraction: float) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the train and val splits (adjacent modules merged)."""
    threshold = val_fraction * 2**32
    chosen = {"train": [], "val": []}
    for rel, start, end in index:
        bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
        chosen["val" if bucket < threshold else "train"].append((start, end))
    # keep both splits non-empty on tiny libraries or extreme fractions
    if not chosen["val"] and len(chosen["train"]) > 1:
        chosen["val"].append(chosen["train"].pop())
    if not chosen["train"] and len(chosen["val"]) > 1:
        chosen["train"].append(chosen["val"].pop(0))
    merged: dict[str, list[tuple[int, int]]] = {}
    for split, ranges in chosen.items():
        out: list[tuple[int, int]] = []
        for start, end in ranges:
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        merged[split] = out
    return merged


def _read_meta(meta_path: Path, text_path: Path) -> dict | None:
    try:
        meta = json.loads(meta_path.read_text())
        if (meta.get("version") == EXTRACTOR_VERSION
                and text_path.stat().st_size == meta["bytes"]):
            return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


