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
                    ("time/policy", "policy s", ".2f"), ("grad_ckpt_used", "grad. ckpt", ""),
                    ("lm_head", "log-probs by", "s")], ("speed_vs_trl", "mem_vs_trl")),
    "bench_generate": ("Sampling throughput", "hf_generate",
                       [("V", "V", "d"), ("D", "D", "d"), ("layers", "layers", "d"), ("method", "method", "s"),
                        ("time_s", "time s", ".3f"), ("tokens_per_s", "tokens/s", ".0f"), ("speed_vs_hf", "× HF", ".2f"),
                        ("peak_extra_mb", "extra MiB", ".0f")], ("speed_vs_hf",)),
    "memory_8b": ("Memory: one HyPO step's measured peak against the estimator", None,
                  [("shape", "shape", "s"), ("mode", "mode", "s"), ("seq", "seq", "d"), ("dtype", "dtype", "s"),
                   ("measured_mb", "measured MiB", ".0f"), ("estimate_mb", "estimate MiB", ".0f"),
                   ("ratio", "measured / estimate", ".2f")], ()),
    "memory_8b#plan": ("Memory plan: estimated GB per GPU, one HyPO step on Llama-3-8B shapes (bf16, seq 2048, "
                       "1 pair + 1 prompt × k=2, gradient checkpointing)", None,
                       [("mode", "mode", "s"), ("gpus", "GPUs", "d"), ("zero", "ZeRO", "d"), ("offload", "offload", "s"),
                        ("weights_gb", "weights", ".1f"), ("grads_gb", "grads", ".1f"), ("optimizer_gb", "optimizer", ".1f"),
                        ("reference_gb", "reference", ".1f"), ("activations_gb", "activations", ".1f"),
                        ("kv_cache_gb", "KV cache", ".2f"), ("generation_gather_gb", "ZeRO-3 gather for sampling", ".1f"),
                        ("total_gb", "total", ".1f")], ()),
}
KEEP = {  # which rows of a shared file each table shows
    "memory_8b": lambda r: "measured_mb" in r or "error" in r,
    "memory_8b#plan": lambda r: "total_gb" in r and r["gpus"] in (1, 8),
}


def _fmt(value, spec):
    if value is None:
        return "–"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def latest_runs(path: Path) -> dict[str, list[dict]]:
    """machine → rows of its latest invocation."""
    by_machine: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_machine[row.get("machine", "?")][row.get("date", "")].append(row)
    return {m: runs[max(runs)] for m, runs in by_machine.items()}


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


SETTING_TITLES = {("partial", "worse"): "partial coverage, uncovered responses worse",
                  ("partial", "better"): "partial coverage, uncovered responses better",
                  ("global-worse", "worse"): "global coverage (control), uncovered responses worse",
                  ("global-better", "better"): "global coverage (control), uncovered responses better"}


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
             f"{first.get('machine')}; torch {first.get('torch')}, commit {first.get('commit')}, {first.get('date')}; "
             f"seeds {seeds}. Design, hypotheses and decision rules: the docstring of `benchmarks/coverage.py`, "
             "committed before the first run. ± is the standard error over seeds; [a, b] a 95% t-interval of the "
             "per-seed paired difference.", "", "Manipulation check (partial coverage: does DPO put more mass on "
             "responses the pairs never show than the reference does?):", ""]
    for r in rows:
        if r.get("kind") == "manipulation_check":
            mean, se, low, high = r["diff"]
            lines.append(f"- {r['policy']}: DPO − reference not-covered mass {mean:+.3f} ± {se:.3f} "
                         f"[{low:+.3f}, {high:+.3f}]: **{'PASS' if r['pass'] else 'FAIL'}**")
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
        for machine, rows in latest_runs(path).items():
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
            image = _plot(f"{name.split('#')[0]}-{slug}", title, rows, plot_keys, machine)
            if image:
                lines += ["", f"![{title}]({image})"]
            lines.append("")
    if (RESULTS / "coverage.jsonl").exists():
        lines += coverage_section(RESULTS / "coverage.jsonl")
    (DOCS / "benchmarks.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
