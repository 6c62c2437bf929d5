"""Packed and padded batches score the same sequences identically, and as the HF model does."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.examples.toy import tiny_llama
from hypo_fast.models import Policy, pack_sequences, pad_sequences

SEQUENCES = [([1, 2, 3], [4, 5]), ([7, 8, 9, 10, 11], [12, 13, 14, 15]), ([20], [21, 22, 23])]


def hf_logprobs(model, sequences):
    out = []
    for prompt, response in sequences:
        log_probs = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), -1)
        out += [log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(response)]
    return torch.stack(out)


def test_packed_equals_padded_equals_hf():
    model = tiny_llama().eval()
    policy = Policy(model)
    packed, padded = pack_sequences(SEQUENCES), pad_sequences(SEQUENCES)
    assert packed.input_ids.shape == (1, 18) and packed.attention_mask is None
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]
    with torch.no_grad():
        a, b = policy.token_logprobs(packed), policy.token_logprobs(padded)
        expected = hf_logprobs(model, SEQUENCES)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.double(), expected, atol=1e-5, rtol=1e-5)
    assert packed.segment_ids.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2] == padded.segment_ids.tolist()


def test_fixed_length_packing_pads_without_scoring_the_pad():
    model = tiny_llama().eval()
    batch = pack_sequences(SEQUENCES, pad_id=0, max_tokens=24)
    assert batch.input_ids.shape == (1, 24)
    with torch.no_grad():
        torch.testing.assert_close(Policy(model).token_logprobs(batch),
                                   Policy(model).token_logprobs(pack_sequences(SEQUENCES)))
    with pytest.raises(ValueError, match="max_tokens"):
        pack_sequences(SEQUENCES, max_tokens=10)


@pytest.mark.parametrize("sequences,match", [([], "empty"), ([([], [1])], "empty prompt"),
                                             ([([1], [])], "empty response")])
def test_bad_sequences(sequences, match):
    with pytest.raises(ValueError, match=match):
        pack_sequences(sequences)


def test_step_logps_carries_sums_and_token_counts():
    """The pairs' log-probs reach the objective as sums with their response lengths (each loss type
    normalises by itself), whatever the order of the segments in the packed row."""
    from hypo_fast.models import pack_step

    pairs = [([1, 2], [3, 4, 5], [6]), ([7], [8], [9, 10, 11, 12])]
    online = [([1], [2, 3]), ([1], [4])]
    batch = pack_step(pairs, online)
    token_logps = -torch.arange(1, batch.tokens.targets.numel() + 1, dtype=torch.float64)
    n_on = sum(len(r) for _, r in online)
    step = batch.step_logps(token_logps, torch.zeros(2, 2, dtype=torch.float64),
                            ref_online=torch.zeros(n_on, dtype=torch.float64))
    assert step.chosen_tokens.tolist() == [3, 1] and step.rejected_tokens.tolist() == [1, 4]
    # chosen tokens come first in the row: −(1+2+3), −4; then rejected: −5, −(6+7+8+9)
    assert step.chosen.tolist() == [-6, -4] and step.rejected.tolist() == [-5, -30]
