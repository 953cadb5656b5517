"""Many texts encoded in one tiktoken call, joined with a marker, give each text's own ids."""

from __future__ import annotations

from minigpt_tokenizers.markers import MARKERS, JoinedBatch, absent_marker


def test_a_batch_encodes_as_its_texts_do(toy, random_texts):
    texts = random_texts(400, seed=3) + ["", "  ", "a  ", "\n\n", "<|endoftext|>", "x\n  "]
    want = [toy.enc.encode_ordinary(t) for t in texts]
    assert [ids.tolist() for ids in JoinedBatch(toy.enc).encode(texts)] == want
    assert toy.encode_batch(texts) == want


def test_texts_holding_the_markers(toy):
    texts = ["a" + MARKERS[0], MARKERS[1] + " b", "c  "]
    assert [ids.tolist() for ids in JoinedBatch(toy.enc).encode(texts)] == \
        [toy.enc.encode_ordinary(t) for t in texts]
    every = ["".join(MARKERS) + " x", "y  "]  # no marker left: the usual way
    assert JoinedBatch(toy.enc).encode(every) is None
    assert toy.encode_batch(every) == [toy.enc.encode_ordinary(t) for t in every]
    assert absent_marker("".join(MARKERS)) is None
    assert absent_marker("a" + MARKERS[0]) == MARKERS[1]
