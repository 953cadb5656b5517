import pytest
import torch

from minigpt_cli.config import ModelConfig
from minigpt_cli.model import GPT


def toy(**kw) -> GPT:
    cfg = dict(vocab_size=97, max_seq_length=16, embed_dim=32, num_heads=4, num_layers=2,
               ff_dim=64, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(ModelConfig(**cfg))


def test_shapes_and_loss():
    model = toy()
    x = torch.randint(0, 97, (3, 16))
    logits, _ = model(x)
    assert logits.shape == (3, 16, 97)
    no_logits, loss = model(x, x)
    assert no_logits is None  # with targets the full logits are never built
    assert loss.ndim == 0
    # an untrained model is close to uniform
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_causal_future_tokens_do_not_change_the_past():
    model = toy().eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_parameter_names_and_tied_head():
    model = toy()
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "lm_head.weight"):
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight


def test_parameter_count_is_exact():
    V, T, C, L, F = 97, 16, 32, 2, 64
    model = toy()
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    expected = V * C + T * C + L * per_layer + 2 * C
    assert model.num_params() == expected
    assert sum(model.param_groups_breakdown().values()) == expected


def test_original_design_size():
    model = GPT(ModelConfig(vocab_size=50257))
    assert model.num_params() == 16_058_112


def test_kv_cache_matches_full_forward():
    model = toy().eval()
    x = torch.randint(0, 97, (2, 16))
    full, _ = model(x)
    cache = model.new_cache(2)
    parts = [model(x[:, :5], cache=cache)[0]]
    parts += [model(x[:, i:i + 1], cache=cache)[0] for i in range(5, 9)]
    parts.append(model(x[:, 9:], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_weight_decay_groups():
    model = toy()
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) not in decayed
    assert id(model.transformer.h[0].attn.c_attn.weight) in decayed
    assert id(model.transformer.h[0].attn.c_attn.bias) not in decayed
    assert id(model.transformer.h[0].ln_1.weight) not in decayed


def test_overfits_one_batch():
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


@pytest.mark.parametrize("chunk", [7, 256])
def test_chunked_head_loss_matches_cross_entropy(chunk):
    from torch.nn import functional as F

    from minigpt_cli.model import head_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::5] = -1
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    gh, gw = torch.autograd.grad(3 * ref, (h, w))
    out = head_cross_entropy(h, w, t, chunk=chunk)
    oh, ow = torch.autograd.grad(3 * out, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(oh, gh)
    torch.testing.assert_close(ow, gw)
    with torch.no_grad():
        summed = head_cross_entropy(h, w, t, reduction="sum", chunk=chunk)
    torch.testing.assert_close(summed, ref * (t != -1).sum(), rtol=1e-5, atol=1e-3)


def test_model_loss_equals_loss_from_logits():
    from torch.nn import functional as F

    model = toy()
    x = torch.randint(0, 97, (2, 16))
    logits, _ = model(x)
    _, loss = model(x, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 97), x.reshape(-1)))
