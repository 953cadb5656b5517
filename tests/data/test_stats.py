"""Data statistics: documents and lines, length histograms, sampling a large split."""

from __future__ import annotations

import numpy as np

from minigpt_cli.data import stats as datastats


def test_split_units_across_chunks():
    chunks = ["a b\n", "\n  \nc\nd", "\n\ne\n"]
    assert list(datastats.split_units(chunks, "document")) == ["a b", "c\nd", "e\n"]
    assert list(datastats.split_units(chunks, "line")) == ["a b", "c", "d", "e"]


def test_a_unit_longer_than_a_piece_is_one_unit_of_its_whole_length(write_corpus, byte_tok,
                                                                    monkeypatch):
    from minigpt_cli.data import files
    from minigpt_cli.data.resolve import resolve_source

    monkeypatch.setattr(datastats, "MAX_UNIT_CHARS", 10)
    monkeypatch.setattr(files, "CHUNK_BYTES", 4)  # the text comes a line at a time
    long = "x" * 25 + "\n" + "y" * 14  # one document of 40 characters, two lines
    text = "\n\n".join(["short", long, "tail"] * 10) + "\n"
    source = resolve_source(str(write_corpus(text)), 0.5)
    for unit, lengths in (("document", [5, 40, 4]), ("line", [5, 25, 14, 4])):
        measured = datastats.measure_lengths(source, "train", byte_tok, unit)
        assert list(measured.tokens[:len(lengths)]) == lengths
        assert measured.count == len(measured.tokens) == 5 * len(lengths)
    stats = datastats.split_stats(source, "train", byte_tok, "line")
    assert stats.documents == 15 and stats.lengths.count == 20


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
