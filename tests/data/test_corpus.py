"""The stdlib-docs corpus: the docstrings of the standard library, cached."""

from __future__ import annotations

from minigpt_cli.data import corpus
from minigpt_cli.data.resolve import resolve_source


def test_stdlib_docs_corpus(corpus_cache, joined):
    src = resolve_source("stdlib-docs", cache_dir=corpus_cache)
    assert src.name == "stdlib-docs" and src.splits() == ["train", "val"]
    train, val = joined(src, "train"), joined(src, "val")
    assert len(train) > 500_000 and len(val) > 20_000
    assert len(val) < len(train) / 3
    assert "\n\n" in train and "\x00" not in train
    # deterministic: a second resolve (from the cache) gives identical text
    again = resolve_source("stdlib-docs", cache_dir=corpus_cache)
    assert again.fingerprint("train") == src.fingerprint("train")
    assert again.fingerprint("val") == src.fingerprint("val")
    assert list((corpus_cache / "corpus").glob("stdlib-docs-*.json"))


def test_stdlib_docs_skips_tests_and_uses_ast():
    sources = corpus.source_files(corpus.stdlib_dir())
    rels = [f.relative_to(corpus.stdlib_dir()).parts for f in sources]
    assert rels and not any({"test", "tests", "idle_test", "site-packages"} & set(p[:-1])
                            for p in rels)
    assert [f.as_posix() for f in sources] == sorted(f.as_posix() for f in sources)
    import ast
    tree = ast.parse('"""Mod."""\nclass A:\n    """  Cls.\n      more"""\n'
                     '    def f(self):\n        """Fn."""\nif 1:\n    def g():\n        "G."\n')
    assert corpus.module_docstrings(tree) == ["Mod.", "Cls.\nmore", "Fn.", "G."]
