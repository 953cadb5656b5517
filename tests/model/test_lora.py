"""LoRA adapters: a fresh adapter changes nothing, merging computes what the unmerged
adapter computes, only the adapters train, and targets are checked by name."""

from __future__ import annotations

import copy

import pytest
import torch

from minigpt_cli.config import LoraConfig
from minigpt_cli.errors import ConfigError
from minigpt_cli.model import lora
from minigpt_cli.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))


def adapted(base: GPT, **settings) -> GPT:
    model = copy.deepcopy(base)
    lora.inject(model, LoraConfig(**{"rank": 4, "alpha": 8.0, **settings}))
    return model


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def trained(model: GPT, steps: int = 5) -> GPT:
    """``model`` after a few AdamW steps on its trainable parameters."""
    model.train()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-2)
    for _ in range(steps):
        _, loss = model(IDS[:, :-1], IDS[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_a_fresh_adapter_leaves_the_logits_exactly_as_they_were(toy_gpt):
    base = toy_gpt(bias=True)
    model = adapted(base, dropout=0.1)
    wrapped = lora.lora_modules(model)
    assert sorted(wrapped) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                               "mlp.c_proj"))
    assert all(not m.lora_B.any() and m.lora_A.abs().sum() > 0 for m in wrapped.values())
    assert torch.equal(logits(model), logits(base))


def test_only_the_adapters_train_and_the_base_stays_bit_identical(toy_gpt):
    base = toy_gpt()
    model = adapted(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter_key(n) for n in trainable)
    count, total = lora.count_parameters(model)
    assert count == sum(m.lora_A.numel() + m.lora_B.numel()
                        for m in lora.lora_modules(model).values())
    assert total == base.num_params() + count
    trained(model)
    state, before = model.state_dict(), base.state_dict()
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor), name
    assert any(m.lora_B.abs().sum() > 0 for m in lora.lora_modules(model).values())


def test_merged_unmerged_and_unloaded_models_agree(toy_gpt):
    model = trained(adapted(toy_gpt(), alpha=16.0))
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(toy_gpt()), atol=1e-4)  # it learned something
    weights = {n: p.clone() for n, p in model.named_parameters() if not lora.is_adapter_key(n)}
    lora.merge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    lora.unmerge(model)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)
    plain = lora.merge_and_unload(model)
    assert not lora.has_adapters(plain) and set(plain.state_dict()) == set(
        toy_gpt().state_dict())
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=0)


def test_targets_are_module_names_or_endings(toy_gpt):
    model = adapted(toy_gpt(), targets="attn.c_proj, h.1.mlp.c_fc")
    assert sorted(lora.lora_modules(model)) == ["transformer.h.0.attn.c_proj",
                                                "transformer.h.1.attn.c_proj",
                                                "transformer.h.1.mlp.c_fc"]


@pytest.mark.parametrize("targets", ["c_attn, q_proj", "lm_head", "c"])
def test_a_target_that_matches_no_module_is_an_error_naming_the_key(targets, toy_config):
    with pytest.raises(ConfigError) as e:
        lora.check_targets(toy_config(), LoraConfig(rank=2, targets=targets))
    assert e.value.message.startswith("lora.targets:") and "matches no module" in e.value.message
    assert "attn.c_attn" in e.value.hint


def test_the_fingerprint_changes_with_any_weight(toy_gpt):
    state = toy_gpt().state_dict()
    digest = lora.fingerprint(state)
    assert digest == lora.fingerprint({k: v.clone() for k, v in state.items()})
    changed = dict(state)
    changed["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + 1e-7
    assert lora.fingerprint(changed) != digest
