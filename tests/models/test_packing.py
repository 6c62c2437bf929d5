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


def test_step_metrics_are_trls_from_the_hf_logits():
    """The packed step's ``logits/*``, ``entropy`` (chosen and rejected tokens) and ``mean_token_accuracy``
    (chosen tokens) as TRL defines them, from the HF model's own logits; online samples do not count."""
    from hypo_fast.models import pack_step

    model = tiny_llama(vocab_size=8).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # confident: argmax targets are then frequent
    pairs = [([1, 2], [3, 4, 5], [6]), ([7], [1, 1], [2, 3, 4, 5])]
    with torch.no_grad():  # one chosen token is the model's own greedy choice, every rejected token of pair 0
        first = int(model(torch.tensor([[1, 2]])).logits[0, -1].argmax())
        second = int(model(torch.tensor([[1, 2, first]])).logits[0, -1].argmax())
        pairs[0] = ([1, 2], [first, 4, 5], [first, second])
    online = [([1], [2, 3])]
    chosen, rejected = [], []
    with torch.no_grad():
        for i, (prompt, c, r) in enumerate(pairs):
            for response, into in ((c, chosen), (r, rejected)):
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
                into += [(row, t) for row, t in zip(logits, response)]
        batch = pack_step(pairs, online)
        logps, row_metrics = Policy(model, temperature=0.5).step_logprobs(batch, return_metrics=True)
    n_online = logps.shape[0] - batch.offline_positions
    step = batch.step_logps(logps, torch.zeros(2, 2), torch.zeros(n_online), row_metrics)

    def entropy(row):
        return float(-(row.softmax(-1) * row.log_softmax(-1)).sum())

    assert float(step.entropy) == pytest.approx(sum(entropy(z) for z, _ in chosen + rejected) / len(chosen + rejected),
                                                abs=1e-5)
    accuracy = sum(int(z.argmax()) == t for z, t in chosen) / len(chosen)
    everywhere = sum(int(z.argmax()) == t for z, t in chosen + rejected) / len(chosen + rejected)
    assert 0 < accuracy < everywhere  # TRL's accuracy reads the chosen tokens only
    assert float(step.mean_token_accuracy) == pytest.approx(accuracy)
    assert float(step.chosen_logits_mean) == pytest.approx(sum(float(z.mean()) for z, _ in chosen) / len(chosen),
                                                           abs=1e-5)
