"""Regenerate docs/benchmarks.md (tables) and docs/*.png (plots) from benchmarks/results/*.jsonl.

    python benchmarks/report.py

For every benchmark and machine it shows the latest run (rows of one invocation share its start time);
older runs stay in the JSONL files.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS, DOCS = REPO / "benchmarks" / "results", REPO / "docs"

# per benchmark: (title, baseline method, columns (key, header, format), ratio keys to plot)
SPECS = {
    "bench_linear_logprobs": ("Per-token log-probs from hidden states, forward + backward", "naive",
                              [("N", "N", "d"), ("V", "V", "d"), ("D", "D", "d"), ("dtype", "dtype", "s"),
                               ("method", "method", "s"), ("impl", "impl", "s"), ("time_s", "time s", ".3f"),
                               ("time_vs_naive", "× naive", ".2f"), ("peak_extra_mb", "extra MiB", ".0f"),
                               ("mem_vs_naive", "mem × naive", ".3f"), ("pct_of_matmul", "% matmul", ".0f")],
                              ("time_vs_naive", "mem_vs_naive")),
    "bench_linear_token_kl": ("Exact per-token KL between two LM heads (kl_loss: exact_token), forward + backward",
                              "naive",
                              [("N", "N", "d"), ("V", "V", "d"), ("D", "D", "d"), ("dtype", "dtype", "s"),
                               ("method", "method", "s"), ("impl", "impl", "s"), ("time_s", "time s", ".3f"),
                               ("time_vs_naive", "× naive", ".2f"), ("peak_extra_mb", "extra MiB", ".0f"),
                               ("mem_vs_naive", "mem × naive", ".3f")], ("time_vs_naive", "mem_vs_naive")),
    "kl_estimator_variance": ("Gradient variance of the online term: exact_token against RLOO at equal k", None,
                              [("setting", "setting", "s"), ("k", "k", "d"), ("temperature", "τ", ".1f"),
                               ("draws", "draws", "d"), ("var_per_sample_rloo", "variance per sample, RLOO", ".4g"),
                               ("var_per_sample_exact_token", "variance per sample, exact_token", ".4g"),
                               ("variance_ratio", "exact_token / RLOO", ".3f"),
                               ("max_abs_z_mean_difference", "max |z| of the mean difference", ".2f")], ()),
    "bench_sample_head": ("Sampling head: one decode step's draw and log-prob from hidden states", "naive",
                          [("N", "B", "d"), ("V", "V", "d"), ("D", "D", "d"), ("dtype", "dtype", "s"),
                           ("method", "method", "s"), ("impl", "impl", "s"), ("time_s", "time s", ".4f"),
                           ("time_vs_naive", "× naive", ".2f"), ("peak_extra_mb", "extra MiB", ".1f"),
                           ("mem_vs_naive", "mem × naive", ".3f")], ("time_vs_naive",)),
    "bench_dpo_loss": ("DPO loss from hidden states (policy + reference), forward + backward", "liger",
                       [("pairs", "pairs", "d"), ("T", "T", "d"), ("V", "V", "d"), ("D", "D", "d"),
                        ("method", "method", "s"), ("time_s", "time s", ".3f"), ("time_vs_liger", "× Liger", ".2f"),
                        ("peak_extra_mb", "extra MiB", ".0f"), ("mem_vs_liger", "mem × Liger", ".3f"),
                        ("pct_of_matmul", "% matmul", ".0f")], ("time_vs_liger", "mem_vs_liger")),
    "bench_step": ("End-to-end training step", "trl",
                   [("V", "V", "d"), ("D", "D", "d"), ("seq_len", "seq", "d"), ("method", "method", "s"),
                    ("step_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ".0f"), ("speed_vs_trl", "× TRL speed", ".2f"),
                    ("peak_extra_mb", "extra MiB", ".0f"), ("mem_vs_trl", "mem × TRL", ".2f"),
                    ("time/sampling", "sampling s", ".2f"), ("time/reference", "reference s", ".2f"),
                    ("time/policy", "policy s", ".2f"), ("cost_vs_hypo_dpo", "× DPO step", ".2f"),
                    ("host_reads_hypo_fast", "host reads", "d"), ("host_reads_gpu_path", "host reads, GPU interval", "d"),
                    ("grad_ckpt_used", "grad. ckpt", ""),
                    ("lm_head", "log-probs by", "s")], ("speed_vs_trl", "mem_vs_trl")),
    "bench_generate": ("Sampling throughput", "hf_generate",
                       [("V", "V", "d"), ("D", "D", "d"), ("layers", "layers", "d"), ("method", "method", "s"),
                        ("time_s", "time s", ".3f"), ("tokens_per_s", "tokens/s", ".0f"), ("speed_vs_hf", "× HF", ".2f"),
                        ("peak_extra_mb", "extra MiB", ".0f")], ("speed_vs_hf",)),
}
KEEP = {"kl_estimator_variance": lambda r: "variance_ratio" in r}  # which rows of a shared file each table shows (memory_8b has its own sections below)


def _fmt(value, spec):
    if value is None:
        return "–"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def latest_runs(path: Path, baseline: str | None = None) -> list[tuple[str, list[dict]]]:
    """Per machine: its latest invocation that ran ``baseline`` (any, without one), then every later
    invocation (runs of a subset of the methods), each as its own table: no table mixes runs."""
    by_machine: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_machine[row.get("machine", "?")][row.get("date", "")].append(row)
    out = []
    for machine, runs in by_machine.items():
        dates = sorted(runs)
        full = [d for d in dates if baseline is None or any(r.get("method") == baseline for r in runs[d])]
        start = full[-1] if full else dates[-1]
        out += [(machine, runs[d]) for d in dates if d >= start]
    return out


def _plot(name: str, title: str, rows: list[dict], keys: tuple[str, ...], machine: str) -> str | None:
    rows = [r for r in rows if all(k in r for k in keys)]
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\n" + ",".join(str(r[k]) for k in ("N", "T", "V", "D", "seq_len") if k in r) for r in rows]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    axes = axes if len(keys) > 1 else [axes]
    for ax, key in zip(axes, keys):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(key.replace("_", " "), fontsize=9)
    fig.suptitle(f"{title}\n{machine}", fontsize=9)
    fig.tight_layout()
    file = f"{name}.png"
    fig.savefig(DOCS / file, dpi=110)
    plt.close(fig)
    return file


def SHAPE_ORDER(row: dict) -> float:  # noqa: N802  (a sort key)
    import memory_8b

    return memory_8b.SHAPES[row["shape"]].params()


def memory_sections() -> list[str]:
    """The memory plan: every measured cell beside the current estimator, and the latest 8B plan table."""
    import memory_8b

    path = RESULTS / "memory_8b.jsonl"
    if not path.exists():
        return []
    lines = []
    calibrated = memory_8b.calibrate(memory_8b.measured_rows(RESULTS))
    columns = [("cell", "cell", "s"), ("params_b", "params (B)", ".2f"), ("malloc", "malloc", "s"),
               ("measured_mib", "measured MiB", ".0f"), ("estimate_mib", "estimated MiB", ".0f"),
               ("ratio", "measured / estimated", ".2f"), ("measured_phase", "measured peak in", "s"),
               ("peak_phase", "estimated peak in", "s")]
    for machine in sorted({c["machine"] for c in calibrated}):
        rows = sorted((c for c in calibrated if c["machine"] == machine),
                      key=lambda c: (c["mode"], c["params_b"], c["seq"], c["malloc"] or ""))
        lines += ["## Memory: one training step's measured peak per rank against the estimator", "",
                  f"{machine}; hypo_fast's trainer, one step of each cell (`python benchmarks/memory_8b.py "
                  "--measure CELL`), the estimate of the current `memory_8b.py`; CPU peaks are the resident set's "
                  "high-water mark (malloc `mmap`: glibc returns freed tensors, so it tracks live memory; `default`: "
                  "glibc as shipped)", "",
                  "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
        for c in rows:
            lines.append("| " + " | ".join(_fmt(c.get(k), f) if c.get(k) is not None else
                                          (c.get("error") or "–") if k == "measured_mib" else "–"
                                          for k, _, f in columns) + " |")
        lines.append("")
        for mode in ("lora", "full"):
            band = memory_8b.calibration_band(rows, mode, rows[0]["device"])
            if band:
                lines.append(f"- {mode}: measured / estimated spans {band[0]:.2f}–{band[1]:.2f} (malloc `mmap`)")
        default = [c["ratio"] for c in rows if c.get("ratio") and c["malloc"] == "default"]
        if default:
            lines.append(f"- glibc's default malloc: measured / estimated {min(default):.2f}–{max(default):.2f}: the "
                         "resident set keeps freed memory (arenas, fragmentation) that the estimate, which counts live "
                         "tensors, leaves out")
        measured = [r for r in memory_8b.measured_rows(RESULTS) if r["machine"] == machine]
        parts = memory_8b.breakdown_rows(sorted(measured, key=lambda r: (r["mode"], SHAPE_ORDER(r), r["seq"])))
        keys = [k for k in memory_8b.BREAKDOWN if any(k in p for p in parts)]
        lines += ["", "Breakdown, MiB measured / estimated, of the rank with the highest peak:", "",
                  "| cell | malloc | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
        for p in parts:
            lines.append(f"| {p['cell']} | {p['malloc']} | " + " | ".join(p.get(k, "–") for k in keys) + " |")
        lines += ["", "How each measured number is obtained (phase boundaries are the trainer's own calls, wrapped "
                  "in the measuring process; RSS high-water marks are reset at each boundary):", ""]
        lines += [f"- {k}: {memory_8b.BREAKDOWN[k]}" for k in keys]
        lines += ["", "What these cells check in the estimator:", ""] + [f"- {x}" for x in memory_8b.CHECKED_ON_CPU]
        lines += ["", "What they cannot (only a GPU can: `bash benchmarks/gpu_suite.sh OUT memory`):", ""]
        lines += [f"- {x}" for x in memory_8b.UNTESTED_ON_GPU]
        lines.append("")
    plans = [json.loads(line) for line in path.read_text().splitlines()]
    plans = [r for r in plans if r.get("kind") == "plan"]
    if plans:
        latest = max(r["date"] for r in plans)
        rows = [r for r in plans if r["date"] == latest]
        columns = [("mode", "mode", "s"), ("gpus", "GPUs", "d"), ("zero", "ZeRO", "d"), ("offload", "offload", "s"),
                   ("peak_gb", "peak GiB (flash-attn)", ".1f"), ("low_gb", "band low", ".1f"),
                   ("high_gb", "band high", ".1f"), ("peak_sdpa_gb", "peak GiB (SDPA)", ".1f"),
                   ("peak_phase", "peak in", "s"), ("host_gb", "host GiB per node", ".0f")]
        lines += ["## Memory plan: estimated peak per GPU, one HyPO step on Llama-3-8B", "",
                  f"commit {rows[0].get('commit')}, {latest}; bf16, gradient checkpointing, 1 pair + 1 prompt × k = 2 "
                  "per GPU, every sequence 2048 tokens; band = peak × the spread of measured/estimated over the "
                  "calibration cells of the same mode; add ~0.5 GiB of CUDA context and the allocator's fragmentation",
                  "", "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |")
        lines.append("")
    return lines
SETTING_TITLES = {("partial", "worse"): "partial coverage, uncovered responses worse",
                  ("partial", "better"): "partial coverage, uncovered responses better",
                  ("global-worse", "worse"): "global coverage (control), uncovered responses worse",
                  ("global-better", "better"): "global coverage (control), uncovered responses better"}


def _paired_interval(policy_rows: list[dict], policy: str, key: str) -> tuple[float, float, float, float]:
    """Per-seed ``policy − reference`` of one mass on the partial-coverage data, as coverage.py pairs them."""
    from coverage_stats import interval

    ours = {r["seed"]: r[key] for r in policy_rows if r["policy"] == policy and r["data"] == "partial"}
    ref = {r["seed"]: r[key] for r in policy_rows if r["policy"] == "reference"}
    return interval([ours[s] - ref[s] for s in sorted(ours) if s in ref])


def coverage_valid_section(path: Path) -> list[str]:
    """The latest full run of the second task (``coverage.py --task valid``): its own report, and its plot."""
    import coverage_valid

    try:
        rows = coverage_valid.latest_rows(path, quick=False)
    except SystemExit:
        return []
    seeds, orders = sorted({r["seed"] for r in rows}), sorted({r["order"] for r in rows if r["order"] is not None})
    first = rows[0]
    lines = ["## Coverage experiment, second task: every response valid", "",
             f"{first.get('machine')}; torch {first.get('torch')}, transformers {first.get('transformers')}, trl "
             f"{first.get('trl')}, deepspeed {first.get('deepspeed')}, commit {first.get('commit')}, {first.get('date')}. "
             "Design, predictions and decision rules: the docstring of `benchmarks/coverage.py`, committed before "
             "the first run. The report as `benchmarks/coverage_valid.py` prints it:", "", "```",
             coverage_valid.report(coverage_valid.analyse(rows), seeds, orders), "```"]
    image = path.parent / "coverage_valid_frontier.png"
    if image.exists():
        (DOCS / image.name).write_bytes(image.read_bytes())
        lines += ["", f"![reward against KL, every response valid, mean ± SE over seeds]({image.name})"]
    return lines + [""]


def coverage_section(path: Path) -> list[str]:
    """The latest full run of benchmarks/coverage.py: the check, a table per setting, the hypotheses, the plot."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if not row.get("quick"):
            runs[row.get("date", "")].append(row)
    if not runs:
        return []
    rows = runs[max(runs)]
    first = rows[0]
    seeds = next((r["seeds"] for r in rows if "seeds" in r), [])
    pm = lambda v, d=3: "–" if v is None else f"{v[0]:+.{d}f} ± {v[1]:.{d}f}"  # noqa: E731
    lines = ["## Coverage experiment: HyPO vs DPO under partial and global coverage", "",
             f"{first.get('machine')}; torch {first.get('torch')}, transformers {first.get('transformers')}, deepspeed "
             f"{first.get('deepspeed')}, commit {first.get('commit')}, {first.get('date')}; "
             f"seeds {seeds}. Design, hypotheses and decision rules: the docstring of `benchmarks/coverage.py`, "
             "committed before the first run. ± is the standard error over seeds; [a, b] a 95% t-interval of the "
             "per-seed paired difference.", "", "Manipulation check (partial coverage: does DPO put more mass on "
             "responses the pairs never show than the reference does?):", ""]
    policy_rows = [r for r in rows if r.get("kind") == "policy"]
    for r in rows:
        if r.get("kind") == "manipulation_check":
            mean, se, low, high = r["diff"]
            lines.append(f"- {r['policy']}: DPO − reference not-covered mass {mean:+.3f} ± {se:.3f} "
                         f"[{low:+.3f}, {high:+.3f}]: **{'PASS' if r['pass'] else 'FAIL'}**")
            for key, label in (("mass_uncovered", "valid uncovered templates"), ("mass_off", "malformed strings")):
                mean, se, low, high = _paired_interval(policy_rows, r["policy"], key)
                lines.append(f"  - of which {label}: {mean:+.3f} ± {se:.3f} [{low:+.3f}, {high:+.3f}]")
    for (data, scenario), title in SETTING_TITLES.items():
        table = [r for r in rows if r.get("kind") == "summary" and r["data"] == data and r["scenario"] == scenario]
        if not table:
            continue
        lines += ["", f"### {title}", "", "| policy | gold reward | per seed | KL(π‖π_ref) | not covered | "
                  "uncovered templates / off-template | HyPO − DPO (same β), reward [95% CI] |", "|---|---|---|---|---|---|---|"]
        for r in table:
            vs = r.get("reward_vs_dpo")
            paired = f"{vs[0]:+.3f} ± {vs[1]:.3f} [{vs[2]:+.3f}, {vs[3]:+.3f}]" if vs else ""
            lines.append(f"| {r['policy']} | {pm(r.get('reward'))} | {' '.join(f'{v:+.2f}' for v in r['reward_per_seed'])} "
                         f"| {pm(r.get('kl'), 2)} | {pm(r.get('mass_not_covered'))} | "
                         f"{r['mass_uncovered'][0]:.3f} / {r['mass_off'][0]:.3f} | {paired} |")
    hypotheses = [r for r in rows if r.get("kind") == "hypothesis"]
    if hypotheses:
        lines += ["", "Hypotheses (Δ = HyPO − DPO at the same β, gold reward; H3: Δ_global − Δ_partial, scenario worse):", ""]
        for h in hypotheses:
            mean, se, low, high = h["delta"]
            lines.append(f"- {h['hypothesis']} {h['cell']}: {mean:+.3f} ± {se:.3f} [{low:+.3f}, {high:+.3f}] → "
                         f"{h['verdict']}" + ("" if h["check_passed"] else " (manipulation check failed at this β)"))
    image = path.parent / "coverage_frontier.png"
    if image.exists():
        (DOCS / "coverage_frontier.png").write_bytes(image.read_bytes())
        lines += ["", "![reward against KL, mean ± SE over seeds](coverage_frontier.png)"]
    return lines + [""]


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    lines = ["# Benchmarks", "", "Generated by `python benchmarks/report.py` from `benchmarks/results/*.jsonl` "
             "(the latest run per benchmark and machine). Ratios compare against a baseline measured in the same run.",
             ""]
    for name, (title, baseline, columns, plot_keys) in SPECS.items():
        path = RESULTS / f"{name.split('#')[0]}.jsonl"
        if not path.exists():
            continue
        keep = KEEP.get(name, lambda r: "method" in r)
        seen: dict[str, int] = {}
        for machine, rows in latest_runs(path, baseline):
            rows = [r for r in rows if keep(r)]
            if not rows:
                continue
            first = rows[0]
            lines += [f"## {title}", "", f"{machine}; torch {first.get('torch')}, triton {first.get('triton')}, "
                      f"commit {first.get('commit')}, {first.get('date')}" + (f"; baseline: {baseline}" if baseline else ""),
                      "", "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
            for r in rows:
                cells = [r.get("error", "–") if k == "time_s" and "error" in r else _fmt(r.get(k), f) for k, _, f in columns]
                lines.append("| " + " | ".join(cells) + " |")
            slug = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")[:40]
            seen[slug] = seen.get(slug, 0) + 1
            slug += f"-{seen[slug]}" if seen[slug] > 1 else ""  # a later run on the same machine: its own plot
            image = _plot(f"{name.split('#')[0]}-{slug}", title, rows, plot_keys, machine)
            if image:
                lines += ["", f"![{title}]({image})"]
            lines.append("")
    lines += memory_sections()
    if (RESULTS / "coverage.jsonl").exists():
        lines += coverage_section(RESULTS / "coverage.jsonl")
    if (RESULTS / "coverage_valid.jsonl").exists():
        lines += coverage_valid_section(RESULTS / "coverage_valid.jsonl")
    (DOCS / "benchmarks.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
