"""Evaluation: DPO metrics on held-out pairs, reverse KL to the reference from fresh samples, rewards."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

import torch

from hypo_fast.losses import dpo_loss, sampled_kl, sequence_logps
from hypo_fast.models import pack_sequences
from hypo_fast.train.data import PreferencePair, Prompt

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def load_reward(spec: str | None, device) -> RewardFn | None:
    """``module:function`` taking (prompts, responses) → scores, or a local HF sequence-classification folder."""
    if spec is None:
        return None
    if ":" in spec and not Path(spec).exists():
        module, name = spec.split(":", 1)
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"eval.reward: cannot import {spec!r}: {err}") from err
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(spec, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def score(prompts, responses):
        enc = tokenizer([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True).to(device)
        return model(**enc).logits[:, 0].float().tolist()

    return score


@torch.no_grad()
def pair_metrics(policy, pairs: list[PreferencePair], ref_logps: torch.Tensor, beta: float, loss_type: str,
                 label_smoothing: float, device, batch_pairs: int = 8) -> dict:
    """DPO loss, reward accuracy and margins on held-out pairs (reference log-probs from the cache)."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start:start + batch_pairs]
        batch = pack_sequences([(p.prompt_ids, p.chosen_ids) for p in chunk]
                               + [(p.prompt_ids, p.rejected_ids) for p in chunk]).to(device)
        seq = sequence_logps(policy.token_logprobs(batch), batch.segment_ids, num_segments=batch.num_sequences)
        chosen.append(seq[:len(chunk)])
        rejected.append(seq[len(chunk):])
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    ref = ref_logps.to(device)
    losses, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type,
                              label_smoothing=label_smoothing)
    return {"eval/loss/dpo": losses.mean().item(), "eval/rewards/accuracies": (cr > rr).float().mean().item(),
            "eval/rewards/margins": (cr - rr).mean().item(), "eval/logps/chosen": chosen.mean().item()}


@torch.no_grad()
def sampled_kl_metrics(policy, sampler, prompts: list[Prompt], seed: int, tokenizer, reward: RewardFn | None,
                       device) -> dict:
    """Reverse KL(π ‖ π_ref) estimated on fresh samples (k1 and k3), the paper's headline metric."""
    if not prompts:
        return {}
    samples = sampler.generate([p.ids for p in prompts], seed=seed)
    responses = samples.responses()
    index = samples.prompt_index.tolist()
    batch = pack_sequences([(prompts[i].ids, r) for i, r in zip(index, responses)]).to(device)
    policy_logps = samples.logps[samples.mask].to(device)  # recorded while sampling: no scoring pass
    ref_logps = policy.reference_token_logprobs(batch)
    n = batch.num_sequences
    out = {f"eval/kl/{est}": sampled_kl(policy_logps, ref_logps, batch.segment_ids, est, n).mean().item()
           for est in ("k1", "k3")}
    out["eval/response_length"] = samples.mask.sum(1).float().mean().item()
    if reward is not None:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = reward([prompts[i].text for i in index], texts)
        out["eval/reward"] = float(torch.tensor(list(scores), dtype=torch.float64).mean())
    return out
