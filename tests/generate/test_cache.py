"""The KV cache: cached logits equal a full forward, across the sliding window; one thread
for small steps."""

from __future__ import annotations

import copy

import pytest
import torch

from minigpt_cli.generate import cache, quant
from minigpt_cli.generate.cache import CachedLM
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread is fastest


def next_window(n: int, context: int = 32) -> int:
    """How many of the latest tokens the model sees after one more: all of them up to the
    context, then the window restarts from the latest half (re-prefilled)."""
    return n + 1 if n < context else context // 2


@pytest.mark.parametrize("head", [False, True])
def test_cached_logits_equal_full_forward_at_every_step_across_the_window(toy_model, head):
    torch.manual_seed(1)
    lm = CachedLM(toy_model, batch_size=2,
                  head=quant.DecodingHead(toy_model, quantize=False) if head else None)
    seq = torch.randint(0, 257, (2, 20))  # the whole sequence, kept apart from the cache
    logits, n = lm.prefill(seq), 20
    for step in range(70):  # context 32: the window slides several times
        with torch.inference_mode():
            full = toy_model(seq[:, -n:])[0][:, -1]  # a fresh forward over the latest n tokens
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        new = torch.randint(0, 257, (2, 1))
        seq, n = torch.cat([seq, new], dim=1), next_window(n)
        logits = lm.append(new)
        assert torch.equal(lm.window, seq[:, -n:])
    with torch.inference_mode():
        torch.testing.assert_close(logits, toy_model(seq[:, -n:])[0][:, -1], atol=1e-5, rtol=1e-5)
    assert lm.slides == 4 and seq.size(1) == 90


@pytest.mark.parametrize("tie", [True, False])
def test_decoding_layout_keeps_every_value_and_lays_the_layers_out_for_decoding(toy_gpt, byte_tok,
                                                                                tie):
    model = toy_gpt(tie_embeddings=tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 257, (2, 9))
    with torch.inference_mode():
        reference = model(idx)[0]
    Engine(model, byte_tok)  # lays the model out
    cache.decoding_layout(model)  # a second time packs the weights again, as they are
    layers = [m for m in model.modules() if isinstance(m, cache.DecodingLinear)]
    assert len(layers) == 4 * model.config.num_layers  # attention's two, the MLP's two
    for m in layers:  # (out, in) shape, (in, out) memory
        assert m.weight.shape == (m.out_features, m.in_features)
        assert m.weight.t().is_contiguous() and not m.weight.is_contiguous()
    # the head and the embeddings stay as they were: a lookup reads rows
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.is_contiguous()
    assert model.transformer.wte.weight.is_contiguous() and model.tied == tie
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    with torch.inference_mode():  # several rows take the prepacked weights where there are
        torch.testing.assert_close(model(idx)[0], reference, atol=1e-5, rtol=1e-5)


def test_a_decoding_linear_gives_the_layers_products_one_row_or_many(monkeypatch):
    torch.manual_seed(3)
    plain = torch.nn.Linear(48, 80)
    layer = cache.DecodingLinear(plain)
    assert layer.weight is plain.weight and layer.bias is plain.bias
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, plain.weight, plain.bias)
        for rows in (x[:1, :1], x[:1], x):  # one row; several; a batch of several
            torch.testing.assert_close(layer(rows), ref[:rows.size(0), :rows.size(1)],
                                       atol=1e-5, rtol=1e-5)
    if layer.packed is None:
        pytest.skip("no oneDNN prepacked linear in this PyTorch build")
    used = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: used.append(a[0].shape) or real(*a))
    with torch.no_grad():
        layer(x[:1, :1])
        layer(x)
    assert used == [x.shape]  # one row takes the dense weight, several the prepacked one
    monkeypatch.undo()
    # training sees the plain layer: gradients flow, the prepacked copy is not used
    out = layer(x).sum()
    out.backward()
    assert plain.weight.grad is not None
    twin = copy.deepcopy(layer)  # the prepacked copy is rebuilt, not copied
    assert twin.packed is not None and twin.weight is not layer.weight
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x))


def test_small_steps_run_on_one_thread_and_restore_the_setting(toy_model, byte_tok, monkeypatch,
                                                               run_engine):
    seen = []
    features = toy_model.features

    def spy(idx, cache=None):
        seen.append((idx.numel(), torch.get_num_threads()))
        return features(idx, cache)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(toy_model, "features", spy)
        run_engine(toy_model, byte_tok, "x" * 20, max_new_tokens=3, seed=0)
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), cache.one_thread():
            assert torch.get_num_threads() == 1
            raise KeyError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [(20, 2), (1, 1), (1, 1)]  # the prompt of 20 tokens keeps both threads


def test_one_thread_blocks_in_several_threads_share_one_switch():
    """Decoding in threads (a server): the count from before the first block comes back
    only when the last block ends, whatever the order they end in."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside, release = threading.Barrier(3), threading.Event()
        seen = []

        def decode(wait: float):
            with cache.one_thread():
                inside.wait()
                release.wait(wait)
                seen.append(torch.get_num_threads())

        workers = [threading.Thread(target=decode, args=(w,)) for w in (0.0, 0.05)]
        for w in workers:
            w.start()
        inside.wait()  # both are inside their block now
        release.set()
        for w in workers:
            w.join()
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
        assert cache._threads_users == 0
    finally:
        torch.set_num_threads(threads)


def test_prefill_of_one_row_is_shared_by_the_batch(toy_model):
    prompt = torch.randint(0, 257, (1, 10))
    lm = CachedLM(toy_model, batch_size=3)
    logits = lm.prefill(prompt)
    assert logits.shape == (3, 257)
    step = torch.tensor([[1], [2], [3]])
    logits = lm.append(step)
    with torch.inference_mode():
        full = toy_model(torch.cat([prompt.expand(3, -1), step], dim=1))[0][:, -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_greedy_is_deterministic_and_matches_a_plain_argmax_loop(toy_model, byte_tok, complete):
    prompt = byte_tok.encode("Hello")
    settings = SamplingSettings(max_new_tokens=80, temperature=0)  # past the context of 32
    texts = [complete(toy_model, byte_tok, prompt, settings)[0] for _ in range(2)]
    assert texts[0] == texts[1]
    seq, n = list(prompt), len(prompt)
    with torch.inference_mode():
        for _ in range(80):  # a full forward for every token, over the engine's window
            seq.append(int(toy_model(torch.tensor([seq[-n:]]))[0][0, -1].argmax()))
            n = next_window(n)
    assert seq[-1] != byte_tok.eot_id
    assert texts[0] == byte_tok.decode(seq[len(prompt):])
