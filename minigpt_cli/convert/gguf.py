"""A run as a GGUF file for llama.cpp and ollama (architecture ``gpt2``, or ``llama`` for
a model with rope, rmsnorm and swiglu).

The file is what llama.cpp's own ``convert_hf_to_gguf.py`` writes for a GPT-2 checkpoint:
the ``gpt2.*`` hyperparameters, the tensors under llama.cpp's names (``token_embd``,
``position_embd``, ``blk.N.attn_qkv`` ...) and the tokenizer as byte-level BPE metadata
(``tokenizer.ggml.model = "gpt2"``, GPT-2's pre-tokenizer).

What llama.cpp's gpt2 graph assumes, and how a minigpt model meets it:

- every Linear and LayerNorm has a bias: a model trained without biases gets zeros, which
  computes the same thing;
- the head is tied: llama.cpp uses ``token_embd`` for the output when ``output.weight`` is
  absent (llama.cpp's converter writes none for GPT-2 either), so it is written once;
- LayerNorm eps, tanh GELU, scale 1/sqrt(head_dim) and the q|k|v order of ``attn_qkv``
  are GPT-2's, which are minigpt's too. minigpt's Linear weights are (out, in), which is
  already ggml's {in, out}: nothing is transposed (GPT-2's Conv1D weights would be);
- the token list is the embedding: a model with more rows than its tokenizer has tokens
  gets ``[PADn]`` tokens of type UNUSED (as llama.cpp's converter pads), and a tokenizer
  with ids beyond the embedding is refused;
- llama.cpp re-tokenizes text itself, so only tokenizers it reproduces exactly are
  exported: GPT-2's BPE (tiktoken's r50k/p50k ranks, or any ranks file with GPT-2's split
  pattern) and the byte tokenizer (256 byte tokens and no merges). Others are refused.

A Llama-style model is written as llama.cpp's converter writes a Hugging Face Llama:
``attn_q``, ``attn_k``, ``attn_v`` cut from ``c_attn``, ``ffn_gate``, ``ffn_up``,
``ffn_down``, and the rows of ``attn_q`` and ``attn_k`` permuted within each head from the
rotate-half layout (minigpt's and transformers') to the interleaved pairs llama.cpp rotates.

As in llama.cpp's converter, norms, biases and the position embedding stay float32 in
every dtype; q8_0 matrices whose rows are not a multiple of 32 fall back to float16.
``gguf`` is imported inside the functions; nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt_cli.convert.llama import family
from minigpt_cli.errors import ConvertError

DTYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split pattern
EOT_TEXT = "<|endoftext|>"
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # gguf.TokenType
EXPORTABLE = "the byte tokenizer or GPT-2's BPE (tiktoken:gpt2 or a gpt2.tiktoken file)"


@dataclass
class Vocab:
    """A tokenizer as llama.cpp's byte-level BPE metadata."""

    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    eot_id: int = 0
    pre: str = PRE_TOKENIZER


def export_gguf(model, tokenizer, path: Path, dtype: str = "f32", *,
                name: str = "minigpt", chat_template: str | None = None) -> None:
    """Write ``model`` and ``tokenizer`` to ``path`` as a GGUF file of ``dtype``
    (``f32``, ``f16`` or ``q8_0``). Everything is checked before the file is opened."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype} is unknown for gguf", f"use {', '.join(DTYPES)}",
                           setting="dtype")
    cfg = model.config
    arch = family(cfg)
    check_model(cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    tensors = gguf_tensors(model) if arch == "gpt2" else llama_tensors(model)

    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer = _writer_class(gguf)(str(path), arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg.max_seq_length)
        writer.add_embedding_length(cfg.embed_dim)
        writer.add_feed_forward_length(cfg.ff_width)
        writer.add_block_count(cfg.num_layers)
        writer.add_head_count(cfg.num_heads)
        if arch == "gpt2":
            writer.add_layer_norm_eps(cfg.norm_eps)
        else:
            writer.add_head_count_kv(cfg.kv_heads)
            writer.add_layer_norm_rms_eps(cfg.norm_eps)
            writer.add_rope_dimension_count(cfg.head_dim)
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_vocab_size(cfg.vocab_size)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        # llama.cpp refuses a BPE vocabulary without the merges key, even with no merges
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
        writer.add_bos_token_id(vocab.eot_id)
        writer.add_eos_token_id(vocab.eot_id)
        writer.add_add_bos_token(False)  # minigpt encodes a prompt as it is
        writer.add_add_eos_token(False)
        if chat_template:
            writer.add_chat_template(chat_template)

        for tensor_name, data in tensors:
            array, qtype = encode_tensor(gguf, tensor_name, data, dtype)
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def check_model(cfg) -> None:
    """Refuse a shape llama.cpp's graphs would compute wrongly."""
    if cfg.embed_dim % cfg.num_heads:
        raise ConvertError(f"embed_dim {cfg.embed_dim} is not a multiple of num_heads "
                           f"{cfg.num_heads}: llama.cpp's heads would not split it",
                           "only such models can be exported to GGUF")
    if family(cfg) == "llama" and cfg.bias:
        raise ConvertError("model.bias true: GGUF export of a Llama-style model takes one "
                           "without biases", "export it to hf, or train with model.bias false")


def interleave_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a (heads * D, C) query or key matrix, rotate-half layout (feature i pairs
    with i + D/2) reordered to interleaved pairs (2i with 2i + 1), as llama.cpp's
    converter permutes a Hugging Face Llama's."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_tensors(model) -> list[tuple[str, np.ndarray]]:
    """A Llama-style model's weights as float32 arrays under llama.cpp's llama names."""
    cfg = model.config
    state = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    kv = cfg.kv_heads * cfg.head_dim
    out = [("token_embd.weight", state["transformer.wte.weight"])]
    for i in range(cfg.num_layers):
        h, b = f"transformer.h.{i}", f"blk.{i}"
        qkv = state[f"{h}.attn.c_attn.weight"]
        q, k, v = qkv[:cfg.embed_dim], qkv[cfg.embed_dim:cfg.embed_dim + kv], qkv[-kv:]
        out += [(f"{b}.attn_norm.weight", state[f"{h}.ln_1.weight"]),
                (f"{b}.attn_q.weight", interleave_pairs(q, cfg.num_heads)),
                (f"{b}.attn_k.weight", interleave_pairs(k, cfg.kv_heads)),
                (f"{b}.attn_v.weight", v),
                (f"{b}.attn_output.weight", state[f"{h}.attn.c_proj.weight"]),
                (f"{b}.ffn_norm.weight", state[f"{h}.ln_2.weight"]),
                (f"{b}.ffn_gate.weight", state[f"{h}.mlp.c_gate.weight"]),
                (f"{b}.ffn_up.weight", state[f"{h}.mlp.c_fc.weight"]),
                (f"{b}.ffn_down.weight", state[f"{h}.mlp.c_proj.weight"])]
    out.append(("output_norm.weight", state["transformer.ln_f.weight"]))
    if not model.tied:
        out.append(("output.weight", state["lm_head.weight"]))
    return [(n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in out]


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """The model's weights as float32 arrays under llama.cpp's names, in numpy's (out, in)
    order (ggml's {in, out}); missing biases as zeros."""
    cfg = model.config
    state = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    C = cfg.embed_dim

    def weight_and_bias(src: str, dst: str, out_dim: int) -> list[tuple[str, np.ndarray]]:
        bias = state.get(f"{src}.bias")
        if bias is None:
            bias = np.zeros(out_dim, dtype=np.float32)
        return [(f"{dst}.weight", state[f"{src}.weight"]), (f"{dst}.bias", bias)]

    out = [("token_embd.weight", state["transformer.wte.weight"]),
           ("position_embd.weight", state["transformer.wpe.weight"])]
    for i in range(cfg.num_layers):
        h = f"transformer.h.{i}"
        out += weight_and_bias(f"{h}.ln_1", f"blk.{i}.attn_norm", C)
        out += weight_and_bias(f"{h}.attn.c_attn", f"blk.{i}.attn_qkv", 3 * C)
        out += weight_and_bias(f"{h}.attn.c_proj", f"blk.{i}.attn_output", C)
        out += weight_and_bias(f"{h}.ln_2", f"blk.{i}.ffn_norm", C)
        out += weight_and_bias(f"{h}.mlp.c_fc", f"blk.{i}.ffn_up", cfg.ff_dim)
        out += weight_and_bias(f"{h}.mlp.c_proj", f"blk.{i}.ffn_down", C)
    out += weight_and_bias("transformer.ln_f", "output_norm", C)
    head, wte = model.lm_head.weight, model.transformer.wte.weight
    if head is not wte and not bool((head == wte).all()):  # an untied head of its own
        out.append(("output.weight", head.detach().to("cpu").float().numpy()))
    return [(n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in out]


def encode_tensor(gguf, name: str, data: np.ndarray, dtype: str):
    """``data`` in the type llama.cpp's converter would pick for it: ``(array, qtype)``."""
    qtypes = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return data, qtypes.F32
    if dtype == "f32":
        return data, qtypes.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(data, qtypes.Q8_0), qtypes.Q8_0
        except gguf.QuantError:  # rows not a multiple of the block size (32)
            pass
    return data.astype(np.float16), qtypes.F16


# --- the tokenizer -------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters (byte-level BPE's alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def gguf_vocab(tokenizer, vocab_size: int) -> Vocab:
    """``tokenizer`` as llama.cpp BPE metadata with exactly ``vocab_size`` tokens (the
    model's embedding rows), or a ConvertError saying why llama.cpp cannot reproduce it."""
    from minigpt_tokenizers.byte import ByteTokenizer
    from minigpt_tokenizers.tiktoken_bpe import TiktokenTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        vocab = _byte_vocab()
    elif isinstance(tokenizer, TiktokenTokenizer):
        vocab = _tiktoken_vocab(tokenizer)
    else:
        kind = getattr(tokenizer, "name", type(tokenizer).__name__)
        raise ConvertError(f"tokenizer {tokenizer.spec} cannot be exported to GGUF: llama.cpp "
                           f"would not split text the way minigpt's {kind} tokenizer does",
                           f"GGUF export takes {EXPORTABLE}; or export to hf")
    for token, i in sorted(tokenizer.added_tokens.items(), key=lambda kv: kv[1]):
        while len(vocab.tokens) < i:  # ids the encoding leaves unused
            vocab.tokens.append(f"[PAD{len(vocab.tokens)}]")
            vocab.types.append(TOKEN_UNUSED)
        assert len(vocab.tokens) == i, (token, i)
        vocab.tokens.append(token)  # a chat template's token: control, as llama.cpp's own
        vocab.types.append(TOKEN_CONTROL)
    n = len(vocab.tokens)
    if n > vocab_size:
        raise ConvertError(f"tokenizer {tokenizer.spec} has {n} tokens but the model only "
                           f"{vocab_size} embedding rows", "the run's model and tokenizer "
                           "do not belong together")
    for i in range(n, vocab_size):  # embedding rows no token maps to, as llama.cpp pads
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TOKEN_UNUSED)
    if len(set(vocab.tokens)) != len(vocab.tokens):
        raise ConvertError(f"tokenizer {tokenizer.spec} has two tokens with the same text, "
                           "which llama.cpp cannot tell apart", f"GGUF export takes {EXPORTABLE}")
    return vocab


def _byte_vocab() -> Vocab:
    from minigpt_tokenizers.byte import EOT_ID

    byte_chars = bytes_to_unicode()
    assert EOT_ID == 256
    return Vocab(tokens=[byte_chars[b] for b in range(256)] + [EOT_TEXT],
                 types=[TOKEN_NORMAL] * 256 + [TOKEN_CONTROL], merges=[], eot_id=EOT_ID)


def _tiktoken_vocab(tokenizer) -> Vocab:
    from minigpt_tokenizers.tiktoken_bpe import R50K_PAT

    enc = tokenizer.enc
    if enc._pat_str != R50K_PAT:
        raise ConvertError(f"tokenizer {tokenizer.spec} ({enc.name}) splits text with a pattern "
                           "that llama.cpp's GPT-2 pre-tokenizer does not reproduce",
                           f"GGUF export takes {EXPORTABLE}")
    ranks: dict[bytes, int] = enc._mergeable_ranks
    specials: dict[str, int] = enc._special_tokens
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ConvertError(f"tokenizer {tokenizer.spec} lacks tokens for some single bytes, "
                           "so llama.cpp would drop text it cannot merge",
                           f"GGUF export takes {EXPORTABLE}")
    byte_chars = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    by_id: dict[int, tuple[str, int]] = {}
    for token, rank in ranks.items():
        by_id[rank] = (text(token), TOKEN_NORMAL)
    for special, i in specials.items():
        by_id[i] = (special, TOKEN_CONTROL)
    size = max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(size)]
    return Vocab(tokens=[t for t, _ in tokens], types=[k for _, k in tokens],
                 merges=[f"{text(a)} {text(b)}" for a, b in recover_merges(ranks, tokenizer.spec)],
                 eot_id=tokenizer.eot_id)


def recover_merges(ranks: dict[bytes, int], spec: str = "tiktoken") -> list[tuple[bytes, bytes]]:
    """The BPE merges behind tiktoken's mergeable ranks, one per multi-byte token, in rank
    order: the two parts are what byte-pair encoding the token with only lower-ranked
    merges leaves (as transformers' and tiktoken's own converters recover GPT-2's merges).
    Ranks that are no BPE (a token that does not end as two parts) are refused."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, rank)
        if len(parts) != 2:
            raise ConvertError(f"tokenizer {spec}: token {token!r} (rank {rank}) is not a merge "
                               "of two lower-ranked tokens, so its ranks are no BPE llama.cpp "
                               "can run", f"GGUF export takes {EXPORTABLE}")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _writer_class(gguf):
    """``GGUFWriter`` that can also write an empty typed array (the byte tokenizer's merges),
    which llama.cpp reads but gguf-py's writer refuses to pack."""

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if (vtype == gguf.GGUFValueType.ARRAY and sub_type is not None
                    and isinstance(val, list) and not val):
                out = self._pack("I", vtype) if add_vtype else b""
                return bytes(out) + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer
