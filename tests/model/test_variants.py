"""Architecture variants by config (rope, rmsnorm, swiglu, grouped-query attention, qk-norm,
untied head): checked against transformers' Llama, the KV cache, the sliding window."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli.config import MLPS, NORMS, POSITIONS, Config, ModelConfig
from minigpt_cli.errors import ConfigError
from minigpt_cli.generate.cache import CachedLM
from minigpt_cli.model import gpt
from minigpt_cli.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
VARIANTS = {
    "gpt2": {},
    "rope": dict(position="rope"),
    "rmsnorm-swiglu": dict(norm="rmsnorm", mlp="swiglu", ff_dim=None),
    "llama-gqa": dict(LLAMA, num_heads=4, num_kv_heads=2, tie_embeddings=False, ff_dim=None),
    "mqa-qknorm": dict(LLAMA, num_heads=4, num_kv_heads=1, qk_norm=True),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request, toy_config):
    torch.manual_seed(0)
    cfg = toy_config(**VARIANTS[request.param])
    cfg.validate()
    return GPT(cfg).eval()


def test_every_config_name_has_a_module():
    assert set(gpt.POSITIONS) == set(POSITIONS)
    assert set(gpt.NORMS) == set(NORMS)
    assert set(gpt.MLPS) == set(MLPS)


def test_the_gpt2_default_keeps_its_names_and_shapes(toy_config):
    names = {k: tuple(v.shape) for k, v in GPT(toy_config()).state_dict().items()}
    assert names["transformer.wpe.weight"] == (32, 32)
    assert names["transformer.h.0.attn.c_attn.weight"] == (96, 32)
    assert "transformer.h.0.ln_1.bias" in names and "transformer.h.0.mlp.c_fc.bias" in names
    assert not any("rotary" in k or "norm" in k.split(".")[-2] for k in names)


def test_variants_are_built_from_their_names(toy_config):
    cfg = toy_config(**VARIANTS["llama-gqa"])
    cfg.validate()
    model = GPT(cfg)
    sd = model.state_dict()
    assert "transformer.wpe.weight" not in sd and "lm_head.weight" in sd and not model.tied
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32 + 2 * 2 * 8, 32)
    assert sd["transformer.h.0.mlp.c_gate.weight"].shape == (128, 32)  # 8/3 x 32 -> 128
    assert not any(k.endswith(".bias") for k in sd)
    assert cfg.ff_dim == 128
    assert model.new_cache(3).layers[0].k.shape == (3, 2, 32, 8)  # kv heads only


@pytest.mark.parametrize("overrides, message", [
    (["model.num_kv_heads=3"], "^model.num_heads .4. must be divisible by model.num_kv_heads"),
    (["model.position=rope", "model.num_heads=4", "model.embed_dim=12"],
     "^model.position rope needs an even head dimension"),
    (["model.position=alibi"], "^model.position must be learned or rope, got 'alibi'"),
    (["model.norm=batchnorm"], "^model.norm must be layernorm or rmsnorm"),
    (["model.mlp=relu"], "^model.mlp must be gelu or swiglu"),
    (["model.num_kv_heads=0"], "^model.num_kv_heads must be positive"),
    (["model.rope_theta=0"], "^model.rope_theta must be positive"),
])
def test_bad_variants_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        Config.from_sources("tiny", overrides=overrides)
    assert "\n" not in str(e.value)


def test_ff_dim_null_takes_the_usual_width():
    assert ModelConfig(embed_dim=256, ff_dim=None).ff_width == 1024
    assert ModelConfig(embed_dim=256, ff_dim=None, mlp="swiglu").ff_width == 704  # 682.7 up to 64
    cfg = Config.from_sources("tiny", overrides=["model.ff_dim=null", "model.mlp=swiglu"])
    assert cfg.model.ff_dim == 384  # the tiny preset is 128 wide


# ---- against transformers' Llama ---------------------------------------------------------

def llama_twin(model: GPT):
    """transformers' LlamaForCausalLM with ``model``'s weights copied in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.ff_width,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_length,
        rms_norm_eps=1e-5, rope_theta=cfg.rope_theta, tie_word_embeddings=model.tied,
        attention_bias=False, mlp_bias=False, attn_implementation="eager")).eval()
    q, kv = cfg.embed_dim, cfg.kv_heads * cfg.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.transformer.wte.weight)
        hf.lm_head.weight.copy_(model.lm_head.weight)
        hf.model.norm.weight.copy_(model.transformer.ln_f.weight)
        for ours, theirs in zip(model.transformer.h, hf.model.layers, strict=True):
            w = ours.attn.c_attn.weight
            theirs.self_attn.q_proj.weight.copy_(w[:q])
            theirs.self_attn.k_proj.weight.copy_(w[q:q + kv])
            theirs.self_attn.v_proj.weight.copy_(w[q + kv:])
            theirs.self_attn.o_proj.weight.copy_(ours.attn.c_proj.weight)
            theirs.mlp.gate_proj.weight.copy_(ours.mlp.c_gate.weight)
            theirs.mlp.up_proj.weight.copy_(ours.mlp.c_fc.weight)
            theirs.mlp.down_proj.weight.copy_(ours.mlp.c_proj.weight)
            theirs.input_layernorm.weight.copy_(ours.ln_1.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.ln_2.weight)
    return hf


def randomised(model: GPT) -> GPT:
    """Norm gains away from one, so that copying them is tested too."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def test_layers_match_transformers_llama_parts(toy_config):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as L

    torch.manual_seed(3)
    cfg = toy_config(**LLAMA, num_heads=4, num_kv_heads=2)
    cfg.validate()
    block = randomised(GPT(cfg)).transformer.h[0]
    x = torch.randn(2, 7, 32)

    ref_norm = L.LlamaRMSNorm(32, eps=1e-5)
    ref_norm.weight.data.copy_(block.ln_1.weight)
    torch.testing.assert_close(block.ln_1(x), ref_norm(x), atol=1e-5, rtol=1e-5)

    hf_cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=cfg.ff_width, max_position_embeddings=32,
                         rope_theta=10000.0, mlp_bias=False, hidden_act="silu")
    ref_mlp = L.LlamaMLP(hf_cfg)
    for a, b in (("gate_proj", "c_gate"), ("up_proj", "c_fc"), ("down_proj", "c_proj")):
        getattr(ref_mlp, a).weight.data.copy_(getattr(block.mlp, b).weight)
    torch.testing.assert_close(block.mlp(x), ref_mlp(x), atol=1e-5, rtol=1e-5)

    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8)
    start = 5
    pos = torch.arange(start, start + 7).unsqueeze(0)
    cos, sin = L.LlamaRotaryEmbedding(hf_cfg)(q, pos)
    ref_q, _ = L.apply_rotary_pos_emb(q, q, cos, sin)
    _, ref_k = L.apply_rotary_pos_emb(k, k, cos, sin)
    ours_q, ours_k = block.attn.rotary(q, k, start)
    torch.testing.assert_close(ours_q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, ref_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads, tied", [(4, True), (2, False), (1, True)])
def test_the_whole_model_matches_transformers_llama(toy_config, kv_heads, tied):
    torch.manual_seed(4)
    cfg = toy_config(**LLAMA, num_heads=4, num_kv_heads=kv_heads, tie_embeddings=tied)
    cfg.validate()
    model = randomised(GPT(cfg)).eval()
    hf = llama_twin(model)
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- every variant: cache, window, loss --------------------------------------------------

def test_kv_cache_decode_equals_the_full_forward(variant):
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        full, _ = variant(x)
        cache = variant.new_cache(2)
        parts = [variant(x[:, :5], cache=cache)[0]]
        parts += [variant(x[:, i:i + 1], cache=cache)[0] for i in range(5, 9)]
        parts.append(variant(x[:, 9:], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.layers[0].k.size(1) == variant.config.kv_heads


def test_sliding_past_the_context_keeps_positions_right(variant):
    torch.manual_seed(1)
    lm = CachedLM(variant, batch_size=1)
    seq = torch.randint(0, 257, (1, 30))
    logits = lm.prefill(seq)
    for _ in range(40):  # context 32: the window slides three times
        new = torch.randint(0, 257, (1, 1))
        seq = torch.cat([seq, new], dim=1)
        logits = lm.append(new)
        with torch.inference_mode():
            fresh = variant(lm.window)[0][:, -1]
        torch.testing.assert_close(logits, fresh, atol=1e-5, rtol=1e-5)
        assert torch.equal(lm.window, seq[:, -lm.window.size(1):])
    assert lm.slides == 3


def test_attention_weights_times_values_reproduce_the_attention(variant):
    idx = torch.randint(0, 257, (2, 11))
    attn = variant.transformer.h[1].attn
    got = {}
    hooks = [variant.transformer.h[1].ln_1.register_forward_hook(
                 lambda m, a, out: got.__setitem__("x", out)),
             attn.c_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("y", a[0]))]
    with torch.no_grad():
        variant(idx)
        w = variant.attention_weights(idx, 1)  # (B, H, T, T)
        v = attn.share_kv(attn.qkv(got["x"])[2])
    for h in hooks:
        h.remove()
    assert w.shape == (2, variant.config.num_heads, 11, 11)
    y = (w @ v).transpose(1, 2).reshape(2, 11, 32)
    torch.testing.assert_close(y, got["y"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_every_variant_learns_one_batch(variant, dtype):
    model = GPT(variant.config).train()
    x = torch.randint(0, 257, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("name", ["llama-small", "shakespeare-char-5min"])
def test_the_modern_presets_build_llama_style_models(name):
    from minigpt_cli.convert.llama import family

    cfg = Config.from_preset(name).validate().model
    assert family(cfg) == "llama" and cfg.kv_heads < cfg.num_heads
    cfg.vocab_size = cfg.vocab_size or 65  # the characters of tinyshakespeare
    with torch.device("meta"):
        model = GPT(cfg)
    assert "wpe" not in model.transformer and model.tied
