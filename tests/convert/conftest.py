"""Fixtures of the conversion tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def llama_cpp_logits():
    """``llama_cpp_logits(path, model, ids, check=None)``: (llama.cpp's logits, minigpt's
    logits) of ``ids`` for a GGUF file and the model it came from, as float64 arrays;
    ``check(llm)`` runs on the loaded llama.cpp model first."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def run(path, model, ids, check=None):
        import numpy as np
        import torch

        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1,
                              verbose=False)
        try:
            if check is not None:
                check(llm)
            llm.eval(ids)
            got = np.array(llm.scores[:len(ids)], dtype=np.float64)
        finally:
            llm.close()
        with torch.no_grad():
            want = model(torch.tensor([ids]))[0][0].double().numpy()
        return got, want
    return run
