"""The coverage experiment's second task (``python benchmarks/coverage.py --task valid``): run, analysis,
report and plot. The design, checks and predictions are declared in ``benchmarks/coverage.py``'s docstring."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchlib import append_rows
from coverage_stats import interval, mean_se

GRID = [(0.1, 0.0), (0.5, 0.0), (0.1, 0.02), (0.1, 0.1), (0.5, 0.02), (0.5, 0.1)]  # (β, λ); λ = 0 is DPO
QUICK_GRID = [(0.1, 0.0), (0.1, 0.1)]
SEEDS, QUICK_SEEDS = [0, 1, 2, 3, 4], [0, 1]
ORDERS, QUICK_ORDERS = (0, 1), (0,)
SCENARIOS = ("consistent", "adversarial")
METRICS = ("reward_consistent", "reward_adversarial", "kl", "mass_covered", "mass_uncovered", "mass_malformed")
PREMISE_MALFORMED = 0.01


def run(seeds, cells, orders, work: Path, results: Path, env: dict, name: str) -> list[dict]:
    """Every seed in turn; each seed's rows are appended to ``results/name.jsonl`` as soon as it is done."""
    from hypo_fast.examples import coverage_valid_task as vt

    rows = []
    for seed in seeds:
        seed_rows = [{**env, "kind": "policy", **row} for row in vt.run_seed(seed, cells, work, orders)]
        append_rows(name, seed_rows, results)
        rows += seed_rows
    return rows


# ---- analysis ----------------------------------------------------------------------------------------

def per_seed(rows: list[dict], policy: str, key: str) -> dict[int, float]:
    """A policy's metric per seed: the mean over that seed's training orders."""
    values: dict[int, list[float]] = {}
    for r in rows:
        if r["policy"] == policy:
            values.setdefault(r["seed"], []).append(r[key])
    return {seed: sum(v) / len(v) for seed, v in sorted(values.items())}


def order_spread(rows: list[dict], policy: str, key: str) -> tuple[float, float] | None:
    """Mean and largest |order 0 − order 1| of a metric over the seeds with two orders."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["policy"] == policy and r["order"] is not None:
            by_seed.setdefault(r["seed"], {})[r["order"]] = r[key]
    gaps = [abs(v[0] - v[1]) for v in by_seed.values() if 0 in v and 1 in v]
    return (sum(gaps) / len(gaps), max(gaps)) if gaps else None


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[s] - b[s] for s in a if s in b]


def policies_in(rows: list[dict]) -> list[str]:
    seen = []
    for r in rows:
        if r["policy"] not in seen:
            seen.append(r["policy"])
    return seen


def p_verdict(prediction: str, low: float, high: float) -> str:
    """The declared verdicts: P1/P3 expect Δ ≤ 0 (DPO ≥ HyPO), P2/P4 expect Δ > 0 (HyPO > DPO)."""
    if prediction in ("P1", "P3"):
        return "confirmed" if high < 0 else "FAILED" if low > 0 else "not contradicted"
    return "confirmed" if low > 0 else "FAILED" if high < 0 else "not confirmed"


def analyse(rows: list[dict]) -> dict:
    rows = [r for r in rows if r.get("kind", "policy") == "policy"]
    names = policies_in(rows)
    table = {}
    for policy in names:
        entry = {}
        for key in METRICS:
            values = per_seed(rows, policy, key)
            entry[key] = {"per_seed": values, "mean_se": mean_se(list(values.values())),
                          "order_spread": order_spread(rows, policy, key)}
        if policy.endswith("early-stopped"):
            entry["steps"] = per_seed(rows, policy, "steps")
        table[policy] = entry
    out = {"table": table, "check": {}, "premise": {}, "predictions": []}
    dpo = {r["beta"]: r["policy"] for r in rows if r["method"] == "DPO"}
    dpo_es = {r["beta"]: r["policy"] for r in rows if r["method"] == "DPO-ES"}
    for beta, name in dpo.items():
        check = {}
        for key in ("mass_uncovered", "mass_malformed"):
            check[key] = interval(paired(table[name][key]["per_seed"], table["reference"][key]["per_seed"]))
        check["pass"] = check["mass_uncovered"][2] > 0
        out["check"][name] = check
    for policy, entry in table.items():
        out["premise"][policy] = entry["mass_malformed"]["mean_se"][0] < PREMISE_MALFORMED
    hypo = sorted({(r["beta"], r["kl_coef"], r["policy"]) for r in rows if r["method"] == "HyPO"})
    for against, labels in ((dpo, ("P1", "P2")), (dpo_es, ("P3", "P4"))):
        for beta, kl_coef, name in hypo:
            if beta not in against:
                continue
            for label, scenario in zip(labels, SCENARIOS):
                key = f"reward_{scenario}"
                mean, se, low, high = interval(paired(table[name][key]["per_seed"], table[against[beta]][key]["per_seed"]))
                out["predictions"].append({"prediction": label, "scenario": scenario, "cell": name,
                                           "against": against[beta], "delta": (mean, se, low, high),
                                           "verdict": p_verdict(label, low, high),
                                           "check_passed": out["check"][dpo[beta]]["pass"]})
    return out


# ---- report ------------------------------------------------------------------------------------------

def _ms(pair, digits=3):
    mean, se = pair
    return f"{mean:+.{digits}f} ± {se:.{digits}f}" if se == se else f"{mean:+.{digits}f}"


def report(analysis: dict, seeds: list[int], orders) -> str:
    lines = [f"second task (every response valid): seeds {seeds} (n = {len(seeds)}), training orders {list(orders)} "
             "per seed; a seed's value is the mean of its orders; ± is the standard error over seeds; [a, b] a 95% "
             "t-interval; every number is exact (teacher-forced over all 256 responses on 16 prompts)", "",
             "== manipulation check: does DPO raise valid uncovered mass above the reference? (malformed beside it)"]
    for name, check in analysis["check"].items():
        mean, se, low, high = check["mass_uncovered"]
        status = "PASS" if check["pass"] else "FAIL: the task failed to exercise extrapolation at this β"
        m = check["mass_malformed"]
        lines.append(f"{name}: DPO − reference valid uncovered mass {mean:+.4f} ± {se:.4f} [{low:+.4f}, {high:+.4f}] "
                     f"→ {status}; malformed {m[0]:+.2e} [{m[2]:+.2e}, {m[3]:+.2e}]")
    broken = [p for p, ok in analysis["premise"].items() if not ok]
    lines.append("== premise check (malformed mass below 0.01 for every policy): " +
                 ("holds" if not broken else "BROKEN by " + ", ".join(broken)))
    table = analysis["table"]
    for scenario in SCENARIOS:
        key = f"reward_{scenario}"
        lines += ["", f"== scenario {scenario}",
                  f"{'policy':<28} {'gold reward':>15}  {'per seed':<36} {'order gap':>17} {'KL(π‖π_ref)':>13} "
                  f"{'covered':>7} {'uncov.':>7} {'malformed':>9}"]
        for policy, entry in table.items():
            reward = entry[key]
            per = " ".join(f"{v:+.2f}" for v in reward["per_seed"].values())
            spread = reward["order_spread"]
            gap = f"{spread[0]:.3f} (max {spread[1]:.2f})" if spread else ""
            steps = ""
            if "steps" in entry:
                steps = "  stopped at " + " ".join(f"{v:g}" for v in entry["steps"].values())
            lines.append(f"{policy:<28} {_ms(reward['mean_se']):>15}  {per:<36} {gap:>17} {_ms(entry['kl']['mean_se'], 2):>13} "
                         f"{entry['mass_covered']['mean_se'][0]:>7.3f} {entry['mass_uncovered']['mean_se'][0]:>7.3f} "
                         f"{entry['mass_malformed']['mean_se'][0]:>9.1e}{steps}")
    lines += ["", "== predictions (Δ = HyPO − DPO at the same β, gold reward; P1/P3 expect Δ ≤ 0, P2/P4 Δ > 0; P3/P4 "
              "against DPO early-stopped)"]
    for p in analysis["predictions"]:
        mean, se, low, high = p["delta"]
        note = "" if p["check_passed"] else "  (manipulation check failed at this β: not a test of the theory)"
        lines.append(f"{p['prediction']} {p['scenario']:<11} {p['cell']:<20} vs {p['against']:<24} {mean:+.3f} ± {se:.3f} "
                     f"[{low:+.3f}, {high:+.3f}] → {p['verdict']}{note}")
    return "\n".join(lines)


def trajectory_text(rows: list[dict]) -> str:
    """DPO's held-out loss and valid uncovered mass every 5 steps, mean over seeds and orders (exploratory)."""
    lines = ["== DPO over its run (exploratory, not pre-declared): held-out pair loss, valid uncovered mass and rewards "
             "every 5 steps, mean over seeds and orders"]
    for policy in policies_in([r for r in rows if r.get("method") == "DPO"]):
        runs = [r["trajectory"] for r in rows if r["policy"] == policy and r.get("trajectory")]
        lines.append(f"-- {policy}")
        for i, point in enumerate(runs[0]):
            at = [run[i] for run in runs if len(run) > i]
            mean = lambda k: sum(p[k] for p in at) / len(at)  # noqa: E731
            lines.append(f"step {point['step']:>2}: held-out loss {mean('heldout_loss'):.3f}  uncovered "
                         f"{mean('mass_uncovered'):.4f}  reward consistent {mean('reward_consistent'):+.3f}  adversarial "
                         f"{mean('reward_adversarial'):+.3f}  KL {mean('kl'):.2f}")
    return "\n".join(lines)


def plot(analysis: dict, path: Path, title: str) -> Path:
    from hypo_fast.examples.coverage_task import plot_frontier

    panels = {f"every response valid, scenario {scenario}":
              {policy: (entry["kl"]["mean_se"], entry[f"reward_{scenario}"]["mean_se"])
               for policy, entry in analysis["table"].items()} for scenario in SCENARIOS}
    return plot_frontier(panels, path, title)


def latest_rows(path: Path, quick: bool) -> list[dict]:
    """The policy rows of the latest run (full or quick) in a coverage_valid.jsonl."""
    runs: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "policy" and bool(row.get("quick")) == quick:
            runs.setdefault(row["date"], []).append(row)
    if not runs:
        raise SystemExit(f"{path}: no {'quick' if quick else 'full'} run of --task valid to analyse")
    return runs[max(runs)]


def main(args, env: dict, results: Path) -> dict:
    from hypo_fast.examples.coverage_task import Cell

    start = time.time()
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else SEEDS)
    orders = QUICK_ORDERS if args.quick else ORDERS
    cells = [Cell(beta, kl) for beta, kl in (QUICK_GRID if args.quick else GRID)]
    suffix = "_quick" if args.quick else ""
    if args.reanalyse:
        rows = latest_rows(results / "coverage_valid.jsonl", args.quick)
        seeds = sorted({r["seed"] for r in rows})
        orders = sorted({r["order"] for r in rows if r["order"] is not None})
    else:
        print(f"# coverage experiment, second task | {env['machine']} | torch {env['torch']} | commit {env['commit']} | "
              f"seeds {seeds} × orders {list(orders)} | {len(cells)} cells")
        rows = run(seeds, cells, orders, Path(args.work), results, env, "coverage_valid")
    analysis = analyse(rows)
    text = report(analysis, seeds, orders) + "\n\n" + trajectory_text(rows)
    print("\n" + text)
    figure = plot(analysis, results / f"coverage_valid_frontier{suffix}.png",
                  f"HyPO vs DPO, every response valid ({len(seeds)} seeds × {len(orders)} orders; mean ± SE over seeds)")
    (results / f"coverage_valid_report{suffix}.txt").write_text(text + "\n")
    print(f"\nplot: {figure}\nwall time {time.time() - start:.0f} s")
    return {"analysis": analysis, "rows": rows, "plot": str(figure), "report": text}
