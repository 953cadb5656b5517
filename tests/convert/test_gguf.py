"""GGUF export: the file read back with gguf's reader (every key, every tensor against the
model's weights within the dtype's rounding), the refusals, and, when llama-cpp-python is
installed, llama.cpp itself running the file (``-m slow``): its logits against minigpt's
and its tokenizer against minigpt's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import minigpt_tokenizers
from minigpt_cli.config import ModelConfig
from minigpt_cli.convert.gguf import bytes_to_unicode, export_gguf, recover_merges
from minigpt_cli.errors import ConvertError
from minigpt_cli.model.gpt import GPT
from minigpt_tokenizers.tiktoken_bpe import CL100K_PAT, R50K_PAT, TiktokenTokenizer, _build

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR")
              or Path(__file__).resolve().parents[3] / "shared")
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
DTYPES = ("f32", "f16", "q8_0")
TRICKY = ["Hello  world!\n\n  It's 12345 apples, don't   you'll  \t\n end   ",
          "naïve café — 日本語 🙂 <|endoftext|> x", "   leading\r\n\r\ntrailing  \n",
          "I'M HERE'S 'tis ''quoted'' 3.14e10\u00a0nbsp"]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if not GPT2_RANKS.is_file():
        pytest.skip(f"no GPT-2 ranks at {GPT2_RANKS}")
    return minigpt_tokenizers.create(f"tiktoken:{GPT2_RANKS}")


@pytest.fixture(scope="module")
def byte_tokenizer():
    return minigpt_tokenizers.create("byte")


def toy_model(vocab_size: int, bias: bool = True, seed: int = 0, embed_dim: int = 32,
              ff_dim: int = 128) -> GPT:
    """A toy GPT whose weights are all non-trivial (biases and norms too), with logits far
    from flat so the top-1 comparison means something."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, max_seq_length=64, embed_dim=embed_dim,
                      num_heads=2, num_layers=2, ff_dim=ff_dim, dropout=0.0, bias=bias)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.transformer.wte.weight.mul_(20)
    return model


def fields(reader) -> dict:
    """Every key of the file with its value (strings decoded, arrays as lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values = [field.parts[i] for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            values = [bytes(v).decode("utf-8") for v in values]
        else:
            values = [v.tolist()[0] for v in values]
        out[key] = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
    return out


def expected_tensors(model: GPT) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold, from the model's own parameters (zeros where the
    model has no bias)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    C = cfg.embed_dim

    def pair(src, dst, n):
        return {f"{dst}.weight": sd[f"{src}.weight"],
                f"{dst}.bias": sd.get(f"{src}.bias", np.zeros(n, np.float32))}

    out = {"token_embd.weight": sd["transformer.wte.weight"],
           "position_embd.weight": sd["transformer.wpe.weight"],
           **pair("transformer.ln_f", "output_norm", C)}
    for i in range(cfg.num_layers):
        h = f"transformer.h.{i}"
        out |= pair(f"{h}.ln_1", f"blk.{i}.attn_norm", C)
        out |= pair(f"{h}.attn.c_attn", f"blk.{i}.attn_qkv", 3 * C)
        out |= pair(f"{h}.attn.c_proj", f"blk.{i}.attn_output", C)
        out |= pair(f"{h}.ln_2", f"blk.{i}.ffn_norm", C)
        out |= pair(f"{h}.mlp.c_fc", f"blk.{i}.ffn_up", cfg.ff_dim)
        out |= pair(f"{h}.mlp.c_proj", f"blk.{i}.ffn_down", C)
    return out


def check_tensors(reader, model: GPT, dtype: str) -> None:
    expected = expected_tensors(model)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)  # no output.weight: tied
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        want = expected[t.name]
        keep_f32 = want.ndim == 1 or t.name.endswith("_norm.weight") or t.name.startswith("pos")
        quantized = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
        assert t.tensor_type == (Q.F32 if keep_f32 else quantized), t.name
        assert list(t.shape) == list(reversed(want.shape)), t.name  # ggml's {in, out}
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        err = np.abs(got.astype(np.float64) - want)
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        elif t.tensor_type == Q.F16:
            assert (err <= np.abs(want) * 2.0 ** -11 + 6e-8).all(), t.name
        else:  # q8_0: 32-value blocks, each rounded to a step of 1/127 of its largest
            # magnitude, the step itself stored in f16 (off by up to 127 * 2^-11 steps)
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (err.reshape(-1, 32) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all(), t.name


def check_common_keys(kv: dict, model: GPT, dtype: str, name: str) -> None:
    cfg = model.config
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    assert kv["general.architecture"] == "gpt2"
    assert kv["general.type"] == "model"
    assert kv["general.name"] == name
    assert kv["general.file_type"] == file_type
    assert kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert kv["gpt2.context_length"] == cfg.max_seq_length
    assert kv["gpt2.embedding_length"] == cfg.embed_dim
    assert kv["gpt2.feed_forward_length"] == cfg.ff_dim
    assert kv["gpt2.block_count"] == cfg.num_layers
    assert kv["gpt2.attention.head_count"] == cfg.num_heads
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.ggml.add_eos_token"] is False
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert len(kv["tokenizer.ggml.token_type"]) == cfg.vocab_size


KEYS = {"general.architecture", "general.type", "general.name", "general.file_type",
        "general.quantization_version", "gpt2.context_length", "gpt2.embedding_length",
        "gpt2.feed_forward_length", "gpt2.block_count", "gpt2.attention.head_count",
        "gpt2.attention.layer_norm_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(text: str) -> bytes:
    return bytes(UNICODE_TO_BYTE[c] for c in text)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_byte_model(tmp_path, byte_tokenizer, bias, dtype):
    model = toy_model(300, bias)  # 43 embedding rows beyond the tokenizer: padding tokens
    path = tmp_path / "m.gguf"
    export_gguf(model, byte_tokenizer, path, dtype, name="toy")
    reader = gguf.GGUFReader(path)
    kv = fields(reader)
    assert set(kv) == KEYS
    check_common_keys(kv, model, dtype, "toy")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert [token_bytes(t) for t in tokens[:256]] == [bytes([b]) for b in range(256)]
    assert tokens[256:] == ["<|endoftext|>"] + [f"[PAD{i}]" for i in range(257, 300)]
    assert types == [1] * 256 + [3] + [5] * 43
    assert kv["tokenizer.ggml.merges"] == []
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == 256
    check_tensors(reader, model, dtype)
    if not bias:
        assert not np.asarray(reader.get_tensor(3).data).any()  # blk.0.attn_norm.bias


# GGUFReader takes seconds over GPT-2's 100k token and merge strings: each dtype once, with
# biases and without (the byte model above covers every pair).
@pytest.mark.parametrize(("bias", "dtype"), [(True, "f32"), (False, "f16"), (True, "q8_0")])
def test_gpt2_model(tmp_path, gpt2_tokenizer, bias, dtype):
    model = toy_model(50257, bias)
    path = tmp_path / "m.gguf"
    export_gguf(model, gpt2_tokenizer, path, dtype)
    reader = gguf.GGUFReader(path)
    kv = fields(reader)
    assert set(kv) == KEYS
    check_common_keys(kv, model, dtype, "minigpt")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    enc = gpt2_tokenizer.enc
    assert tokens[50256] == "<|endoftext|>" and types[50256] == 3
    assert all(token_bytes(tokens[i]) == enc.decode_single_token_bytes(i) for i in range(50256))
    assert types[:50256] == [1] * 50256
    merges = kv["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[:3] == ["Ġ t", "Ġ a", "h e"]  # GPT-2's merges.txt
    index = {t: i for i, t in enumerate(tokens)}
    for rank, merge in enumerate(merges):  # merge n makes token 256 + n from older tokens
        a, b = merge.split(" ")
        assert index[a + b] == 256 + rank and index[a] < 256 + rank and index[b] < 256 + rank
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == 50256
    check_tensors(reader, model, dtype)


def test_q8_0_falls_back_to_f16_for_rows_off_the_block(tmp_path, byte_tokenizer):
    model = toy_model(257, embed_dim=48, ff_dim=80)  # rows of 48 and 80: no 32-blocks
    export_gguf(model, byte_tokenizer, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["token_embd.weight"] == types["blk.0.ffn_down.weight"] == "F16"
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == "F32"


def test_recover_merges_is_bpe():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257, b"bc": 258}
    assert recover_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")]


def tiktoken_with(ranks: dict[bytes, int], pattern: str = R50K_PAT) -> TiktokenTokenizer:
    specials = {"<|endoftext|>": max(ranks.values()) + 1}
    return TiktokenTokenizer("tiktoken:custom", _build("custom", pattern, ranks, specials))


def refusal(tmp_path, model, tokenizer, dtype="f32") -> str:
    path = tmp_path / "bad.gguf"
    with pytest.raises(ConvertError) as e:
        export_gguf(model, tokenizer, path, dtype)
    assert not path.exists()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_refusals(tmp_path, byte_tokenizer):
    byte_model = toy_model(257)
    message = refusal(tmp_path, byte_model, byte_tokenizer, "q4_0")
    assert message.startswith("dtype q4_0 is unknown") and "f32, f16, q8_0" in message

    char = minigpt_tokenizers.create("char", lambda: ["hello world"])
    assert "char" in refusal(tmp_path, toy_model(char.vocab_size), char)

    assert "only 200 embedding rows" in refusal(tmp_path, toy_model(200), byte_tokenizer)

    byte_ranks = {bytes([b]): b for b in range(256)}
    cl100k_like = tiktoken_with(byte_ranks | {b"ab": 256}, CL100K_PAT)
    assert "pattern" in refusal(tmp_path, toy_model(258), cl100k_like)

    not_bpe = tiktoken_with(byte_ranks | {b"abc": 256})  # no 'ab' or 'bc' to merge from
    assert "not a merge" in refusal(tmp_path, toy_model(258), not_bpe)

    no_zero = {k: v for k, v in byte_ranks.items() if k != b"\x00"} | {b"ab": 256}
    assert "single bytes" in refusal(tmp_path, toy_model(258), tiktoken_with(no_zero))


def test_custom_tiktoken_ranks_export(tmp_path):
    """A ranks file that is not OpenAI's but has GPT-2's pattern: its own merges, and ids
    no token has (gaps) as padding."""
    ranks = {bytes([b]): b for b in range(256)} | {b"he": 256, b"hel": 258, b"ll": 257}
    tok = tiktoken_with(ranks)  # end-of-text lands at 259
    export_gguf(toy_model(264), tok, tmp_path / "m.gguf")
    kv = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert kv["tokenizer.ggml.merges"] == ["h e", "l l", "he l"]
    assert kv["tokenizer.ggml.tokens"][256:] == ["he", "ll", "hel", "<|endoftext|>", "[PAD260]",
                                                 "[PAD261]", "[PAD262]", "[PAD263]"]
    assert kv["tokenizer.ggml.eos_token_id"] == 259


# --- llama.cpp itself ----------------------------------------------------------------------

# max |logit difference| / max |logit| allowed: llama.cpp's GELU goes through an f16 table,
# so even f32 is not bit-exact (measured about 1e-4, 3.5e-4 and 8e-3 of the logit range).
RELATIVE_TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "q8_0": 2.5e-2}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gpt2", "byte"])
def test_llama_cpp_runs_the_export(tmp_path, request, kind, dtype, llama_cpp_logits):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"no text at {SHAKESPEARE}")
    tokenizer = request.getfixturevalue(f"{kind}_tokenizer")
    padding = 43 if kind == "byte" else 0  # embedding rows beyond the tokens: [PADn] tokens
    model = toy_model(tokenizer.vocab_size + padding, bias=kind == "gpt2", seed=1)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:2000]
    ids = tokenizer.encode(text)[:64]
    assert len(ids) == 64
    path = tmp_path / f"{kind}-{dtype}.gguf"
    export_gguf(model, tokenizer, path, dtype)

    def same_tokens(llm) -> None:
        prefix = tokenizer.decode(ids)
        assert llm.tokenize(prefix.encode(), add_bos=False, special=False) == ids
        for t in TRICKY:
            assert llm.tokenize(t.encode(), add_bos=False, special=False) == tokenizer.encode(t)

    got, want = llama_cpp_logits(path, model, ids, same_tokens)
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"\nllama.cpp {kind} {dtype}: max |logit diff| {diff:.4g} of logits up to "
          f"{scale:.3g} ({diff / scale:.2g}), top-1 agreement {top1:.0%}")
    assert top1 == 1.0
    assert diff <= RELATIVE_TOLERANCE[dtype] * scale


def test_the_export_hint_gives_llama_cpp_and_ollama_the_context(tmp_path, toy_run, cli):
    """llama.cpp reads the context from the file (n_ctx_train) but runs with its own default
    unless told: the hint tells it, and ollama's Modelfile, the model's context."""
    run_dir = toy_run(tmp_path / "run", tmp_path / "data.txt", max_seq_length=48)
    result = cli.invoke("export", "--model", run_dir, "--format", "gguf",
                        "--out", tmp_path / "tiny.gguf")
    assert result.exit_code == 0, result.output
    hint = " ".join(result.stderr.split())
    assert f"llama-cli -m {tmp_path / 'tiny.gguf'} -c 48" in hint
    assert "FROM ./tiny.gguf, PARAMETER num_ctx 48" in hint


def test_an_untied_gpt2_runs_in_llama_cpp(tmp_path, byte_tokenizer, llama_cpp_logits):
    """model.tie_embeddings false exports as GPT-2 too: llama.cpp takes output.weight for
    the head (and model.norm_eps as the norms' epsilon)."""
    cfg = ModelConfig(vocab_size=257, max_seq_length=64, embed_dim=32, num_heads=4,
                      num_layers=2, ff_dim=64, dropout=0.0, tie_embeddings=False, norm_eps=1e-2)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)
        model.lm_head.weight.normal_(0, 2)
    path = tmp_path / "untied.gguf"
    export_gguf(model, byte_tokenizer, path, "f32")
    got, want = llama_cpp_logits(path, model, byte_tokenizer.encode("The quick brown fox"))
    assert float(np.abs(got - want).max()) <= RELATIVE_TOLERANCE["f32"] * float(np.abs(want).max())
