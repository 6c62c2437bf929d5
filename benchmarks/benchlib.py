"""Shared benchmark plumbing: one subprocess per case, honest peak memory, result rows.

Peak memory is measured on a cold run in a fresh process: on CUDA with the allocator's peak statistic,
on CPU with the kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident set just before the run. Times are medians of warm repeats in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hypo_fast.environment import package_versions

REPO = Path(__file__).resolve().parent.parent
RECORD_DIR = Path(__file__).resolve().parent / "results"  # committed rows: only with --record
RESULTS_DIR = RECORD_DIR  # the old name (report.py reads the committed rows from here)


def default_results_dir() -> Path:
    """Where a run's rows go unless ``--record`` asks for benchmarks/results/: outside the source tree."""
    return REPO / "runs" / "benchmarks"


def quiet_progress_bars(force: bool = False) -> None:
    """Progress bars only on a terminal: a log written to a file or a pipe gets no bar redraws."""
    if sys.stderr.isatty() and not force:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    for module, call in (("datasets", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar")):
        try:
            getattr(__import__(module, fromlist=[call]), call)()
        except (ImportError, AttributeError):
            pass


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    versions = package_versions()
    return {
        "machine": machine_name(device), "device": device, "commit": commit,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "transformers": versions["transformers"], "trl": versions["trl"], "deepspeed": versions["deepspeed"],
        "datasets": versions["datasets"], "liger_kernel": versions["liger-kernel"], "peft": versions["peft"],
        "tokenizers": versions["tokenizers"], "accelerate": versions["accelerate"], "kernels": versions["kernels"],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Context manager: ``.extra`` = peak bytes above the level at entry (CUDA allocator or CPU RSS)."""

    def __init__(self, device: str):
        self.device, self.extra = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = _rss_bytes("VmHWM") - self.base
        return False


class PhasePeaks:
    """Peak memory (bytes) of named, possibly nested phases of one process, without sampling.

    CPU: the kernel's resident-set high-water mark ``VmHWM`` is read and reset (``/proc/self/clear_refs``)
    at every phase boundary and folded into every phase open at that moment, so each phase gets its own
    exact peak and ``process_peak`` the peak since the tracker started. CUDA: the same with the caching
    allocator's peak statistics (``max_memory_allocated``; ``reserved_peak`` tracks
    ``max_memory_reserved``, what the allocator holds from the driver). ``levels`` holds the current
    value at each boundary (``name:start`` / ``name:end``) and at each ``mark``.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.open: list[str] = []
        self.peaks: dict[str, int] = {}
        self.levels: dict[str, int] = {}
        self.reserved_peak = 0
        self.seconds: dict[str, float] = {}  # wall time per phase (summed over its calls)
        self._started: dict[str, float] = {}
        self.process_peak = self._peak()
        self._reset()

    def _peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.reserved_peak = max(self.reserved_peak, torch.cuda.max_memory_reserved())
            return torch.cuda.max_memory_allocated()
        return _rss_bytes("VmHWM")

    def _current(self) -> int:
        return torch.cuda.memory_allocated() if self.device == "cuda" else _rss_bytes("VmRSS")

    def _reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def _fold(self) -> int:
        peak = self._peak()
        self.process_peak = max(self.process_peak, peak)
        for name in self.open:
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
        self._reset()
        return self._current()

    def mark(self, name: str) -> int:
        self.levels[name] = level = self._fold()
        return level

    def enter(self, name: str) -> None:
        self.levels[f"{name}:start"] = level = self._fold()
        self.open.append(name)
        self.peaks[name] = max(self.peaks.get(name, 0), level)
        self._started[name] = time.perf_counter()

    def exit(self, name: str) -> None:
        if name in self.open:
            self.levels[f"{name}:end"] = self._fold()
            self.open.remove(name)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._started.pop(name)

    def wrap(self, name: str, fn):
        """``fn`` with each call run as phase ``name``."""
        def wrapped(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(name)
        return wrapped


def median_time(fn, repeats: int, device: str) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` warm calls."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


# hypo_fast methods shared by the op benchmarks → the ``impl`` each one asks for
HYPO_FAST_IMPLS = {"ours": "auto", "chunked": "torch"}


def resolved_impl(method: str, device) -> str | None:
    """Which backend a hypo_fast method actually ran (recorded in its row); None for baselines."""
    if method not in HYPO_FAST_IMPLS:
        return None
    from hypo_fast.ops.backends import resolve_impl

    return resolve_impl(HYPO_FAST_IMPLS[method], torch.device(device))


def run_worker(script: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --worker args`` in a fresh interpreter and parse the JSON line it prints last."""
    proc = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_methods(script: str, methods: list[str], case: dict, repeats: int, baseline: str,
                    flops: dict[str, float], env: dict) -> list[dict]:
    """Run each method (and a plain matmul of the case's N×V×D) in its own process; rows with ratios.

    ``case`` holds N, V, D, dtype, device plus any extra settings; ``flops[method]`` is the work it does
    (for GFLOP/s; the matmul rate is measured on 2NVD).
    """
    keys = sorted(case)
    worker_args = [f"{k}={case[k]}" for k in keys] + [f"repeats={repeats}"]
    mm = run_worker(script, ["matmul", *worker_args])
    N, V, D = case["N"], case["V"], case["D"]
    matmul_gflops = 2 * N * V * D / mm["time_s"] / 1e9 if "time_s" in mm else None
    results = {m: run_worker(script, [m, *worker_args]) for m in methods}
    base = results.get(baseline, {})
    rows = []
    for method, res in results.items():
        row = {**env, **case, "method": method, "repeats": repeats, "matmul_gflops": matmul_gflops, **res}
        if "time_s" in res:
            row["gflops"] = flops[method] / res["time_s"] / 1e9
            row["pct_of_matmul"] = 100 * row["gflops"] / matmul_gflops if matmul_gflops else None
            row["peak_extra_mb"] = res["peak_extra_bytes"] / 2**20
            if "time_s" in base:
                row[f"time_vs_{baseline}"] = res["time_s"] / base["time_s"]
                row[f"mem_vs_{baseline}"] = res["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
        rows.append(row)
    return rows


def parse_worker_args(args: list[str]) -> tuple[str, dict, int]:
    """``[method, k=v, ..., repeats=R]`` → (method, case, repeats); numbers become ints."""
    method, *pairs = args
    case = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        case[key] = int(value) if value.lstrip("-").isdigit() else value
    return method, case, case.pop("repeats")


def time_and_memory(step, device: str, repeats: int) -> dict:
    """Cold run for the peak extra memory, one warm-up, then the median of ``repeats`` timed runs."""
    with PeakMemory(device) as mem:
        step()
    step()
    return {"time_s": median_time(step, repeats, device), "peak_extra_bytes": mem.extra}


def add_results_options(parser: argparse.ArgumentParser) -> None:
    """``--results-dir DIR`` (default: runs/benchmarks/, outside the source tree) and ``--record`` (the
    committed benchmarks/results/); both set ``args.results_dir``, None meaning the default."""
    parser.add_argument("--results-dir", default=None,
                        help="where rows are appended (default: runs/benchmarks/, outside the source tree)")
    parser.add_argument("--record", action="store_const", dest="results_dir", const=str(RECORD_DIR),
                        help="append the rows to benchmarks/results/ (the committed record) instead")


def bench_arguments(doc: str, methods: list[str] | None = None) -> argparse.ArgumentParser:
    """The options every benchmark script shares (``--worker`` is how it re-invokes itself per case)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    if methods is not None:
        parser.add_argument("--methods", nargs="*", default=methods)
    parser.add_argument("--no-save", action="store_true", help="do not append rows to the results folder")
    add_results_options(parser)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser


def start_run(args: argparse.Namespace) -> dict:
    """Check the device, print the run's header line, return the environment recorded in every row."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    quiet_progress_bars()
    env = environment(args.device)
    print(f"# {env['machine']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    return env


def finish_run(name: str, rows: list[dict], columns: list[tuple[str, str, str]], args: argparse.Namespace) -> None:
    """Print the table and, unless ``--no-save``, append the rows to ``RESULTS/name.jsonl``."""
    print_table(rows, columns)
    if not args.no_save:
        print(f"rows appended to {append_rows(name, rows, args.results_dir)}")


def serve_worker(args: argparse.Namespace, worker) -> bool:
    """In a ``--worker`` process: run the one case and print its JSON result."""
    if not args.worker:
        return False
    quiet_progress_bars()
    print(json.dumps(worker(*parse_worker_args(args.worker))))
    return True


def append_rows(name: str, rows: list[dict], folder: Path | None = None) -> Path:
    folder = Path(folder) if folder is not None else default_results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


class HostReads:
    """Counts the device→host reads a block of code makes (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``,
    ``float()``, ``int()`` of a tensor): on a GPU each is a host sync that stalls the launch queue. On a CPU
    run nothing stalls, but the count is the same code path's, so it says how many syncs a GPU run would
    make. ``ours`` counts the reads made by hypo_fast's own code; ``total`` includes libraries (DeepSpeed).
    """

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self):
        self.ours = self.total = 0
        self._saved = {}

    def __enter__(self):
        import sys

        import torch

        package = str(Path(__file__).resolve().parents[1] / "hypo_fast")
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counting(tensor, *args, _original=original, **kwargs):
                self.total += 1
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(package) or "/hypo_fast/" in caller and "site-packages" not in caller:
                    self.ours += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counting)
        return self

    def __exit__(self, *exc):
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def head_op_main(doc: str, script: str, bench: str, worker, *, methods: dict[str, list[str]],
                 shapes: dict[str, list[tuple[int, int, int]]], dtypes: dict[str, list[str]],
                 flops_per_nvd: dict[str, int]) -> None:
    """``main`` of a benchmark of an op on ``[N, D]`` hidden states and a ``[V, D]`` head: every method at
    every (dtype, N, V, D), in its own process, against ``naive``; ``methods``, ``shapes`` and ``dtypes``
    are per device, and a method's FLOPs are ``flops_per_nvd[method]·N·V·D``."""
    parser = bench_arguments(doc, [])
    parser.add_argument("--shapes", nargs="*", help="N,V,D triples (default: per device)")
    parser.add_argument("--dtypes", nargs="*", help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 CPU, 10 CUDA)")
    args = parser.parse_args()
    if serve_worker(args, worker):
        return
    device = args.device
    chosen = args.methods or methods[device]
    cases = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else shapes[device]
    repeats = args.repeats or (3 if device == "cpu" else 10)
    env = start_run(args)
    rows = []
    for dtype in args.dtypes or dtypes[device]:
        for N, V, D in cases:
            case = {"bench": bench, "N": N, "V": V, "D": D, "dtype": dtype, "device": device}
            flops = {m: flops_per_nvd[m] * N * V * D for m in chosen}
            rows += compare_methods(script, chosen, case, repeats, "naive", flops, env)
    finish_run(f"bench_{bench}", rows, [
        ("dtype", "dtype", "s"), ("N", "N", "d"), ("V", "V", "d"), ("D", "D", "d"), ("method", "method", "s"),
        ("impl", "impl", "s"), ("time_s", "time s", ".3f"), ("time_vs_naive", "×naive", ".2f"),
        ("peak_extra_mb", "extra MiB", ".0f"), ("mem_vs_naive", "mem×naive", ".3f"), ("gflops", "GFLOP/s", ".0f"),
        ("pct_of_matmul", "%matmul", ".0f"), ("error", "error", "s")], args)
