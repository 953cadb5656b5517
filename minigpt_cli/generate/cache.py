"""The model behind a KV cache: feed tokens, get next-token logits, slide past the context."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from minigpt_cli.generate.quant import DecodingHead
from minigpt_cli.model.gpt import GPT, KVCache

SMALL_STEP = 4  # a CPU step over at most this many (batch x new) tokens runs on one thread


class CachedLM:
    """Feed tokens, get next-token logits; one cached forward step per new token.

    ``window`` holds the tokens now in the cache. When appending would overflow the
    context, the cache restarts from the most recent ``keep`` tokens (half the context by
    default), prefilled again, so positions stay within the model's limit.
    """

    def __init__(self, model: GPT, batch_size: int, keep: int | None = None,
                 head: DecodingHead | None = None):
        self.model = model
        self.capacity = model.config.max_seq_length
        self.keep = min(self.capacity, keep or max(1, self.capacity // 2))
        self.head = head
        with torch.inference_mode():
            self.cache: KVCache = model.new_cache(batch_size)
            self.tokens = torch.zeros(batch_size, self.capacity, dtype=torch.long,
                                      device=next(model.parameters()).device)
        self.slides = 0

    @property
    def window(self) -> torch.Tensor:
        return self.tokens[:, :self.cache.length]

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Start over from ``idx`` (1 or B, T), cropped from the left to the context.
        A single row is computed once and copied to every row of the batch."""
        idx = idx[:, -self.capacity:]
        self.cache.reset()
        logits = self._forward(idx)
        B, T = self.tokens.size(0), idx.size(1)
        if idx.size(0) == 1 and B > 1:
            for layer in self.cache.layers:
                layer.k[1:, :, :T] = layer.k[:1, :, :T]
                layer.v[1:, :, :T] = layer.v[:1, :, :T]
            self.tokens[1:, :T] = self.tokens[:1, :T]
            logits = logits.expand(B, -1)
        return logits

    @torch.inference_mode()
    def append(self, idx: torch.Tensor) -> torch.Tensor:
        """Continue every row with ``idx`` (B, T); logits (B, V) for the next token."""
        T = idx.size(1)
        if self.cache.length + T <= self.capacity:
            return self._forward(idx)
        self.slides += 1
        keep = max(0, self.keep - T)
        context = torch.cat([self.window[:, self.cache.length - keep:], idx], dim=1)
        self.cache.reset()
        return self._forward(context[:, -self.capacity:])

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        # Only the last position's logits are needed, and the head is most of the cost.
        B, T = idx.shape
        start = self.cache.length
        self.tokens[:B, start:start + T] = idx
        with one_thread(idx.device.type == "cpu" and B * T <= SMALL_STEP):
            x = self.model.features(idx, self.cache)[:, -1]  # (B, C)
        if self.head is not None:
            return self.head(x)  # (B, V)
        return self.model.lm_head(x)


class DecodingLinear(nn.Linear):
    """``nn.Linear`` as decoding on the CPU wants it: the same weight and bias (shared, so
    the state dict is unchanged), laid out for one row at a time, plus a copy prepacked by
    oneDNN for two rows or more.

    - One row (a decoding step at batch 1): the weight is the transpose of a contiguous
      (in, out) matrix, which MKL multiplies by a single row 1.2-1.4x faster than the
      (out, in) layout that training uses.
    - Two rows or more (a batch of streams, a prefill), without autograd: oneDNN's
      prepacked weights skip the reordering that a plain product does on every call, 1.8x
      faster for 8 rows on two threads, and a prefill 1.2-1.9x faster. Its sums come in
      another order, so they differ from ``F.linear``'s in the last bits (as a batched
      product differs from a single row's anyway). This copy costs the layer's memory
      again; it is rebuilt, not copied, by ``copy.deepcopy``.
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.pack()

    def pack(self) -> None:
        """Lay the weight out (in, out) and prepack it again: after its values change."""
        w = self.weight
        with torch.no_grad():
            if w.is_contiguous():
                w.data = w.data.t().contiguous().t()
            self.packed = None
            if w.device.type != "cpu" or w.dtype != torch.float32:
                return
            try:  # oneDNN is part of PyTorch's x86 builds; check that it runs here
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)
                probe = torch.linspace(-1, 1, 2 * self.in_features).view(2, -1)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [],
                                                         "")
            except (RuntimeError, AttributeError):
                return
            if torch.allclose(got, F.linear(probe, w, self.bias), rtol=1e-4, atol=1e-5):
                self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.packed is not None and x.numel() > x.size(-1) and x.dtype == torch.float32
                and not torch.is_grad_enabled()):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self):
        return {**super().__getstate__(), "packed": None}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.pack()


def decoding_layout(model: GPT) -> None:
    """Make every linear layer of ``model`` but the output head a ``DecodingLinear``, in
    place: the same parameters, laid out and prepacked for decoding on the CPU (the
    decoding head keeps its own copy of the output head). Calling it again prepacks the
    weights again, as they are now."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, DecodingLinear):
                    child.pack()
                elif (type(child) is nn.Linear and child is not model.lm_head
                      and id(child.weight) not in shared and child.weight.device.type == "cpu"):
                    setattr(parent, name, DecodingLinear(child))


_threads_lock = threading.Lock()
_threads_users = 0  # blocks inside one_thread(), in every thread of the process
_threads_before = 0  # torch's thread count when the first of them started


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run torch's CPU operators on one thread for a while.

    A decoding step through the layers is dozens of tiny operators; waking a second thread
    for each costs more than it saves, and stalls every one of them for milliseconds when
    another process keeps the other cores busy (a 10x slower step on a shared 2-core
    machine). The output head, one large matrix product, keeps all threads.

    torch's thread count is process-wide, so blocks in several threads (a server decoding
    for several clients) share one switch: the first block to start sets one thread, the
    last to end puts back the count from before the first, under a lock.
    """
    global _threads_users, _threads_before
    if not enabled:
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
            if _threads_before != 1:
                torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_before != 1:
                torch.set_num_threads(_threads_before)
