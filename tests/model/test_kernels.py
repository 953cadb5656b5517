"""The kernels: the chunked head loss, dropout, and the written-out attention."""

import pytest
import torch


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


def test_chunked_head_loss_with_a_frozen_head_gives_the_same_input_gradient():
    """A frozen head (LoRA) gets no gradient, and the input's is unchanged."""
    from torch.nn import functional as F

    from minigpt_cli.model.kernels import head_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(50, 16)
    t = torch.randint(0, 50, (300,))
    ref = F.cross_entropy(h @ w.t(), t)
    (gh,) = torch.autograd.grad(ref, (h,))
    out = head_cross_entropy(h, w, t, chunk=64, tile=16, block=5)
    out.backward()
    torch.testing.assert_close(h.grad, gh)
    assert w.grad is None


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


def test_explicit_attention_is_sdpa_when_nothing_is_dropped(toy_gpt):
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
    torch.testing.assert_close(math_attention(q, k2, v2, None, False),
                               F.scaled_dot_product_attention(q, k2, v2))
    rows = torch.arange(12) < torch.tensor([5, 12])[:, None]  # each row's own length
    rows = rows[:, None, None]  # (B, 1, 1, S), as batched decoding makes it
    torch.testing.assert_close(math_attention(q, k2, v2, rows, False),
                               F.scaled_dot_product_attention(q, k2, v2, attn_mask=rows))
    # the same gradients, from non-contiguous inputs as the model's heads are
    qkv = torch.randn(2, 9, 3, 4, 8, requires_grad=True)
    q3, k3, v3 = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    grads = [torch.autograd.grad(f(q3, k3, v3).square().sum(), qkv)[0]
             for f in (lambda *a: math_attention(*a, None, True),
                       lambda *a: F.scaled_dot_product_attention(*a, is_causal=True))]
    torch.testing.assert_close(*grads)
    model = toy_gpt(vocab_size=97, max_seq_length=16, num_heads=4, dropout=0.2).train()
    y = model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))[1]
    assert torch.isfinite(y)


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
