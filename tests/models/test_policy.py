"""Model loading, the LoRA reference (adapters disabled) and the frozen reference."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.examples.toy import tiny_llama
from hypo_fast.models import FrozenReference, Policy, add_lora, attention_implementation, load_causal_lm, pack_sequences

SEQUENCES = [([1, 2, 3], [4, 5, 6]), ([9, 8], [7, 6, 5, 4])]


def test_lora_reference_is_the_base_model_exactly():
    base = tiny_llama()
    with torch.no_grad():
        expected = Policy(base).token_logprobs(pack_sequences(SEQUENCES))
    policy = Policy(add_lora(base, r=4, alpha=8))
    for name, p in policy.model.named_parameters():  # make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    batch = pack_sequences(SEQUENCES)
    with torch.no_grad():
        adapted = policy.token_logprobs(batch)
    reference = policy.reference_token_logprobs(batch)
    assert torch.equal(reference, expected)  # same weights, adapters off: bit-identical
    assert (adapted - expected).abs().max() > 1e-3
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_frozen_reference_keeps_the_starting_weights():
    model = tiny_llama()
    policy = Policy(model, FrozenReference.copy_of(model))
    batch = pack_sequences(SEQUENCES)
    before = policy.reference_token_logprobs(batch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    torch.testing.assert_close(policy.reference_token_logprobs(batch), before)
    assert not any(p.requires_grad for p in policy.reference.model.parameters())


def test_load_from_config_and_local_folder(tmp_path):
    model = tiny_llama()
    assert attention_implementation() in ("sdpa", "flash_attention_2")
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path), dtype=torch.bfloat16, gradient_checkpointing=True)
    assert loaded.dtype == torch.bfloat16 and loaded.is_gradient_checkpointing
    built = load_causal_lm(model.config, seed=0)
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(OSError):
        load_causal_lm(str(tmp_path / "missing"))  # never falls back to downloading


def test_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(tiny_llama(), target_modules=("nope",))
