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


@pytest.fixture
def records_cache(monkeypatch, tmp_path):
    """``datasets`` keeps what it reads from local files under the test's folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


TEXTS = [f"Document {i}: {'word ' * (i % 7)}end." for i in range(40)]


def test_a_jsonl_json_or_parquet_file_of_records_is_read_by_its_text_column(records_cache,
                                                                              joined):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = records_cache
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                            for i, t in enumerate(TEXTS)))
    (folder / "b.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    pq.write_table(pa.table({"n": list(range(40)), "text": TEXTS}), folder / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        src = resolve_source(str(folder / name), 0.1)
        assert src.describe()["text_column"] == "text"
        assert joined(src, "train") == "".join(t + "\n" for t in TEXTS[:36])
        assert joined(src, "val") == "".join(t + "\n" for t in TEXTS[36:])
    # raw JSON when asked for text
    raw = resolve_source(str(folder / "a.jsonl"), 0.1, "text")
    assert joined(raw, "train").startswith('{"id": 0, "text": "Document 0: end."}\n')


def test_a_records_file_changed_in_place_gets_a_new_fingerprint(records_cache):
    import json

    path = records_cache / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    before = resolve_source(str(path), 0.1).fingerprint("train")
    path.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in TEXTS))
    os.utime(path, ns=(1, 1))
    assert resolve_source(str(path), 0.1).fingerprint("train") != before


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "fine"}\n{broken\n', r"a\.jsonl:3: not JSON"),
    ('{"text": "ok"}\n[1, 2]\n', r"a\.jsonl:2: not a JSON object"),
    ('{"text": "ok"}\n{"text": 5}\n', r"'text' column does not hold strings"),
    ('{"n": 1}\n{"n": 2}\n', r"has no text column .*its columns are n"),
])
def test_a_bad_records_file_is_one_line_naming_it(records_cache, content, message):
    path = records_cache / "a.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        resolve_source(str(path), 0.1)
    assert "\n" not in e.value.message


def test_a_jsonl_of_conversations_stays_chat_data(records_cache):
    import json

    from minigpt_cli.data.chat import ChatSource

    path = records_cache / "chats.jsonl"
    line = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    path.write_text((json.dumps(line) + "\n") * 20)
    assert isinstance(resolve_source(str(path), 0.1), ChatSource)
