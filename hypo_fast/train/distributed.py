"""Cross-rank helpers: the process group, agreement, and means over ranks (gloo on CPU, NCCL on GPUs).

Every function is a no-op (or the identity) in a world of one, so single-process runs need no branches.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Join (or, alone, create) the process group DeepSpeed expects: NCCL on GPUs, gloo on CPU.

    Launched by ``deepspeed``/``torchrun`` the environment names rank and world; run directly it is a
    world of one. A collective that waits longer than ``timeout_minutes`` (a frozen or dead peer) raises.
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    timeout = datetime.timedelta(minutes=timeout_minutes)
    # DeepSpeed makes its own groups (data parallel, …) with no timeout argument, so they take torch's module
    # default: set that too, or a frozen peer would block the gradient all-reduce for the default 30 minutes
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than ``distributed.timeout_minutes``: a peer rank is frozen or dead."""


def is_timeout(err: BaseException) -> bool:
    """Whether a backend error means a collective gave up waiting for a peer (gloo and NCCL wordings)."""
    text = str(err).lower()
    return any(w in text for w in ("timed out", "timeout", "connection closed by peer", "connection reset"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_agree(flag: bool, device) -> bool:
    """True only if ``flag`` is true on every rank (e.g. a finite loss: all ranks must skip together)."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value > 0)


def any_rank(flag: bool, device) -> bool:
    """True if ``flag`` is true on any rank."""
    return not all_agree(not flag, device)


def mean_over_ranks(values: dict, device) -> dict[str, float]:
    """The mean of each scalar (a number or a 0-d tensor) over ranks, read back to the host in one transfer;
    every rank must hold the same keys (training metrics)."""
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(keys, stacked.tolist()))


def mean_over_ranks_that_have(values: dict[str, float]) -> dict[str, float]:
    """The mean of each key over the ranks that report it (evaluation: a rank may hold no eval share)."""
    if world_size() == 1:
        return values
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, values)
    keys = sorted({k for g in gathered for k in g})
    return {k: sum(g[k] for g in gathered if k in g) / sum(1 for g in gathered if k in g) for k in keys}


def gather_rows(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's equally shaped ``local`` tensor, in rank order."""
    if world_size() == 1:
        return [local]
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
