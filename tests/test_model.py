import pytest
import torch

from minigpt_cli.config import ModelConfig
from minigpt_cli.model.gpt import GPT


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


@pytest.mark.parametrize("chunk,tile,block", [(7, None, None), (256, None, None),
                                              (64, 10, 3), (300, 7, 7), (1000, 300, 299),
                                              (64, 64, 64)])  # a GPU's sizes
def test_chunked_head_loss_matches_cross_entropy(chunk, tile, block):
    from torch.nn import functional as F

    from minigpt_cli.model.kernels import head_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::5] = -1
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    gh, gw = torch.autograd.grad(3 * ref, (h, w))
    out = head_cross_entropy(h, w, t, chunk=chunk, tile=tile, block=block)
    oh, ow = torch.autograd.grad(3 * out, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(oh, gh)
    torch.testing.assert_close(ow, gw)
    with torch.no_grad():
        summed = head_cross_entropy(h, w, t, reduction="sum", chunk=chunk, tile=tile,
                                    block=block)
    torch.testing.assert_close(summed, ref * (t != -1).sum(), rtol=1e-5, atol=1e-3)


def test_model_loss_equals_loss_from_logits():
    from torch.nn import functional as F

    model = toy()
    x = torch.randint(0, 97, (2, 16))
    logits, _ = model(x)
    _, loss = model(x, x)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 97), x.reshape(-1)))


def test_chunked_head_loss_in_bf16_matches_autocast_cross_entropy():
    from torch.nn import functional as F

    from minigpt_cli.model.kernels import head_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(200, 32, requires_grad=True)
    w = (0.1 * torch.randn(3000, 32)).requires_grad_()
    t = torch.randint(0, 3000, (200,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(h @ w.t(), t)
        out = head_cross_entropy(h, w, t, chunk=64, tile=16, block=5)
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad(ref, (h, w))
    oh, ow = torch.autograd.grad(out, (h, w))
    assert abs(out.item() - ref.item()) < 1e-3
    for mine, theirs in ((oh, gh), (ow, gw)):
        assert mine.dtype == theirs.dtype == torch.float32
        assert mine.is_contiguous()
        assert ((mine - theirs).norm() / theirs.norm()).item() < 1e-2


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_at_rate_p_and_keeps_the_mean(p):
    from minigpt_cli.model.kernels import dropout

    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - round(p * 65536) / 65536)))
    assert abs(y.mean().item() - 1.0) < 0.01
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, y.detach())  # the gradient passes through the same mask
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(x, p), y)  # the global seed makes it reproducible
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x


def test_dropout_odd_shapes_and_bf16():
    from minigpt_cli.model.kernels import dropout

    x = torch.ones(3, 5, 7, dtype=torch.bfloat16)
    y = dropout(x, 0.3)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert set(y.unique().tolist()) <= {0.0, y.max().item()}


def test_explicit_attention_is_sdpa_when_nothing_is_dropped():
    from torch.nn import functional as F

    from minigpt_cli.model.kernels import math_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    # the written-out path with nothing dropped is plain attention
    torch.testing.assert_close(math_attention(q, k, v, None, True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    mask = torch.ones(9, 12, dtype=torch.bool).tril(3)
    k2, v2 = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    torch.testing.assert_close(math_attention(q, k2, v2, mask, False),
                               F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask))
    model = toy(dropout=0.2).train()
    y = model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))[1]
    assert torch.isfinite(y)


def test_keep_freed_memory_is_safe_to_call_twice():
    import platform

    from minigpt_cli.device import keep_freed_memory

    expected = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
    assert keep_freed_memory() is expected
    torch.ones(50_000_000).sum()  # large tensors still allocate and free


def test_head_loss_without_grad_skips_the_gradient_matmuls():
    from torch.profiler import profile

    from minigpt_cli.model.kernels import head_cross_entropy

    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (64,))

    def matmuls(grad: bool) -> int:
        with torch.set_grad_enabled(grad), profile() as prof:
            head_cross_entropy(h, w, t, chunk=32, tile=16, block=4)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")

    assert matmuls(False) == 4  # one per tile: the logits
    assert matmuls(True) == 4 + 2 * 2  # and per chunk, the gradients for h and w
