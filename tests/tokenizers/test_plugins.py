"""The built-in tokenizer plugins and the registry, against real corpora from ../shared."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minigpt_tokenizers as mt
from minigpt_tokenizers import TokenizerError

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "line one\nline two\n\n\nline five\n",
    "col1\tcol2\t\tcol4\r\nnext",
    "emoji 😀🎉👍🏽 and a flag 🇫🇷",
    "中文测试，日本語のテキスト，한국어",
    " <unk> a\n\n b",
    " = Robert <unk> = \n \n The <unk> of 1999 @-@ style , 3 @.@ 5 km",
    "   leading and trailing   ",
    "<|endoftext|> inside the text is just text",
    "",
]
LONG_LINE = "longline " * 4000  # far beyond sentencepiece's max_sentence_length
KINDS = ["byte", "char", "tiktoken", "sp-unigram", "sp-bpe"]


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared test data not found: {path} (set MINIGPT_SHARED_DIR)")
    return path


@pytest.fixture(scope="module")
def gpt2_file() -> Path:
    return shared("tokenizers/gpt2.tiktoken")


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return shared("data/tinyshakespeare/input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def wikitext() -> str:
    return shared("data/wikitext-2/valid.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def training_text(shakespeare, wikitext):
    """About 200 KB, in chunks, like the data layer provides; includes the samples."""
    return lambda: iter([wikitext[:120_000], shakespeare[:80_000], LONG_LINE, "\n".join(SAMPLES)])


@pytest.fixture(scope="module")
def specs(gpt2_file) -> dict[str, str]:
    return {"byte": "byte", "char": "char", "tiktoken": f"tiktoken:{gpt2_file}",
            "sp-unigram": "sentencepiece:unigram:800", "sp-bpe": "sentencepiece:bpe:800"}


@pytest.fixture(scope="module")
def made(specs, training_text) -> dict:
    """Every built-in, created once through the registry."""
    return {kind: mt.create(spec, training_text) for kind, spec in specs.items()}


@pytest.fixture(params=KINDS)
def tok(request, made):
    return made[request.param]


def expected(tok, text: str) -> str:
    """What a round trip should give: exact, except characters a char vocabulary never saw."""
    if tok.name != "char":
        return text
    vocab = set(tok.chars)
    return "".join(c if c in vocab else "\ufffd" for c in text)


# ---- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_corpora(tok, shakespeare, wikitext):
    for text in (shakespeare[600_000:640_000], wikitext[-40_000:], LONG_LINE):
        assert tok.decode(tok.encode(text)) == expected(tok, text)


def test_special_token_text_is_plain_text(tok):
    assert tok.eot_id not in tok.encode("a<|endoftext|>b</s><s><unk>")
    assert 0 <= tok.eot_id < tok.vocab_size


def test_decode_never_raises_on_bad_ids(tok):
    out = tok.decode([tok.vocab_size + 7, -1, tok.eot_id, *tok.encode("ok")])
    assert out.endswith("ok") and "\ufffd" in out
    assert tok.decode_bytes([tok.vocab_size]) == "\ufffd".encode()


def test_lone_surrogate_does_not_raise(tok):
    assert tok.decode(tok.encode("a\ud800b")).startswith("a")


# ---- decode_bytes and batches --------------------------------------------------------------

def test_decode_bytes_streams_like_decode(tok, shakespeare):
    for text in [*SAMPLES, shakespeare[:3000]]:
        ids = tok.encode(text)
        pieces = [tok.decode_bytes([i]) for i in ids]
        assert b"".join(pieces) == tok.decode(ids).encode("utf-8")
        stream = codecs.getincrementaldecoder("utf-8")()  # what a streaming printer does
        assert "".join(stream.decode(p) for p in pieces) + stream.decode(b"", final=True) \
            == tok.decode(ids)


def test_encode_batch_matches_encode(tok, wikitext):
    texts = [wikitext[:5000], "", SAMPLES[3], wikitext[5000:9000], "a <|endoftext|> b"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    arrays = tok.encode_arrays(texts)
    assert all(a.dtype.kind in "iu" for a in arrays)
    assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]


# ---- save / load / fingerprint ---------------------------------------------------------

def test_save_load_identical(tok, tmp_path, shakespeare):
    tok.save(tmp_path)
    meta = json.loads((tmp_path / mt.META_FILE).read_text())
    assert meta["name"] == tok.name and meta["spec"] == tok.spec
    back = mt.load(tmp_path)
    assert type(back) is type(tok)
    assert (back.spec, back.vocab_size, back.eot_id) == (tok.spec, tok.vocab_size, tok.eot_id)
    text = "\n".join(SAMPLES) + shakespeare[:20_000]
    assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert back.fingerprint() == tok.fingerprint() == tok.fingerprint()


def test_special_tokens_are_added_saved_and_never_made_from_text(specs, training_text,
                                                               tmp_path):
    """Every built-in takes a chat template's tokens: new ids after its own, rendered as
    their text, restored by load; typing them gives the ids of the text."""
    for kind, spec in specs.items():
        tok = mt.create(spec, training_text)
        own, fingerprint = tok.vocab_size, tok.fingerprint()
        ids = tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        assert ids == [own, own + 1] and tok.vocab_size == own + 2
        assert tok.add_special_tokens(["<|im_end|>"]) == [own + 1]  # already there
        assert not set(ids) & set(tok.encode("<|im_start|>user<|im_end|>"))
        assert tok.decode([*tok.encode("Hi"), ids[1]]) == "Hi<|im_end|>"
        assert tok.decode_bytes([ids[0]]) == b"<|im_start|>"
        assert tok.fingerprint() != fingerprint
        tok.save(tmp_path / kind)
        back = mt.load(tmp_path / kind)
        assert back.added_tokens == tok.added_tokens and back.vocab_size == own + 2
        assert back.encode("<|im_end|> ok") == tok.encode("<|im_end|> ok")


def test_fingerprints_differ(made):
    assert len({t.fingerprint() for t in made.values()}) == len(made)


@pytest.mark.parametrize("kind", ["tiktoken", "sp-bpe"])
def test_load_needs_only_the_run_directory(kind, made, tmp_path):
    """A tokenizer made from a file keeps working after that file is gone."""
    src = tmp_path / "src"
    made[kind].save(src)
    name = "gpt2.tiktoken" if kind == "tiktoken" else "my.model"
    original = tmp_path / name
    shutil.copy(src / ("ranks.tiktoken" if kind == "tiktoken" else "tokenizer.model"), original)
    tok = mt.create(f"{made[kind].name}:{original}")
    tok.save(tmp_path / "run")
    original.unlink()
    back = mt.load(tmp_path / "run")
    assert back.encode(SAMPLES[6]) == made[kind].encode(SAMPLES[6])


# ---- byte and char -----------------------------------------------------------------------

def test_byte_ids(made):
    byte = made["byte"]
    assert (byte.vocab_size, byte.eot_id) == (257, 256)
    assert byte.encode("é!") == [195, 169, 33]
    assert byte.decode([195]) == "\ufffd"  # incomplete UTF-8


def test_char_vocab_and_unknown(made, training_text):
    char = made["char"]
    seen = set("".join(training_text()))
    assert char.chars == sorted(seen)
    assert (char.unk_id, char.eot_id, char.vocab_size) == (len(seen), len(seen) + 1, len(seen) + 2)
    assert "ж" not in seen
    ids = char.encode("aж")
    assert ids[1] == char.unk_id and char.decode(ids) == "a\ufffd"


# ---- tiktoken ------------------------------------------------------------------------------

def test_gpt2_file(made):
    gpt2 = made["tiktoken"]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
    assert gpt2.decode([15496, 50256]) == "Hello<|endoftext|>"


def test_unrecognised_ranks_file(gpt2_file, tmp_path):
    small = tmp_path / "small.tiktoken"
    small.write_bytes(b"".join(gpt2_file.read_bytes().splitlines(keepends=True)[:300]))
    tok = mt.create(f"tiktoken:{small}")
    assert (tok.vocab_size, tok.eot_id) == (301, 300)
    assert tok.decode(tok.encode(SAMPLES[4])) == SAMPLES[4]


def test_known_patterns_match_tiktoken(monkeypatch):
    """The copied split patterns and special tokens equal tiktoken's own definitions."""
    from tiktoken_ext import openai_public

    from minigpt_tokenizers.tiktoken_bpe import KNOWN_RANKS

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {b"a": 0})
    for name, pat, specials, n_vocab in KNOWN_RANKS.values():
        ref = getattr(openai_public, name)()
        assert (ref["pat_str"], ref["special_tokens"]) == (pat, specials), name
        assert ref.get("explicit_n_vocab") == n_vocab, name


def test_tiktoken_offline_names_the_alternative(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as e:
        mt.create("tiktoken:cl100k_base")
    assert "\n" not in e.value.message and "tiktoken:path/to/" in e.value.hint


def test_tiktoken_unknown_name_lists_encodings():
    with pytest.raises(TokenizerError) as e:
        mt.create("tiktoken:gpt5_base")
    assert "cl100k_base" in e.value.hint and "o200k_base" in e.value.hint


# ---- sentencepiece -----------------------------------------------------------------------

def test_sentencepiece_learns_literal_unk(made):
    sp = made["sp-unigram"]
    ids = sp.encode(" <unk> of")
    assert not any(sp.sp.is_byte(i) or sp.sp.is_unknown(i) for i in ids)
    assert sp.vocab_size == 800 and sp.eot_id == sp.sp.eos_id()


def test_sentencepiece_is_deterministic(made, training_text):
    again = mt.create("sentencepiece:bpe:800", training_text)
    assert again.sp.serialized_model_proto() == made["sp-bpe"].sp.serialized_model_proto()


def test_sentencepiece_encoding_is_independent_of_newline_cuts(made, wikitext):
    sp, text = made["sp-unigram"], wikitext[:50_000]
    cut = text.index("\n", 20_000) + 1
    assert sp.encode(text) == sp.encode(text[:cut]) + sp.encode(text[cut:])


@pytest.mark.parametrize("eos_id", [2, -1])
def test_sentencepiece_foreign_model(eos_id, wikitext, tmp_path):
    """A model trained elsewhere with sentencepiece's defaults (dummy prefix, NFKC, no "\\n")."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(wikitext[:100_000].splitlines()),
                                   model_writer=model, model_type="bpe", vocab_size=500,
                                   eos_id=eos_id, minloglevel=2)
    path = tmp_path / "foreign.model"
    path.write_bytes(model.getvalue())
    if eos_id < 0:
        with pytest.raises(TokenizerError, match="no end-of-sequence"):
            mt.create(f"sentencepiece:{path}")
        return
    tok = mt.create(f"sentencepiece:{path}")
    text = wikitext[:3000]
    assert tok.encode(text) == tok.sp.encode(text) and tok.eot_id == 2
    assert tok.decode(tok.encode(text)) == tok.sp.decode(tok.sp.encode(text))


def test_sentencepiece_vocab_too_big(training_text):
    with pytest.raises(TokenizerError) as e:
        mt.create("sentencepiece:bpe:100000", training_text)
    assert "smaller vocabulary" in e.value.hint


def test_sentencepiece_vocab_too_small_says_so():
    for size in (0, 1, 2, 3):  # sentencepiece's own checks say nothing for the first three
        with pytest.raises(TokenizerError) as e:
            mt.create(f"sentencepiece:bpe:{size}", lambda: iter(["hello world\n" * 20]))
        assert "sentencepiece training failed: " in e.value.message and e.value.hint
        assert e.value.message.removeprefix("sentencepiece training failed: ").strip()


# ---- errors ------------------------------------------------------------------------------

def test_error_cases(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not a tokenizer \x00\xff")
    empty = tmp_path / "empty.tiktoken"
    empty.write_bytes(b"")
    partial = tmp_path / "partial.tiktoken"  # a rank for "a" and "b" only
    partial.write_bytes(b"YQ== 0\nYg== 1\n")
    cases = [
        ("nope", "unknown tokenizer"),
        ("tiktoken:" + str(partial), "254 of the 256 single bytes have no rank"),
        ("tiktoken:" + str(tmp_path / "missing.tiktoken"), "missing.tiktoken"),
        ("tiktoken:" + str(garbage), "garbage.bin"),
        ("tiktoken:" + str(empty), "empty.tiktoken"),
        ("sentencepiece:" + str(tmp_path / "missing.model"), "missing.model"),
        ("sentencepiece:" + str(garbage), "garbage.bin"),
        ("sentencepiece:wordpiece:8000", "bad sentencepiece spec"),
        ("sentencepiece:unigram:8000", "training text"),  # no training text given
        ("char", "training text"),
        ("byte:extra", "no argument"),
    ]
    for spec, words in cases:
        with pytest.raises(TokenizerError) as e:
            mt.create(spec)
        assert words in e.value.message and "\n" not in e.value.message, spec


def test_unknown_plugin_lists_builtins():
    with pytest.raises(TokenizerError) as e:
        mt.create("nope:1")
    assert all(name in e.value.hint for name in ("byte", "char", "tiktoken", "sentencepiece"))


def test_load_with_missing_files(made, tmp_path):
    made["tiktoken"].save(tmp_path)
    (tmp_path / "ranks.tiktoken").unlink()
    with pytest.raises(TokenizerError, match="not found"):
        mt.load(tmp_path)


def test_a_tokenizer_cannot_read_outside_its_folder(tmp_path):
    (tmp_path / "secret.tiktoken").write_text("YQ== 0\n")
    folder = tmp_path / "tok"
    folder.mkdir()
    meta = {"name": "tiktoken", "spec": "tiktoken", "pat_str": ".", "special_tokens": {}}
    for value in ("../secret.tiktoken", str(tmp_path / "secret.tiktoken")):
        (folder / "tokenizer.json").write_text(json.dumps({**meta, "ranks_file": value}))
        with pytest.raises(TokenizerError, match="outside|must name"):
            mt.load(folder)
    (folder / "tokenizer.json").write_text(json.dumps(meta))  # the default file name ...
    (folder / "ranks.tiktoken").symlink_to(tmp_path / "secret.tiktoken")  # ... as a link out
    with pytest.raises(TokenizerError, match="outside"):
        mt.load(folder)


# ---- registry and packaging --------------------------------------------------------------

def test_external_plugin(external_tokenizer, tmp_path):
    assert "reverse-byte" in mt.available()
    tok = mt.create("reverse-byte")
    assert isinstance(tok, external_tokenizer)
    assert tok.encode("A") == [255 - 65] and tok.decode(tok.encode(SAMPLES[3])) == SAMPLES[3]
    assert not hasattr(tok, "decode_bytes")  # optional: streaming falls back to decode
    tok.save(tmp_path)
    assert isinstance(mt.load(tmp_path), external_tokenizer)


def _register(monkeypatch, **targets: str) -> None:
    """Entry points ``name = "module:attr"`` in minigpt's group, as an installed package
    would add them, for one test."""
    import importlib.metadata

    extra = [importlib.metadata.EntryPoint(name=name, value=value, group=mt.ENTRY_POINT_GROUP)
             for name, value in targets.items()]
    real = importlib.metadata.entry_points

    def entry_points(**params):
        eps = real(**params)
        if params.get("group") == mt.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints([*eps, *extra])
        return eps

    monkeypatch.setattr(mt, "entry_points", entry_points)


def test_a_broken_plugin_is_a_one_line_error(monkeypatch):
    _register(monkeypatch, missing="minigpt_no_such_module_xyz:Tok",
              noattr="minigpt_tokenizers.byte:NoSuchClass")
    for name, words in (("missing", "ModuleNotFoundError"), ("noattr", "NoSuchClass")):
        with pytest.raises(TokenizerError) as e:
            mt.create(name)
        assert f"plugin '{name}'" in e.value.message and words in e.value.message
        assert "\n" not in e.value.message and e.value.hint


def test_a_plugin_is_saved_under_the_name_it_is_registered_by(monkeypatch, tmp_path):
    from minigpt_tokenizers.byte import ByteTokenizer

    class Nameless(ByteTokenizer):  # a plugin that forgot to set ``name``
        name = ""

    import types

    module = types.ModuleType("minigpt_test_nameless")
    module.Nameless = Nameless
    monkeypatch.setitem(sys.modules, module.__name__, module)
    _register(monkeypatch, nameless=f"{module.__name__}:Nameless")
    mt.create("nameless").save(tmp_path)
    assert json.loads((tmp_path / mt.META_FILE).read_text())["name"] == "nameless"
    assert isinstance(mt.load(tmp_path), Nameless)


def test_loading_needs_the_plugin_installed(tmp_path):
    from minigpt_cli.errors import CheckpointError
    from minigpt_cli.run.load import load_tokenizer

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / mt.META_FILE).write_text(json.dumps({"name": "not-installed", "spec": "x"}))
    with pytest.raises(mt.MissingPluginError, match="needs the tokenizer plugin"):
        mt.load(folder)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert "install the package" in e.value.hint and "byte" in e.value.hint


def test_heavy_imports_are_lazy():
    code = ("import sys, minigpt_tokenizers as m; m.available(); "
            "print(sorted({'tiktoken', 'sentencepiece', 'numpy', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent).stdout
    assert out.strip() == "[]"


def test_plugins_raise_minigpts_own_error():
    from minigpt_cli.errors import MiniGPTError

    assert TokenizerError is __import__("minigpt_cli.errors").errors.TokenizerError
    with pytest.raises(MiniGPTError, match="unknown tokenizer"):
        mt.create("no-such-tokenizer")


def test_ranks_without_special_tokens_get_end_of_text_after_the_last_rank():
    from minigpt_tokenizers.tiktoken_bpe import EOT, R50K_PAT, _build

    ranks = {bytes([b]): b for b in range(256)}
    enc = _build("bytes-only", R50K_PAT, ranks, {})
    assert enc.encode(EOT, allowed_special="all") == [256] and enc.n_vocab == 257
