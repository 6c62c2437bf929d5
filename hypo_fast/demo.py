"""The embedded demo: DPO vs HyPO where the preference data cover the response space only partially.

    python -m hypo_fast.demo [--out runs/demo] [--seed 0] [--quick]

One seed of the coverage experiment (``benchmarks/coverage.py`` runs it over five seeds and a grid; the
task is described in ``hypo_fast/examples/coverage_task.py``). Responses are whole sequences: 27 six-letter
templates. An SFT reference is trained on them (90% of its mass on six *covered* templates, 10% on the
21 others); the offline pairs are the reference's own samples, kept only when they are covered templates
and labelled by a gold reward. The data say nothing about the 21 uncovered templates, so their reward is
set two ways: *worse* than every covered one, or *better* than the best. DPO (β = 0.1) and HyPO (β = 0.1,
λ = 0.1) train from the reference on these pairs, and again on a global-coverage control whose pairs also
show the uncovered templates. Every policy is scored on 2,048 fresh samples: gold reward, reverse KL to
the reference, and how much of its mass sits on responses the pairs never showed. A PNG plots reward
against KL.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hypo_fast.examples.coverage_task import SCENARIOS, Cell, TaskSpec, TrainSpec

CELLS = (Cell(0.1), Cell(0.1, 0.1))  # DPO β = 0.1; HyPO β = 0.1, λ = 0.1
QUICK = {"steps": 8, "sft_steps": 150, "eval_prompts": 16}  # about 15 s on 2 CPU cores
TITLES = {("partial", "worse"): "partial coverage, uncovered templates worse",
          ("partial", "better"): "partial coverage, uncovered templates better",
          ("global-worse", "worse"): "global coverage (control), uncovered worse",
          ("global-better", "better"): "global coverage (control), uncovered better"}


def table(rows: list[dict]) -> str:
    """One block per setting: gold reward, KL and not-covered mass, each ± its prompt-clustered SE."""
    reference = next(r for r in rows if r["policy"] == "reference")
    lines = []
    for (data, scenario), title in TITLES.items():
        policies = [reference] + [r for r in rows if r["data"] == data]
        if len(policies) == 1:
            continue
        lines += [f"{title}:",
                  f"  {'policy':<18} {'gold reward':>16} {'KL(π‖π_ref)':>14} {'not covered':>15} {'uncov. / off':>14}"]
        for r in policies:
            lines.append(f"  {r['policy']:<18} {r[f'reward_{scenario}']:>+9.3f} ± {r[f'reward_{scenario}_se']:.3f} "
                         f"{r['kl']:>7.2f} ± {r['kl_se']:.2f} {r['mass_not_covered']:>8.3f} ± {r['mass_not_covered_se']:.3f} "
                         f"{r['mass_uncovered']:>6.3f} / {r['mass_off']:.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainSpec.steps, help="training steps per policy")
    parser.add_argument("--sft-steps", type=int, default=TaskSpec.sft_steps)
    parser.add_argument("--eval-prompts", type=int, default=TaskSpec.eval_prompts, help="× 8 samples each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run of every stage ({QUICK}); its numbers mean nothing (CI runs it)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)

    import logging
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed then skips its "no GPU found" warning

    from hypo_fast.examples.coverage_task import plot_frontier, quiet_progress_bars, run_seed

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    quiet_progress_bars()
    start = time.time()
    out = Path(args.out)
    spec = TaskSpec(sft_steps=args.sft_steps, eval_prompts=args.eval_prompts)
    print("hypo_fast demo: DPO vs HyPO (Song et al. 2024) when the preference data cover only part of the "
          "response space.\nAn SFT reference, pairs drawn from it, both reward scenarios and a global-coverage "
          f"control (seed {args.seed}; 5 seeds and a grid: benchmarks/coverage.py).\n", flush=True)
    rows = run_seed(args.seed, list(CELLS), out, spec, TrainSpec(steps=args.steps))
    print("\n" + table(rows))
    reference = rows[0]
    dpo = next(r for r in rows if r["data"] == "partial" and r["method"] == "DPO")
    hypo = next(r for r in rows if r["data"] == "partial" and r["method"] == "HyPO")
    print(f"uncovered mass on the partial-coverage pairs (share of samples that are not a covered template): "
          f"reference {reference['mass_not_covered']:.3f}, DPO {dpo['mass_not_covered']:.3f}, "
          f"HyPO {hypo['mass_not_covered']:.3f}")
    print(f"most frequent responses (partial coverage; share of the {reference['samples']:,} samples, class):")
    for r in (reference, dpo, hypo):
        shown = ", ".join(f"{text!r} {share:.2f} {cls}" for text, share, cls in r["top_responses"][:3])
        print(f"  {r['policy']:<18} {shown}")
    moved = dpo["mass_not_covered"] - reference["mass_not_covered"]
    se = (dpo["mass_not_covered_se"] ** 2 + reference["mass_not_covered_se"] ** 2) ** 0.5
    print(f"manipulation check: DPO − reference = {moved:+.3f} (± {se:.3f}): DPO "
          f"{'moved mass onto' if moved > 2 * se else 'did not clearly move mass onto'} responses the pairs never showed")
    panels = {TITLES[(data, scenario)]: {r["policy"]: ((r["kl"], r["kl_se"]),
                                                       (r[f"reward_{scenario}"], r[f"reward_{scenario}_se"]))
                                         for r in rows if r["data"] in (data, "reference")}
              for data, scenario in TITLES if any(r["data"] == data for r in rows)}
    plot = plot_frontier(panels, out / "frontier.png", f"DPO vs HyPO, one seed (seed {args.seed}); ± prompt-clustered SE")
    print(f"\nplot: {plot}; runs: {out}/seed{args.seed}/; wall time {time.time() - start:.0f} s")
    if args.quick:
        print("quick mode: every stage ran at a toy size; these numbers say nothing about DPO or HyPO")
    return {"rows": rows, "plot": str(plot), "scenarios": SCENARIOS}


if __name__ == "__main__":
    main()
