"""minigpt tokenizers as Hugging Face tokenizer files and back: the same ids, or a refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import minigpt_tokenizers  # noqa: E402
from minigpt_cli.convert.hf_tokenizer import (  # noqa: E402
    PROBE,
    load_hf_tokenizer,
    save_hf_tokenizer,
)
from minigpt_cli.errors import ConvertError  # noqa: E402
from minigpt_tokenizers.tiktoken_bpe import (  # noqa: E402
    CL100K_PAT,
    O200K_PAT,
    TiktokenTokenizer,
)

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR") or Path(__file__).resolve().parents[3]
              / "shared")
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 9:41 -- we'll see, they're 100% "
    "sure!\n\nCafé, naïve, Ærøskøbing, São Paulo, Zürich; ¿qué? ¡sí! «ça va» "
    "Привет, как дела? Γειά σου κόσμε. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया।\n"
    "日本語のテキスト、中文文本，한국어 텍스트. Emoji: 🙂🚀👩‍💻🇯🇵 e\u0301\u0301 \u00a0nbsp\n"
    "    indented code:\tx = [1, 2, 3]  # comment\r\n\t\tdeeper()\n   \n\n"
    "numbers 1234567890 3.14159 -42 1e-9 0xFF   trailing spaces   \n"
    "literal specials: <|endoftext|> <unk> <|unk|> <|startoftext|> <0x41> </s> ▁▁\n   "
)
SMALL_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n"
              "Speak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to "
              "famish?\n") * 4 + "Ünïcode, 日本語 and 🙂 too: 12345.\n"


def shakespeare() -> str | None:
    return SHAKESPEARE.read_text(encoding="utf-8")[:20_000] if SHAKESPEARE.is_file() else None


def training_text() -> str:
    return shakespeare() or SMALL_TEXT * 40


def gpt2() -> TiktokenTokenizer:
    if not GPT2_RANKS.is_file():
        pytest.skip(f"{GPT2_RANKS} not available")
    return minigpt_tokenizers.create(f"tiktoken:{GPT2_RANKS}")


def cl100k_style(pattern: str = CL100K_PAT) -> TiktokenTokenizer:
    """GPT-2's ranks with cl100k's split pattern and special tokens at ids with a gap."""
    ranks = gpt2().enc._mergeable_ranks
    return TiktokenTokenizer.from_ranks("tiktoken:test-cl100k", "test-cl100k", ranks, pattern,
                                        {"<|endoftext|>": 50256, "<|fim_prefix|>": 50260})


def tiny_cl100k(tmp_path: Path) -> TiktokenTokenizer:
    """A hand-made ranks file (all bytes, then a few merges) read with the cl100k pattern."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b" the", b"in", b"ing",
                                                 b"12", b"123", b"\n\n", b"  "]
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    ranks = minigpt_tokenizers.create(f"tiktoken:{path}").enc._mergeable_ranks
    return TiktokenTokenizer.from_ranks("tiktoken:tiny", "tiny", ranks, CL100K_PAT)


def make(name: str, tmp_path: Path):
    if name == "byte":
        return minigpt_tokenizers.create("byte")
    if name == "char":
        return minigpt_tokenizers.create("char", lambda: [SMALL_TEXT])
    if name == "tiktoken-gpt2":
        return gpt2()
    if name == "tiktoken-cl100k":
        return cl100k_style()
    if name == "tiktoken-o200k":
        return cl100k_style(O200K_PAT)
    if name == "tiktoken-tiny-cl100k":
        return tiny_cl100k(tmp_path)
    kind = name.split("-")[1]
    size = 400 if shakespeare() else 310  # what the fallback text supports
    return minigpt_tokenizers.create(f"sentencepiece:{kind}:{size}", lambda: [training_text()])


def export(tok, folder: Path):
    save_hf_tokenizer(tok, folder, model_max_length=256)
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)``: (minigpt tokenizer, its exported folder, AutoTokenizer of it),
    made once per module."""
    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(name: str):
        if name not in cache:
            tok = make(name, root)
            cache[name] = (tok, root / name, export(tok, root / name))
        return cache[name]

    return get


def hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


NAMES = ["byte", "char", "tiktoken-gpt2", "tiktoken-cl100k", "tiktoken-o200k",
         "tiktoken-tiny-cl100k", "sentencepiece-unigram", "sentencepiece-bpe"]


@pytest.mark.parametrize("name", NAMES)
def test_exported_tokenizer_gives_minigpts_ids(name, exported):
    tok, folder, hf = exported(name)
    texts = [TEXT, PROBE, "", " ", "\n", "a", "  \n\t x  ", "🙂", shakespeare()]
    if name == "sentencepiece-unigram":  # see test_unigram_matches_spelled_control_pieces
        texts = [t.replace("<|endoftext|>", "").replace("<|unk|>", "").replace("<|startoft"
                 "ext|>", "").replace("<0x41>", "") for t in texts if t is not None]
    for text in texts:
        if text is None:
            continue
        ids = tok.encode(text)
        assert hf_ids(hf, text) == ids, text[:60]
        assert hf.decode(ids) == tok.decode(ids)
    eot_name = hf.convert_ids_to_tokens(tok.eot_id)
    assert hf.eos_token_id == hf.bos_token_id == tok.eot_id
    assert eot_name == ("<|endoftext|>" if not name.startswith("sentencepiece")
                        else tok.sp.id_to_piece(tok.eot_id))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 256 and config["split_special_tokens"] is True
    assert json.loads((folder / "special_tokens_map.json").read_text())[
        "eos_token"] == eot_name


@pytest.mark.parametrize("name", ["byte", "tiktoken-gpt2", "tiktoken-cl100k"])
def test_literal_end_of_text_is_plain_text_and_partial_bytes_decode_alike(name, exported):
    tok, _, hf = exported(name)
    text = "a<|endoftext|>b <|endoftext|>"
    assert hf_ids(hf, text) == tok.encode(text)
    assert tok.eot_id not in hf_ids(hf, text)
    ids = tok.encode("é🙂")
    for cut in (ids[:-1], ids[1:], ids[:1] + ids[2:]):  # cut UTF-8 sequences
        assert hf.decode(cut) == tok.decode(cut)


def test_char_unknown_characters_and_the_unk_name(exported):
    tok, _, hf = exported("char")
    text = "zebra ∑ 🙂 <unk> X"
    ids = tok.encode(text)
    assert tok.unk_id in ids and hf_ids(hf, text) == ids
    assert hf.decode(ids) == tok.decode(ids)  # unknown characters decode to U+FFFD
    assert hf.unk_token_id == tok.unk_id


def test_unigram_matches_spelled_control_pieces(exported):
    """The documented exception: tokenizers' Unigram matches text that spells a control or
    byte piece, which sentencepiece never does; everything around it is the same."""
    tok, _, hf = exported("sentencepiece-unigram")
    assert hf_ids(hf, "<|endoftext|>") == [tok.eot_id]
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    first = tok.encode("First ")
    assert hf_ids(hf, "First <|endoftext|> Citizen")[:len(first) + 1] == [*first, tok.eot_id]


def test_gpt2_vocab_and_merges_load_in_gpt2_tokenizer(exported):
    tok, folder, _ = exported("tiktoken-gpt2")
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 50001 and merges[1] == "Ġ t"
    slow = transformers.GPT2TokenizerFast(vocab=str(folder / "vocab.json"),
                                          merges=str(folder / "merges.txt"))
    text = TEXT.replace("<|endoftext|>", "") + (shakespeare() or "")
    assert slow.encode(text) == tok.encode(text)


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory, exported):
    """GPT-2 tokenizer folders as transformers writes them, from the shared ranks."""
    tok, folder, _ = exported("tiktoken-gpt2")
    root = tmp_path_factory.mktemp("gpt2")
    shutil.copytree(folder, root / "export")
    fast = transformers.GPT2TokenizerFast(vocab=str(root / "export" / "vocab.json"),
                                          merges=str(root / "export" / "merges.txt"))
    fast.save_pretrained(root / "saved")  # tokenizer.json with GPT-2's canonical merges
    (root / "files").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(root / "export" / name, root / "files" / name)
    return tok, root


@pytest.mark.parametrize("kind", ["export", "saved", "files"])
def test_load_gpt2_folders(kind, gpt2_folders, tmp_path):
    tok, root = gpt2_folders
    loaded = load_hf_tokenizer(root / kind)
    assert (loaded.spec, loaded.vocab_size, loaded.eot_id) == ("tiktoken:gpt2", 50257, 50256)
    if kind == "files":  # transformers needs a tokenizer_config.json to pick the class
        hf = transformers.GPT2TokenizerFast(vocab=str(root / kind / "vocab.json"),
                                            merges=str(root / kind / "merges.txt"))
    else:
        hf = transformers.AutoTokenizer.from_pretrained(root / kind)
    hf.split_special_tokens = True
    for text in (TEXT, shakespeare() or SMALL_TEXT):
        assert loaded.encode(text) == tok.encode(text) == hf_ids(hf, text)
    loaded.save(tmp_path / "run-tokenizer")  # what a run directory holds
    again = minigpt_tokenizers.load(tmp_path / "run-tokenizer")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.decode(tok.encode(TEXT)) == TEXT


@pytest.mark.parametrize("name", ["byte", "tiktoken-cl100k", "tiktoken-tiny-cl100k"])
def test_load_round_trips_other_byte_level_exports(name, exported):
    tok, folder, _ = exported(name)
    loaded = load_hf_tokenizer(folder)
    assert loaded.eot_id == tok.eot_id and loaded.vocab_size == tok.vocab_size
    for text in (TEXT, shakespeare() or SMALL_TEXT):
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))


def one_line_error(fn, *args, match: str) -> ConvertError:
    with pytest.raises(ConvertError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value) and info.value.hint
    return info.value


def test_unexportable_tokenizers_are_refused(tmp_path):
    class Other(minigpt_tokenizers.Tokenizer):
        name, spec, vocab_size, eot_id = "other", "other", 257, 256
        create = load = save_files = decode = classmethod(lambda cls, *a: None)

        def encode(self, text):
            return []

    err = one_line_error(save_hf_tokenizer, Other(), tmp_path / "a", 64, match="other")
    assert "byte, char, tiktoken" in err.hint
    assert not (tmp_path / "a").exists()


def test_sentencepiece_with_normalization_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    from minigpt_tokenizers.sentencepiece_model import SentencePieceTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SMALL_TEXT.splitlines() * 20),
                                   model_writer=model, vocab_size=50, hard_vocab_limit=False,
                                   minloglevel=2)
    tok = SentencePieceTokenizer("sentencepiece:default.model", model.getvalue())
    one_line_error(save_hf_tokenizer, tok, tmp_path / "a", 64, match="normalizes|dummy prefix")
    assert not (tmp_path / "a").exists()


def test_bad_folders_are_refused(tmp_path, gpt2_folders, exported):
    _, root = gpt2_folders
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    one_line_error(load_hf_tokenizer, tmp_path / "empty", match="no tokenizer files.*config.json")

    for name, match in (("char", "not a byte-level"), ("sentencepiece-unigram", "Unigram")):
        one_line_error(load_hf_tokenizer, exported(name)[1], match=match)

    swapped = tmp_path / "swapped"  # two ids exchanged: ids are no longer ranks
    shutil.copytree(root / "files", swapped)
    vocab = json.loads((swapped / "vocab.json").read_text())
    vocab["Ġthe"], vocab["Ġt"] = vocab["Ġt"], vocab["Ġthe"]
    (swapped / "vocab.json").write_text(json.dumps(vocab))
    one_line_error(load_hf_tokenizer, swapped, match="not BPE ranks")

    added = tmp_path / "added"  # a non-special added token
    shutil.copytree(root / "saved", added)
    data = json.loads((added / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 50257, "content": "<|user|>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": True,
                                 "special": False})
    (added / "tokenizer.json").write_text(json.dumps(data))
    one_line_error(load_hf_tokenizer, added, match="non-special added token")

    prefixed = tmp_path / "prefixed"  # add_prefix_space: tiktoken cannot do it
    shutil.copytree(root / "saved", prefixed)
    data = json.loads((prefixed / "tokenizer.json").read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    (prefixed / "tokenizer.json").write_text(json.dumps(data))
    one_line_error(load_hf_tokenizer, prefixed, match="prefix space")
