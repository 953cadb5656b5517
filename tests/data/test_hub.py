"""Hugging Face datasets as sources (no network: load_dataset is monkeypatched)."""

from __future__ import annotations

import os

import pytest

from minigpt_cli.data.resolve import DataError, resolve_source
from minigpt_cli.data.token_cache import token_cache


def test_hf_offline_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):  # what datasets 2.x-5.x raises with no network
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub "
                              "(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext-2", "wikitext-103", "hf:someone/corpus:cfg"):
        with pytest.raises(DataError, match="cannot download") as e:
            resolve_source(name)
        assert "\n" not in e.value.message
        assert "stdlib-docs" in e.value.hint and "local text file" in e.value.hint


def test_hf_offline_mode_is_set_for_the_call_only(monkeypatch):
    """With no route to the Hub, load_dataset runs in offline mode (its local cache answers
    at once); the mode is put back afterwards and the environment is left alone."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    from minigpt_cli.data import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)
    seen = []

    def load_dataset(path, config=None):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a\n"] * 9})})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    resolve_source("hf:someone/corpus")
    assert seen == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)  # online: left as it is
    resolve_source("hf:someone/corpus")
    assert seen[-1] == (False, False)


def test_hf_not_found_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from datasets.exceptions import DatasetNotFoundError

    def missing(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="not found"):
        resolve_source("hf:nobody/nothing")


def test_hf_source_with_fake_dataset(monkeypatch, tmp_path, byte_tok, joined):
    datasets = pytest.importorskip("datasets")
    docs = [f"document {i} has words\nand a second line" for i in range(50)]
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"id": list(range(50)), "body": docs}),
        "test": datasets.Dataset.from_dict({"id": [1], "body": ["the test doc"]}),
    })
    seen = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, config=None: seen.append((path, config)) or fake)
    src = resolve_source("hf:me/docs:small", 0.1)
    assert seen == [("me/docs", "small")]
    assert src.splits() == ["train", "val", "test"]
    assert src.describe()["text_column"] == "body"
    assert joined(src, "train") == "".join(d + "\n" for d in docs[:45])
    assert joined(src, "val") == "".join(d + "\n" for d in docs[45:])
    assert src.size_hint("val") == len(joined(src, "val").encode())
    assert src.fingerprint("train") != src.fingerprint("val")
    arr = token_cache(src, "val", byte_tok, tmp_path)
    assert arr.num_lines == 10 and arr.num_bytes == len(joined(src, "val").encode())

    wiki = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": ["", " = T = \n", "", " a b \n"]})
        for split in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None: wiki)
    src = resolve_source("wikitext-2")
    assert src.splits() == ["train", "val", "test"]
    assert joined(src, "val") == "\n = T = \n\n a b \n"

    numbers = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None: numbers)
    with pytest.raises(DataError, match="no text column"):
        resolve_source("hf:me/numbers")


def test_hf_messages_column_is_chat_data(monkeypatch):
    """A dataset with a ``messages`` column (smol-smoltalk's shape) reads as conversations:
    its own test split kept, the last 10% of train as validation; a bad row names itself."""
    datasets = pytest.importorskip("datasets")
    from minigpt_cli.data import hub
    from minigpt_cli.data.chat import ChatSource

    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = {"train": [conv] * 20, "test": [conv] * 2}
    monkeypatch.setattr(hub, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None: datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"messages": v, "source": ["x"] * len(v)})
         for k, v in rows.items()}))
    source = resolve_source("hf:HuggingFaceTB/smol-smoltalk")
    assert isinstance(source, ChatSource) and source.splits() == ["train", "val", "test"]
    assert len(source.conversations("train")) == 18 and source.conversations("val")[0] == conv
    assert not isinstance(resolve_source("hf:someone/chats", fmt="text"), ChatSource)
    rows["train"] = [conv] * 3 + [[{"role": "user", "content": "no reply"}]]
    with pytest.raises(DataError, match="train row 3: no assistant turn"):
        resolve_source("hf:someone/chats")
