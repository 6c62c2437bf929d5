"""Host-side pieces every Triton launcher shares: the per-arch tile table, input checks, the vocabulary
split and chunk rules, the head kernels' shared launch plan (``HeadPlan``), launch records.

``TILES`` is the one table of tile configs. The launchers read it, and ``benchmarks/kernel_resources.py``
compiles exactly what it holds (through the launchers' own ``*_launch`` functions) for sm_80, sm_90a and
sm_100a, so the registers, spills and MMA instructions it reports are those of real launches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float32, *HALF_DTYPES)
ARCHS = (80, 90, 100)  # table columns; see arch_family for the GPUs each one covers


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # token (row) tile
    block_v: int  # vocabulary tile
    block_d: int  # slice of the hidden dimension per tl.dot
    num_warps: int
    num_stages: int
    group_n: int = 8  # token tiles launched together (L2 reuse of their h rows)
    vocab_major: bool = False  # sampling head: compute zᵀ (vocabulary on the MMA's M side) for few rows


_T = TileConfig  # short name for the table below


def _vm(*args, **kwargs) -> TileConfig:  # vocabulary-major sampling-head tile
    return TileConfig(*args, **kwargs, vocab_major=True)


# kernel → precision → arch → config (the sampling head: → row tile → config). Precision: "half"
# (bf16/fp16 inputs), "ieee" (fp32 inputs, exact fp32 FMA dots), "tf32" (fp32 inputs, allow_tf32).
# Chosen with benchmarks/kernel_resources.py: no local memory inside any loop, no spills at all where a
# config allows it, shared memory within 99 KB on the 80 column (it also serves sm_86/89/120).
TILES: dict[str, dict] = {
    "linear_logprobs_fwd": {
        "half": {80: _T(128, 128, 64, 8, 4), 90: _T(128, 128, 64, 8, 3), 100: _T(128, 64, 64, 8, 4)},
        "ieee": {80: _T(128, 64, 16, 8, 3), 90: _T(128, 64, 16, 8, 3), 100: _T(128, 64, 16, 8, 3)},
        "tf32": {80: _T(128, 64, 32, 8, 3), 90: _T(128, 64, 32, 8, 3), 100: _T(128, 64, 32, 8, 3)},
    },
    "linear_logprobs_bwd": {
        "half": {80: _T(64, 128, 64, 8, 3), 90: _T(128, 128, 32, 8, 3), 100: _T(64, 128, 64, 8, 3)},
        "ieee": {80: _T(64, 128, 16, 8, 3), 90: _T(64, 128, 16, 8, 3), 100: _T(64, 128, 16, 8, 3)},
        "tf32": {80: _T(64, 128, 32, 8, 2), 90: _T(128, 64, 32, 8, 3), 100: _T(64, 128, 32, 8, 3)},
    },
    # linear_token_kl: two logits tiles (policy and reference) live at once, so half the vocabulary tile
    "linear_token_kl_fwd": {
        "half": {80: _T(128, 64, 64, 8, 3), 90: _T(128, 64, 64, 8, 3), 100: _T(128, 64, 64, 8, 3)},
        "ieee": {80: _T(128, 32, 16, 8, 3), 90: _T(128, 32, 16, 8, 3), 100: _T(128, 32, 16, 8, 3)},
        "tf32": {80: _T(128, 64, 32, 8, 3), 90: _T(128, 64, 32, 8, 3), 100: _T(128, 64, 16, 8, 3)},
    },
    "linear_token_kl_bwd": {
        "half": {80: _T(64, 128, 32, 8, 3), 90: _T(64, 128, 64, 8, 3), 100: _T(64, 128, 64, 8, 3)},
        "ieee": {80: _T(64, 64, 16, 8, 3), 90: _T(64, 64, 16, 8, 3), 100: _T(64, 64, 16, 8, 3)},
        "tf32": {80: _T(64, 128, 32, 8, 2), 90: _T(64, 128, 32, 8, 3), 100: _T(64, 128, 32, 8, 3)},
    },
    # sample_head: block_v (64) is the sampling tile width, part of what a seed reproduces: the same for
    # every row tile. Few rows: vocabulary-major tiles, so wgmma/tcgen05 get 64 vocabulary rows per MMA.
    "sample_head": {
        "half": {
            80: {16: _T(16, 64, 128, 4, 4), 32: _T(32, 64, 128, 8, 3), 64: _T(64, 64, 64, 8, 4),
                 128: _T(128, 64, 64, 8, 4)},
            90: {16: _vm(16, 64, 128, 4, 4), 32: _vm(32, 64, 128, 4, 4), 64: _T(64, 64, 64, 8, 4),
                 128: _T(128, 64, 64, 8, 4)},
            100: {16: _vm(16, 64, 128, 4, 4), 32: _vm(32, 64, 128, 8, 3), 64: _T(64, 64, 64, 8, 3),
                  128: _T(128, 64, 64, 8, 4)},
        },
        "ieee": {arch: {16: _T(16, 64, 32, 8, 2), 32: _T(32, 64, 16, 4, 3), 64: _T(64, 64, 32, 8, 2),
                        128: _T(128, 64, 16, 8, 3)} for arch in ARCHS},
        "tf32": {arch: {16: _vm(16, 64, 64, 4, 3), 32: _vm(32, 64, 64, 4 if arch < 100 else 8, 3),
                        64: _T(64, 64, 32, 8, 3), 128: _T(128, 64, 32, 8, 3)} for arch in ARCHS},
    },
}

def head_row_tiles(arch: int, precision_name: str) -> list[int]:
    """The sampling head's row tiles on ``arch`` for a precision: the keys of its ``TILES`` column."""
    return sorted(TILES["sample_head"][precision_name][arch])


def head_row_buckets(arch: int) -> list[int]:
    """Decode batch sizes B that select each distinct sampling-head row tile on ``arch`` (largest B each):
    the row tiles of the arch's ``TILES`` column, over all precisions."""
    return sorted({b for name in TILES["sample_head"] for b in head_row_tiles(arch, name)})


def head_tile(dtype: torch.dtype, arch: int | None, rows: int, allow_tf32: bool = False) -> TileConfig:
    """The sampling head's config for a decode batch of ``rows``: the smallest row tile of the arch's
    column holding them all (the largest tile beyond that)."""
    if arch is None:
        return INTERPRETER_HEAD_TILE
    name = precision(dtype, allow_tf32)
    tiles = head_row_tiles(arch, name)
    return TILES["sample_head"][name][arch][next((b for b in tiles if rows <= b), tiles[-1])]


# Interpreted runs (CPU tensors, TRITON_INTERPRET=1) are simulated on numpy: few, large program instances.
INTERPRETER_TILE = TileConfig(block_n=32, block_v=64, block_d=32, num_warps=1, num_stages=1)
INTERPRETER_HEAD_TILE = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=1, num_stages=1)

# Streaming multiprocessors of the arch's flagship part (A100, H100/H200, B200): sizes the vocabulary
# splits when the launch is planned without a device (the compile gate).
SM_COUNT = {80: 108, 90: 132, 100: 148}


def arch_family(capability: tuple[int, int]) -> int:
    """Table column for a CUDA compute capability: 100 for sm_100/103, 90 for sm_90, 80 otherwise
    (sm_80/86/87/89 and the sm_120 consumer parts: mma.sync, no wgmma or tcgen05)."""
    major, minor = capability
    if major == 10:
        return 100
    if major == 9:
        return 90
    return 80


def device_arch(device: torch.device) -> int | None:
    """Table column of a CUDA device; None for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    return arch_family(torch.cuda.get_device_capability(device))


def precision(dtype: torch.dtype, allow_tf32: bool = False) -> str:
    if dtype in HALF_DTYPES:
        return "half"
    return "tf32" if allow_tf32 else "ieee"


def tile_config(kernel: str, dtype: torch.dtype, arch: int | None, allow_tf32: bool = False) -> TileConfig:
    """The launch config of ``kernel`` for inputs of ``dtype`` on ``arch`` (None: the interpreter)."""
    if arch is None:
        return INTERPRETER_TILE
    return TILES[kernel][precision(dtype, allow_tf32)][arch]


def dot_flags(dtype: torch.dtype, arch: int | None, allow_tf32: bool = False) -> tuple[bool, str]:
    """``(DOT_IN_FP32, DOT_PRECISION)``: the interpreter mis-computes half-precision dots
    (triton-lang/triton#11584), so it gets fp32 operands; fp32 inputs are exact unless ``allow_tf32``."""
    interpreted = arch is None
    dot_in_fp32 = interpreted and dtype in HALF_DTYPES
    return dot_in_fp32, "tf32" if allow_tf32 and not interpreted else "ieee"


def weight_grad_dtype(dtype: torch.dtype, arch: int | None, fp32_weight_grad: bool) -> torch.dtype:
    """Accumulation dtype of the backward's atomic ``dW`` sums.

    fp32 by default. With ``fp32_weight_grad=False`` the weight dtype, where the arch adds it natively:
    fp16 everywhere (``red.add.noftz.f16``), bf16 from sm_90 on; bf16 on sm_8x (and under the
    interpreter) stays fp32, since its atomics would be compare-and-swap loops.
    """
    if fp32_weight_grad or dtype == torch.float32:
        return torch.float32
    if dtype == torch.bfloat16 and (arch is None or arch < 90):
        return torch.float32
    return dtype


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_splits(n_tiles: int, v_tiles: int, device: torch.device, arch: int | None) -> int:
    """Vocabulary splits so that about two programs per SM run; 1 when interpreted."""
    if arch is None:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SM_COUNT[arch]
    return max(1, min(v_tiles, cdiv(2 * sms, n_tiles)))


def vocab_splits(n_rows: int, vocab: int, cfg: TileConfig, device: torch.device, arch: int | None,
                 splits: int | None = None) -> tuple[int, int, int]:
    """``(token tiles, vocabulary splits, columns per split)`` of a split forward (``splits``: None for
    :func:`num_splits`'s choice); every split holds at least one column."""
    n_tiles, v_tiles = cdiv(n_rows, cfg.block_n), cdiv(vocab, cfg.block_v)
    splits = splits or num_splits(n_tiles, v_tiles, device, arch)
    v_per_split = cdiv(v_tiles, splits) * cfg.block_v
    return n_tiles, cdiv(vocab, v_per_split), v_per_split


def vocab_chunks(n_rows: int, vocab: int, chunk_elements: int, min_chunk: int) -> Iterator[tuple[int, int]]:
    """Column ranges ``[lo, hi)`` of the PyTorch path's vocabulary chunks: about ``chunk_elements`` logits
    for all ``n_rows`` rows, at least ``min_chunk`` columns, at most the vocabulary (the native op's
    ``chunk_columns`` is this rule in C++)."""
    width = min(vocab, max(min_chunk, chunk_elements // max(n_rows, 1)))
    return ((lo, min(lo + width, vocab)) for lo in range(0, vocab, width))


def row_order(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Row permutation [N] int64 with every non-ignored row first (stable, no host sync)."""
    return torch.argsort((targets == ignore_index).to(torch.int8), stable=True)


def tile_constexprs(cfg: TileConfig) -> dict:
    """A head kernel's tile constexprs and launch options."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@dataclass(frozen=True)
class HeadPlan:
    """What every head kernel's launch (``linear_logprobs``, ``linear_token_kl``) plans the same way: the grid,
    the row order (ignored rows last) and the constexprs its kernel shares with the others (``HAS_BIAS``, the
    dot flags, the tile; the backward's also ``H_GRAD``/``W_GRAD``/``B_GRAD``). The forward's vocabulary
    split: ``splits`` programs per token tile, ``v_per_split`` columns each."""

    grid: tuple[int]
    order: torch.Tensor
    constexprs: dict
    splits: int = 1
    v_per_split: int = 0

    def partials(self, n_rows: int, device: torch.device, names: tuple[str, ...], **optional: bool) -> SimpleNamespace:
        """The forward's ``[S, N]`` fp32 per-split outputs: one per name, and one per ``optional`` name whose
        flag is set; an unset one aliases the first output (its kernel never writes it)."""
        partial = lambda: torch.empty((self.splits, n_rows), device=device, dtype=torch.float32)  # noqa: E731
        out = SimpleNamespace(**{name: partial() for name in names})
        first = getattr(out, names[0])
        for name, wanted in optional.items():
            setattr(out, name, partial() if wanted else first)
        return out


def _head_constexprs(cfg: TileConfig, hidden: torch.Tensor, bias: torch.Tensor | None, arch: int | None,
                     allow_tf32: bool) -> dict:
    dot_in_fp32, dot_precision = dot_flags(hidden.dtype, arch, allow_tf32)
    return dict(HAS_BIAS=bias is not None, DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision,
                **tile_constexprs(cfg))


def head_fwd_plan(kernel: str, hidden: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, vocab: int,
                  *, arch: int | None, ignore_index: int, allow_tf32: bool, order: torch.Tensor | None,
                  splits: int | None) -> HeadPlan:
    """The shared plan of a split forward over (token tile × vocabulary split) for ``TILES[kernel]``."""
    cfg = tile_config(kernel, hidden.dtype, arch, allow_tf32)
    n_tiles, splits, v_per_split = vocab_splits(hidden.shape[0], vocab, cfg, hidden.device, arch, splits)
    order = row_order(targets, ignore_index) if order is None else order
    return HeadPlan((n_tiles * splits,), order, _head_constexprs(cfg, hidden, bias, arch, allow_tf32), splits,
                    v_per_split)


def head_bwd_plan(kernel: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, *, arch: int | None, ignore_index: int, allow_tf32: bool,
                  order: torch.Tensor | None, needs_grad: tuple[bool, bool, bool], fp32_weight_grad: bool,
                  unused: torch.Tensor) -> tuple[HeadPlan, SimpleNamespace]:
    """The shared plan of a backward over (token tile × vocabulary tile) for ``TILES[kernel]``, and its zeroed
    accumulators (:func:`head_grad_buffers`, ``unused`` standing in for those not wanted)."""
    (N, _), V = hidden.shape, weight.shape[0]
    cfg = tile_config(kernel, hidden.dtype, arch, allow_tf32)
    order = row_order(targets, ignore_index) if order is None else order
    grads = head_grad_buffers(hidden, weight, bias, needs_grad, weight_grad_dtype(weight.dtype, arch, fp32_weight_grad),
                              unused=unused)
    want_h, want_w, want_b = grads.want
    constexprs = dict(_head_constexprs(cfg, hidden, bias, arch, allow_tf32), H_GRAD=want_h, W_GRAD=want_w,
                      B_GRAD=want_b)
    return HeadPlan((cdiv(N, cfg.block_n) * cdiv(V, cfg.block_v),), order, constexprs), grads


def head_grad_buffers(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      needs_grad: tuple[bool, bool, bool], dw_dtype: torch.dtype,
                      unused: torch.Tensor) -> SimpleNamespace:
    """Zeroed accumulators of an LM head's backward (``tiles.head_grads_tile`` adds into them): ``dh``
    ``[N, D]`` fp32, ``dw`` ``[V, D]`` in ``dw_dtype``, ``db`` ``[V]`` fp32, with ``unused`` standing in for
    those not wanted (the kernel never touches them); ``want`` = (H_GRAD, W_GRAD, B_GRAD)."""
    (N, D), V = hidden.shape, weight.shape[0]
    want_h, want_w, want_b = needs_grad[0], needs_grad[1], needs_grad[2] and bias is not None
    zeros = lambda shape, dtype: torch.zeros(shape, device=hidden.device, dtype=dtype)  # noqa: E731
    return SimpleNamespace(dh=zeros((N, D), torch.float32) if want_h else unused,
                           dw=zeros((V, D), dw_dtype) if want_w else unused,
                           db=zeros((V,), torch.float32) if want_b else unused, want=(want_h, want_w, want_b))


def head_grads(out: SimpleNamespace, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``(d_hidden, d_weight, d_bias)`` from :func:`head_grad_buffers`, in the inputs' dtypes (None: not wanted)."""
    want_h, want_w, want_b = out.want
    return (out.dh.to(hidden.dtype) if want_h else None, out.dw.to(weight.dtype) if want_w else None,
            out.db.to(bias.dtype) if want_b else None)


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor | None = None) -> None:
    """Shapes, dtypes and strides a launcher needs; raises ValueError naming the bad argument."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, D={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if targets is not None and (targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"targets must be [N={hidden.shape[0]}] int32/int64, got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hidden dtype must be one of {SUPPORTED_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.stride(1) != 1:
        raise ValueError("hidden needs a unit stride on D")
    if weight.stride(1) != 1:
        raise ValueError("weight needs a unit stride on D")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as data: the launcher runs it, the compile gate compiles it."""

    kernel: object  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)  # constexpr arguments, num_warps and num_stages

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs)
