"""Offline reference log-probs: computed once per dataset and reference, cached on disk by fingerprint.

The DPO term needs log π_ref(y±|x) for every offline pair; the reference never changes during a run,
so they are scored once (every rank an equal share, so ZeRO-3's collectives stay matched), gathered,
and saved under ``OUT/ref_cache/NAME-FINGERPRINT.pt``. The fingerprint covers everything they depend
on: the reference model's source and the token ids of every pair (data, tokenizer and truncation).
They are sums over the response tokens; each loss type normalises them itself. A cache file that cannot
be read (truncated, foreign, the wrong shape) is named in a warning and scored again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from hypo_fast.models import Policy, pack_step
from hypo_fast.train import distributed
from hypo_fast.train.data import PreferencePair
from hypo_fast.train.fingerprint import Fingerprint

log = logging.getLogger("hypo_fast")


def fingerprint(model_source: dict, model_files: Sequence[Path], pairs: Sequence[PreferencePair]) -> str:
    """A short hash of the reference's identity and the pairs' token ids."""
    h = Fingerprint(json.dumps({"model": model_source, "logps": "sum"}, sort_keys=True, default=str))
    h.add(*(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in model_files))
    return h.add(*(p.ids for p in pairs)).hex()


@torch.no_grad()
def score_pairs(policy: Policy, pairs: Sequence[PreferencePair], device, batch_pairs: int = 8) -> torch.Tensor:
    """``[len(pairs), 2]`` reference (chosen, rejected) summed sequence log-probs, fp32, on ``device``."""
    rows = []
    for start in range(0, len(pairs), batch_pairs):
        chunk = pairs[start:start + batch_pairs]
        batch = pack_step([p.ids for p in chunk]).to(device)
        chosen, rejected = batch.pair_logps(policy.reference_token_logprobs(batch.tokens))
        rows.append(torch.stack([chosen, rejected], 1).float())
    return torch.cat(rows)


def _read(path: Path, n: int) -> torch.Tensor | None:
    """The cached ``[n, 2]`` tensor, or None (with a warning naming the file) when it cannot be used."""
    try:
        cached = torch.load(path, weights_only=True)
        if isinstance(cached, torch.Tensor) and tuple(cached.shape) == (n, 2):
            return cached
        reason = f"holds {type(cached).__name__} {tuple(getattr(cached, 'shape', ()))}, not [{n}, 2]"
    except Exception as err:  # truncated or foreign: torch and pickle raise many kinds
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    log.warning("%s: a damaged reference cache file (%s); scoring the reference again", path, reason[:300])
    return None


def reference_logps(policy: Policy, pairs: Sequence[PreferencePair], path: Path, rank: int, world: int,
                    device) -> torch.Tensor:
    """The cached ``[n, 2]`` reference log-probs at ``path``, computed across ranks when missing."""
    n = len(pairs)
    if path.exists():
        cached = _read(path, n)
        if cached is not None:
            return cached
    per_rank = -(-n // world)
    share = lambda r: [(r * per_rank + i) % n for i in range(per_rank)]  # noqa: E731  (wraps: equal counts)
    local = score_pairs(policy, [pairs[i] for i in share(rank)], device)
    result = torch.empty(n, 2, device=local.device)
    for r, part in enumerate(distributed.gather_rows(local)):
        result[share(r)] = part
    result = result.cpu()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return result
