"""Model loading, the LoRA reference (adapters disabled) and the frozen reference."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.examples.toy import tiny_llama
from hypo_fast.models import (FrozenReference, Policy, add_lora, attention_implementation, load_causal_lm,
                              pack_sequences, pack_step)
from hypo_fast.models.loading import decoder_of

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


def _hf_token_kls(policy, sequences, temperature):
    """Exact per-position KL(π_τ ‖ π_ref,τ) from each model's own HF logits, one sequence at a time."""
    out = []
    for prompt, response in sequences:
        ids = torch.tensor([list(prompt) + list(response)])
        rows = slice(len(prompt) - 1, ids.shape[1] - 1)
        log_p = torch.log_softmax(policy.model(input_ids=ids).logits[0, rows].double() / temperature, -1)
        with policy.reference.context():
            log_q = torch.log_softmax(policy.reference.model(input_ids=ids).logits[0, rows].double() / temperature, -1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out)


@pytest.mark.parametrize("lora", [False, True])
def test_exact_token_kls_from_the_one_reference_forward(lora):
    """reference_online_logprobs(return_hidden=True) gives the reference's hidden rows from the same single
    forward; step_logprobs with them gives the online samples' exact KL_t (against the HF models' own logits)
    and the same log-probs as without."""
    base = tiny_llama()
    if lora:
        policy = Policy(add_lora(base, r=4, alpha=8), temperature=0.7)
        drift = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    else:
        policy = Policy(base, FrozenReference.copy_of(base), temperature=0.7)
        drift = list(base.parameters())
    with torch.no_grad():
        for p in drift:
            p.add_(torch.randn_like(p) * 0.05)
    online = [([1, 2, 3], [4, 5, 6]), ([9, 8], [7, 6, 5, 4]), ([3], [2])]
    batch = pack_step([([5, 6], [7, 8], [9])], online)
    calls = []
    hook = decoder_of(policy.reference.model).register_forward_hook(lambda *_: calls.append(1))
    ref_logps, ref_rows = policy.reference_online_logprobs(batch, return_hidden=True)
    hook.remove()
    assert len(calls) == 1 and ref_rows.shape == (8, 64)  # 3 + 4 + 1 response tokens
    torch.testing.assert_close(ref_logps, policy.reference_online_logprobs(batch))
    logps, kls = policy.step_logprobs(batch, ref_online_hidden=ref_rows)
    torch.testing.assert_close(logps, policy.step_logprobs(batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kls.double(), _hf_token_kls(policy, online, 0.7), atol=1e-5, rtol=1e-4)
    assert kls.min() > 0 and kls.requires_grad


def test_load_from_config_and_local_folder(tmp_path):
    model = tiny_llama()
    assert attention_implementation() in ("sdpa", "flash_attention_2")
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path), dtype=torch.bfloat16, gradient_checkpointing=True)
    assert loaded.dtype == torch.bfloat16 and loaded.is_gradient_checkpointing
    assert not getattr(loaded, "use_kernels", False)  # Hub kernels off (transformers 5.25 turned them on)
    built = load_causal_lm(model.config, seed=0)
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(OSError):
        load_causal_lm(str(tmp_path / "missing"))  # never falls back to downloading


def test_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(tiny_llama(), target_modules=("nope",))
