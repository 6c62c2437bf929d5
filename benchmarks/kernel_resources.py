"""Compile gate: every Triton kernel variant the launchers can start, compiled for sm_80, sm_90a and sm_100a.

No GPU is needed. Each variant is planned by the launcher's own ``*_launch`` function on meta tensors
(so tile configs come from ``hypo_fast.kernels.launch.TILES`` and flags from the launcher, never
restated here), bound with Triton's own argument binder (the signature, constexprs and 16-byte alignment
hints a real launch gets), compiled with ``triton.compile`` for a ``GPUTarget`` and read back:

  regs, spill     ptxas's register count and spill stores/loads (bytes per thread)
  LDL/STL in loop local-memory instructions inside a loop of the SASS (``benchmarks/sass.py``)
  fences in loop  GPU-wide MEMBAR / CCTL (L1 invalidation) inside a loop (what acq_rel atomics cost)
  CAS             compare-and-swap atomics (a CAS loop per element)
  smem            dynamic shared memory (bytes), checked against the arch's per-block limit
  MMA             tcgen05 | wgmma | mma.sync | none (FMA dots), from the SASS

Kernels: ``linear_logprobs`` fwd/bwd, ``linear_token_kl`` fwd/bwd (its reference head: the same shape),
the sampling head and its merge. Variants: dtype × kernel mode (backward: dh+dW, dh only, dW only; head:
Gumbel, greedy) × extras (bias, entropy, logit mean, target log-probs, low-precision dW): ``--level ci``
none and all extras per mode, ``default`` also each extra alone in the main mode, ``exhaustive`` every
subset. Shapes: N, V, D = 8192, 128256, 4096
(a Llama-3-8B head) and, for the sampling head, one decode batch per row-tile bucket. Prints one table,
appends the rows to ``benchmarks/results/kernel_resources.jsonl`` and, with ``--check``, exits 1 on a
compile error, a local-memory instruction or a GPU-wide fence inside a loop, a CAS atomic, or shared
memory over the limit.

    python benchmarks/kernel_resources.py                      # every variant, 3 archs
    python benchmarks/kernel_resources.py --archs 90 --kernels bwd --dtypes float32 -j 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ARCH_NAMES = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
# shared memory per block: 99 KB for the 80 column (it also serves sm_86/89/120), H100's and B200's 227 KB
SMEM_LIMIT = {80: 101376, 90: 232448, 100: 232448}
N, V, D = 8192, 128256, 4096
DTYPES = ("bfloat16", "float16", "float32", "tf32")  # tf32: fp32 inputs with allow_tf32=True
KERNELS = ("fwd", "bwd", "kl_fwd", "kl_bwd", "head", "merge")
NAMES = {"fwd": "linear_logprobs fwd", "bwd": "linear_logprobs bwd", "kl_fwd": "linear_token_kl fwd",
         "kl_bwd": "linear_token_kl bwd", "head": "sample_head", "merge": "sample_head merge"}
MODES = {"bwd": [(), ("dh_only",), ("dw_only",)], "kl_bwd": [(), ("dh_only",), ("dw_only",)],
         "head": [(), ("greedy",)]}  # what the kernel computes
FEATURES = {"fwd": ("bias", "entropy", "logit_mean"), "bwd": ("bias", "entropy", "low_dw"),
            "kl_fwd": ("bias", "logp"), "kl_bwd": ("bias", "logp", "low_dw"), "head": ("bias", "entropy"),
            "merge": ("entropy",)}  # optional extras, combined with every mode (kl: bias = both heads' biases)
LEVELS = ("ci", "default", "exhaustive")  # features per mode: none + all | none, each (main mode), all | every subset


@dataclass(frozen=True)
class Variant:
    kernel: str  # fwd | bwd | head | merge
    dtype: str  # bfloat16 | float16 | float32 | tf32
    arch: int
    flags: tuple[str, ...] = ()
    rows: int = N  # tokens (fwd/bwd) or decode batch B (head)

    @property
    def label(self) -> str:
        extra = f" B={self.rows}" if self.kernel == "head" else ""
        return f"{NAMES[self.kernel]}{extra} {'+'.join(self.flags) or 'base'}"


def flag_sets(kernel: str, level: str) -> list[tuple[str, ...]]:
    out = []
    for mode in MODES.get(kernel, [()]):
        names = [f for f in FEATURES[kernel] if not (f == "low_dw" and mode == ("dh_only",))]
        if level == "exhaustive":
            subsets = [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]
        elif level == "default":
            subsets = [(), *[(n,) for n in names], tuple(names)] if mode == () else [(), tuple(names)]
        else:
            subsets = [(), tuple(names)]
        out += [mode + c for c in subsets]
    return list(dict.fromkeys(out))


def head_batches(arch: int) -> list[int]:
    """One decode batch per row-tile bucket of the table (the bucket's largest B)."""
    from hypo_fast.kernels.launch import head_row_buckets

    return head_row_buckets(arch)


def variants(kernels, dtypes, archs, level: str = "default") -> list[Variant]:
    out = []
    for arch, kernel, dtype in itertools.product(archs, kernels, dtypes):
        if kernel == "merge" and dtype != dtypes[0]:
            continue  # works on fp32 partials whatever the input dtype
        rows = head_batches(arch) if kernel == "head" else [N]
        for flags in flag_sets(kernel, level):
            if dtype in ("float32", "tf32"):  # fp32 weights: dW is fp32 anyway
                flags = tuple(f for f in flags if f != "low_dw")
            out += [Variant(kernel, dtype, arch, flags, r) for r in rows]
    return list(dict.fromkeys(out))


def plan(v: Variant):
    """The launcher's own Launch for this variant, planned on meta tensors."""
    from hypo_fast.kernels import linear_logprobs, linear_token_kl, sample_head

    dtype = torch.float32 if v.dtype == "tf32" else getattr(torch, v.dtype)
    tf32 = v.dtype == "tf32"
    meta = lambda *shape, dt=dtype: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
    f = set(v.flags)
    weight, bias = meta(V, D), meta(V) if "bias" in f else None
    if v.kernel in ("head", "merge"):
        tiles, merge, _ = sample_head.sample_head_launch(
            meta(v.rows, D), weight, bias, arch=v.arch, greedy="greedy" in f, return_entropy="entropy" in f,
            allow_tf32=tf32)
        return tiles if v.kernel == "head" else merge
    hidden, targets = meta(v.rows, D), meta(v.rows, dt=torch.int64)
    rows = meta(v.rows, dt=torch.float32)
    if v.kernel in ("kl_fwd", "kl_bwd"):  # the reference: another head of the same shape
        heads = (hidden, weight, meta(v.rows, D), meta(V, D), targets, bias, meta(V) if "bias" in f else None)
        if v.kernel == "kl_fwd":
            launch, _ = linear_token_kl.fwd_launch(*heads, arch=v.arch, return_logprobs="logp" in f,
                                                   allow_tf32=tf32)
            return launch
        needs = (("dw_only" not in f), ("dh_only" not in f), True)
        launch, _ = linear_token_kl.bwd_launch(
            *heads, rows, rows, rows, rows if "logp" in f else None, arch=v.arch, needs_grad=needs,
            fp32_weight_grad="low_dw" not in f, allow_tf32=tf32)
        return launch
    if v.kernel == "fwd":
        launch, _ = linear_logprobs.fwd_launch(
            hidden, weight, targets, bias, arch=v.arch, return_entropy="entropy" in f,
            return_logit_mean="logit_mean" in f, allow_tf32=tf32)
        return launch
    entropy = rows if "entropy" in f else None
    needs = (("dw_only" not in f), ("dh_only" not in f), True)
    launch, _ = linear_logprobs.bwd_launch(
        hidden, weight, targets, bias, rows, rows, arch=v.arch, entropy=entropy, grad_entropy=entropy,
        needs_grad=needs, fp32_weight_grad="low_dw" not in f, allow_tf32=tf32)
    return launch


def bind(launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as ``kernel[grid](...)`` would compile them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constexprs)
    return fn._pack_args(backend, dict(launch.constexprs), bound, specialization, options)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_numbers(log: str) -> dict:
    grab = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None  # noqa: E731
    return {"regs": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads")}


def compile_variant(v: Variant) -> dict:
    """Compile one variant; a row with its resources (or its error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    import sass

    row = {"kernel": v.kernel, "dtype": v.dtype, "arch": ARCH_NAMES[v.arch], "flags": "+".join(v.flags) or "base",
           "rows": v.rows, "label": v.label}
    # a cache of its own: identical kernels (a flag the arch ignores) still run ptxas and are timed
    cache = tempfile.mkdtemp(prefix="variant_", dir=os.environ.get("HYPO_FAST_GATE_CACHE"))
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        launch = plan(v)
        c = launch.constexprs
        blocks = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_B", "BLOCK_V", "BLOCK_D", "BLOCK") if k in c)
        row["config"] = f"{blocks} w{c['num_warps']} s{c.get('num_stages', 3)}"
        row["grid"] = list(launch.grid)
        if v.kernel == "head":  # every row tile streams all of W: bytes of W read per decode step
            elem = 4 if v.dtype in ("float32", "tf32") else 2
            row["w_reads"] = launch.grid[0]
            row["w_bytes_per_step"] = launch.grid[0] * V * D * elem
        options, signature, constexprs, attrs = bind(launch, v.arch)
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", v.arch, 32), options=options.__dict__)
        row["compile_s"] = time.perf_counter() - start
        row.update(_ptxas_numbers(log.getvalue()))
        row["smem"] = kernel.metadata.shared
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        report = sass.analyse(text)
        row.update({k: val for k, val in asdict(report).items() if k != "instructions"})
        row["sass_instructions"] = report.instructions
        if row["regs"] is None:
            raise RuntimeError("no ptxas report in the compile log")
    except Exception as error:  # noqa: BLE001 -- a failed compile is a result, not a crash
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        row["error"] = f"{type(error).__name__}: {first_line}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return row


def problems(row: dict) -> list[str]:
    """Why a row fails the gate (empty when it passes)."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    out = []
    if row["local_in_loops"]:
        out.append(f"{row['local_in_loops']} local-memory instructions inside loops")
    if row["fences_in_loops"]:
        out.append(f"{row['fences_in_loops']} GPU-wide fences inside loops")
    if row["cas"]:
        out.append(f"{row['cas']} compare-and-swap atomics")
    limit = SMEM_LIMIT[int(row["arch"][3:].rstrip("a"))]
    if row["smem"] > limit:
        out.append(f"shared memory {row['smem']} B over the {limit} B limit")
    return out


def run(variant_list: list[Variant], jobs: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="hypo_fast_gate_") as cache:
        os.environ["HYPO_FAST_GATE_CACHE"] = cache  # fresh caches: compile times are real, ptxas always runs
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        if jobs <= 1:
            return [compile_variant(v) for v in variant_list]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(compile_variant, variant_list))


COLUMNS = [("arch", "arch", "s"), ("dtype", "dtype", "s"), ("label", "variant", "s"), ("config", "config", "s"),
           ("regs", "regs", "d"), ("spill_stores", "spill st B", "d"), ("spill_loads", "spill ld B", "d"),
           ("local_in_loops", "LDL/STL in loops", "d"), ("fences_in_loops", "fences in loops", "d"),
           ("cas", "CAS", "d"), ("smem", "smem B", "d"), ("mma", "MMA", "s"), ("w_reads", "W reads", "d"),
           ("compile_s", "compile s", ".1f"),
           ("error", "error", "s")]


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    return {
        "variants": len(rows), "compile_errors": len(rows) - len(ok),
        "spill_bytes_total": sum(r["spill_stores"] + r["spill_loads"] for r in ok),
        "local_in_loops_total": sum(r["local_in_loops"] for r in ok),
        "fences_in_loops_total": sum(r["fences_in_loops"] for r in ok),
        "cas_total": sum(r["cas"] for r in ok),
        "failing": sum(bool(problems(r)) for r in rows),
        "compile_s_total": sum(r.get("compile_s", 0.0) for r in rows),
    }


def main() -> None:
    from benchlib import add_results_options, append_rows, environment, print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", type=int, default=list(ARCH_NAMES), choices=list(ARCH_NAMES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--level", default="default", choices=LEVELS,
                        help="flag combinations per kernel mode: ci (none, all), default (none, each, all), "
                             "exhaustive (every subset)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="exit 1 if any variant fails the gate")
    parser.add_argument("--json", help="also write the rows and the summary to this file")
    parser.add_argument("--no-save", action="store_true", help="do not append rows to the results folder")
    add_results_options(parser)
    args = parser.parse_args()

    env = environment("cpu")
    import triton

    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    env["ptxas"] = ptxas[-1] if ptxas else None
    print(f"# compiled on {env['machine']} | triton {triton.__version__} | {env['ptxas']} | commit {env['commit']}")
    todo = variants(args.kernels, args.dtypes, args.archs, args.level)
    rows = run(todo, args.jobs)
    rows = [{**env, "bench": "kernel_resources", "N": N, "V": V, "D": D, **r} for r in rows]
    total = summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": total}, indent=1))
    print_table(rows, COLUMNS)
    print(json.dumps(total))
    for r in rows:
        for why in problems(r):
            print(f"FAIL {r['arch']} {r['dtype']} {r['label']}: {why}")
    if not args.no_save:
        print(f"rows appended to {append_rows('kernel_resources', rows, args.results_dir)}")
    if args.check and total["failing"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
