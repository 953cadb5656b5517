"""The GPT: shapes, causality, parameters, the KV cache, optimizer groups, attention weights."""

import pytest
import torch

from minigpt_cli.config import ModelConfig
from minigpt_cli.model.gpt import GPT

SMALL = dict(vocab_size=97, max_seq_length=16, num_heads=4)  # the toy, smaller still


@pytest.fixture
def toy(toy_gpt):
    """``toy(**overrides)``: ``toy_gpt`` with a vocabulary of 97, a context of 16 and four
    heads, in training mode."""
    return lambda **overrides: toy_gpt(**{**SMALL, **overrides}).train()


def test_shapes_and_loss(toy):
    model = toy()
    x = torch.randint(0, 97, (3, 16))
    logits, _ = model(x)
    assert logits.shape == (3, 16, 97)
    no_logits, loss = model(x, x)
    assert no_logits is None  # with targets the full logits are never built
    assert loss.ndim == 0
    # an untrained model is close to uniform
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_causal_future_tokens_do_not_change_the_past(toy):
    model = toy().eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_parameter_names_and_tied_head(toy):
    model = toy()
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "lm_head.weight"):
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight


def test_parameter_count_is_exact(toy):
    V, T, C, L, F = 97, 16, 32, 2, 64
    model = toy()
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    expected = V * C + T * C + L * per_layer + 2 * C
    assert model.num_params() == expected
    assert sum(model.param_groups_breakdown().values()) == expected


def test_original_design_size():
    model = GPT(ModelConfig(vocab_size=50257))
    assert model.num_params() == 16_058_112


def test_kv_cache_matches_full_forward(toy):
    model = toy().eval()
    x = torch.randint(0, 97, (2, 16))
    full, _ = model(x)
    cache = model.new_cache(2)
    parts = [model(x[:, :5], cache=cache)[0]]
    parts += [model(x[:, i:i + 1], cache=cache)[0] for i in range(5, 9)]
    parts.append(model(x[:, 9:], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_attention_weights_times_values_reproduce_the_fused_attention(toy_gpt):
    model = toy_gpt()
    idx = torch.randint(0, 257, (2, 11))
    captured = {}
    hooks = []
    for i, block in enumerate(model.transformer.h):
        hooks.append(block.ln_1.register_forward_hook(
            lambda m, args, out, i=i: captured.__setitem__(("ln_1", i), out)))
        hooks.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(("sdpa", i), args[0])))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    B, T, C, H = 2, 11, 32, 2
    for layer in range(2):
        w = model.attention_weights(idx, layer)  # (B, H, T, T)
        assert w.shape == (B, H, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T))
        assert torch.all(w.triu(1) == 0)
        attn = model.transformer.h[layer].attn
        v = attn.c_attn(captured[("ln_1", layer)]).split(C, dim=2)[2]
        v = v.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, D)
        y = (w @ v).transpose(1, 2).reshape(B, T, C)
        torch.testing.assert_close(y, captured[("sdpa", layer)], atol=1e-5, rtol=1e-4)


def test_weight_decay_groups(toy):
    model = toy()
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) not in decayed
    assert id(model.transformer.h[0].attn.c_attn.weight) in decayed
    assert id(model.transformer.h[0].attn.c_attn.bias) not in decayed
    assert id(model.transformer.h[0].ln_1.weight) not in decayed


def test_overfits_one_batch(toy):
    model = toy()
    x = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("bad", [dict(embed_dim=30, num_heads=4)])
def test_model_config_validation(bad):
    from minigpt_cli.errors import ConfigError
    with pytest.raises(ConfigError):
        ModelConfig(**{**dict(vocab_size=10), **bad}).validate()


def test_model_loss_equals_loss_from_logits(toy):
    from torch.nn import functional as F

    model = toy()
    x = torch.randint(0, 97, (2, 16))
    logits, _ = model(x)
    _, loss = model(x, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 97), x.reshape(-1)))
