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
        # no LOCAL_SIZE: with it DeepSpeed's CPU backend would set up a shared-memory all-reduce for one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
        if not torch.cuda.is_available():
            _skip_shm_allreduce_op()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        _unlink_shm_allreduce_buffer()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _skip_shm_allreduce_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at its first init (about 35 s in
    a fresh environment) for ``inference_all_reduce``, which training never calls (its collectives are
    gloo's). Marking the op incompatible skips the build and the shared-memory segments it would create.
    ``__compatible_ops__`` is DeepSpeed's own probe table; without it nothing changes."""
    import deepspeed.ops

    try:
        compatible = deepspeed.ops.__compatible_ops__
    except AttributeError:
        return
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _unlink_shm_allreduce_buffer() -> None:
    """Where the op above was built anyway, DeepSpeed's CPU backend gives each rank of a one-machine world a
    67 MB ``/dev/shm`` segment for its shared-memory all-reduce and never unlinks it: every run would leave one per rank behind (memory, as
    /dev/shm is RAM). Once every rank has mapped every segment (``init_distributed`` returns only then, and
    the barrier waits for all), the names can go: the mappings stay valid and the memory is freed when the
    processes exit, however they exit."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if torch.cuda.is_available() or not os.path.exists(name):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    os.unlink(name)


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
