"""Data statistics: documents and lines, length histograms, sampling a large split."""

from __future__ import annotations

import numpy as np

from minigpt_cli.data import stats as datastats


def test_split_units_across_chunks():
    chunks = ["a b\n", "\n  \nc\nd", "\n\ne\n"]
    assert list(datastats.split_units(chunks, "document")) == ["a b", "c\nd", "e\n"]
    assert list(datastats.split_units(chunks, "line")) == ["a b", "c", "d", "e"]


def test_lengths_histogram_bins_are_powers_of_two():
    lengths = datastats.Lengths("document", np.array([1, 2, 3, 4, 9, 9, 31, 32]), count=8,
                                measured_bytes=0)
    assert lengths.histogram() == [(1, 1, 1), (2, 3, 2), (4, 7, 1), (8, 15, 2), (16, 31, 1),
                                   (32, 63, 1)]
    assert lengths.to_dict()["median"] == 6.5
    gap = datastats.Lengths("line", np.array([5, 40]), count=2, measured_bytes=0)
    assert gap.histogram() == [(4, 7, 1), (8, 15, 0), (16, 31, 0), (32, 63, 1)]


def test_lengths_of_a_large_split_are_sampled_but_every_document_is_counted(write_corpus, byte_tok):
    from minigpt_cli.data.resolve import resolve_source

    text = "\n\n".join(f"document {i}:\n" + "words and more words " * (i % 5 + 1)
                       for i in range(60)) + "\n"
    source = resolve_source(str(write_corpus(text)))
    tok = byte_tok
    full = datastats.measure_lengths(source, "train", tok, "document")
    part = datastats.measure_lengths(source, "train", tok, "document", limit_bytes=200)
    assert not full.sampled and part.sampled and part.count == full.count
    assert 200 <= part.measured_bytes < full.measured_bytes
    assert list(part.tokens) == list(full.tokens[:len(part.tokens)])
