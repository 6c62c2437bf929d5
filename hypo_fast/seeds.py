"""One seed derivation for every random stream in hypo_fast.

A stream's seed is a hash of the run's seed and the stream's name and counters, e.g.
``derive_seed(seed, "sample", step, draw)``: streams never collide, and a seed depends on what it is
for, never on how work happens to be split (a rank's share of a global batch names the share, not the
rank). Counter-based noise (the sampling heads) and ``torch.Generator`` both take the result.
"""

from __future__ import annotations

import hashlib

MAX_SEED = 2**31 - 1


def derive_seed(seed: int, *names_and_counters: int | str) -> int:
    """A seed in ``[0, 2³¹ − 1)`` determined by ``seed`` and the stream's name and counters."""
    key = repr((int(seed), *names_and_counters)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % MAX_SEED
