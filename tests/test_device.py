"""The device helpers."""

import torch


def test_keep_freed_memory_is_safe_to_call_twice():
    import platform

    from minigpt_cli.device import keep_freed_memory

    expected = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
    assert keep_freed_memory() is expected
    torch.ones(50_000_000).sum()  # large tensors still allocate and free
