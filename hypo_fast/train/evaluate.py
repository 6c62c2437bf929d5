"""Evaluation: DPO metrics on held-out pairs, reverse KL to the reference from fresh samples, rewards."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

import torch

from hypo_fast.models import Policy, pack_step
from hypo_fast.objective import HyPOObjective, OnlineLogps, StepLogps
from hypo_fast.sampling import Sampler
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
    model = AutoModelForSequenceClassification.from_pretrained(spec, local_files_only=True, use_kernels=False)
    model = model.to(device).eval()
    if tokenizer.pad_token is None:  # e.g. Pythia reward models: batches need a pad the model can skip
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(prompts, responses):
        enc = tokenizer([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True).to(device)
        return model(**enc).logits[:, 0].float().tolist()

    return score


@torch.no_grad()
def pair_metrics(policy: Policy, objective: HyPOObjective, pairs: list[PreferencePair], ref_logps: torch.Tensor,
                 device, batch_pairs: int = 8) -> dict:
    """The objective's DPO metrics on held-out pairs (``eval/`` + TRL's names), reference from the cache.

    The objective sees every held-out pair at once, so the loss types that couple a batch's pairs (``aot``,
    ``aot_unpaired``, ``sft``) are evaluated over the whole set rather than per micro-batch."""
    steps = []
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start:start + batch_pairs]
        batch = pack_step([p.ids for p in chunk]).to(device)
        logps, row_metrics = policy.step_logprobs(batch, return_metrics=True)
        steps.append(batch.step_logps(logps, ref_logps[start:start + len(chunk)].to(device), row_metrics=row_metrics))
    step = StepLogps.of_pairs(steps)
    _, aux = objective(step)
    return aux.metrics(prefix="eval/")


@torch.no_grad()
def sampled_kl_metrics(policy: Policy, sampler: Sampler, prompts: list[Prompt], seed: int, tokenizer,
                       reward: RewardFn | None, device) -> dict:
    """KL(π_τ ‖ π_ref,τ) estimated on fresh samples (k1 and k3; the paper's headline metric), with the
    objective's own estimator and the policy's own temperature, plus the optional reward."""
    if not prompts:
        return {}
    samples = sampler.generate([p.ids for p in prompts], seed=seed)
    responses = samples.responses()
    index = samples.prompt_index.tolist()
    batch = pack_step([], [(prompts[i].ids, r) for i, r in zip(index, responses)]).to(device)
    online = OnlineLogps(samples.logps[samples.mask].to(device),  # recorded while sampling: no scoring pass
                         policy.reference_online_logprobs(batch), batch.online_segment_ids, batch.num_online)
    out = {f"eval/kl/{est}": online.kl(est).mean().item() for est in ("k1", "k3")}
    out["eval/response_length"] = samples.mask.sum(1).float().mean().item()
    if reward is not None:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = reward([prompts[i].text for i in index], texts)
        out["eval/reward"] = float(torch.tensor(list(scores), dtype=torch.float64).mean())
    return out
