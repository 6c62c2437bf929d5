"""Variance of the online term's gradient estimate: RLOO (the paper's) against exact_token, at equal k.

Three settings, each drawing many independent online batches and taking the gradient of the loss each
time (the DPO part, where present, is deterministic: the spread is the KL term's alone):

  toy2      the enumerable two-token policy of tests/test_losses.py (3 symbols, one prompt per draw)
  trainer   the enumerable tiny Llama of tests/train/test_objective.py, through the trainer's own step
            (4 prompts of k samples, responses of at most 2 tokens), τ = 1 and τ = 0.6
  demo      the demo's task and model (hypo_fast.demo, seed 0: SFT reference on six-letter templates, 2-layer
            Llama, responses of up to 8 tokens), first trained 40 steps with DPO on its partial-coverage pairs
            so that it has moved away from its reference, then 4 prompts of k samples per draw through the
            trainer's step

For each: the trace of the covariance of the flat gradient over draws (the summed per-parameter
variance), and the same times the number of samples behind one draw (the variance per sample). The
two estimators' mean gradients are compared too (max |z| over the mean direction and random ones): both
are unbiased, so it should be small. Prints a table and appends rows to kl_estimator_variance.jsonl under
--results-dir (default runs/benchmarks/) or, with --record, benchmarks/results/.

    python benchmarks/kl_estimator_variance.py [--draws 200] [--settings toy2 trainer demo] [--record]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from benchlib import add_results_options, append_rows, environment, print_table

ESTIMATORS = ("rloo", "exact_token")


def _summary(draws: dict[str, torch.Tensor], samples_per_draw: int) -> dict:
    """Per estimator: trace variance; across them: the variance ratio and the z of their mean difference."""
    out = {}
    for name, g in draws.items():
        out[f"var_{name}"] = g.var(0).sum().item()
        out[f"var_per_sample_{name}"] = out[f"var_{name}"] * samples_per_draw
    a, b = draws["rloo"], draws["exact_token"]
    direction = (a.mean(0) + b.mean(0)) / 2
    directions = torch.cat([direction[None] / direction.norm().clamp_min(1e-30),
                            torch.randn(4, a.shape[1], generator=torch.Generator().manual_seed(0), dtype=a.dtype)])
    pa, pb = a @ directions.T, b @ directions.T
    se = (pa.var(0) / len(pa) + pb.var(0) / len(pb)).sqrt()
    out["max_abs_z_mean_difference"] = ((pa.mean(0) - pb.mean(0)) / se).abs().max().item()
    out["variance_ratio"] = out["var_exact_token"] / out["var_rloo"]
    return out


# ---- toy2: the two-token policy -------------------------------------------------------------------

def toy2(k: int, draws: int) -> dict:
    from hypo_fast.losses import exact_token_kl_loss, rloo_kl_loss

    V = 3
    def policy(seed):  # tests/test_losses.py's _tiny_policy: θ1 [V], then θ2 [V, V]
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(V, generator=gen, dtype=torch.float64), torch.randn(V, V, generator=gen, dtype=torch.float64)]

    theta, ref = [t.requires_grad_() for t in policy(1)], policy(2)

    def token_logps(th, y):
        return torch.stack([torch.log_softmax(th[0], -1)[y[:, 0]], torch.log_softmax(th[1], -1)[y[:, 0], y[:, 1]]], 1)

    def kl(a, b):
        log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    result = {}
    for name in ESTIMATORS:
        sampler, grads = torch.Generator().manual_seed(1), []
        for _ in range(draws):
            y1 = torch.multinomial(torch.softmax(theta[0].detach(), -1), k, replacement=True, generator=sampler)
            y2 = torch.multinomial(torch.softmax(theta[1].detach(), -1)[y1], 1, generator=sampler).squeeze(1)
            y = torch.stack([y1, y2], 1)
            logps = token_logps(theta, y)
            if name == "rloo":
                loss = rloo_kl_loss(logps.sum(1), token_logps(ref, y).sum(1), k).loss
            else:
                kls = torch.stack([kl(theta[0], ref[0]).expand(k), kl(theta[1][y1], ref[1][y1])], 1)
                loss = exact_token_kl_loss(logps, kls, torch.ones(y.shape, dtype=torch.bool), k).loss
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta)]))
        result[name] = torch.stack(grads)
    return _summary(result, k)


# ---- through the trainer's step ---------------------------------------------------------------------

def _gradient(trainer, loss) -> torch.Tensor:
    params = [p for p in trainer.policy.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    trainer.engine.backward(loss)
    grad = torch.cat([p.grad.reshape(-1).double() for p in params])
    for p in params:
        p.grad = None
    return grad


def _step_draws(trainer, k: int, pair_index, prompt_index, draws: int) -> dict:
    result = {}
    for name in ESTIMATORS:
        trainer.objective = dataclasses.replace(trainer.objective, kl_coef=1.0, num_samples=k, kl_loss=name)
        trainer.sampler.config = dataclasses.replace(trainer.sampler.config, num_samples=k)
        result[name] = torch.stack([_gradient(trainer, trainer.step_loss(pair_index, prompt_index, seed=s).loss)
                                    for s in range(draws)])
    return _summary(result, k * len(prompt_index))


def trainer_toy(k: int, draws: int, temperature: float, folder: Path) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.train.test_objective import _tiny_task

    trainer = _tiny_task(folder, temperature, kl_coef=1.0, num_samples=k)
    return _step_draws(trainer, k, [0, 1, 2, 3], [0, 1, 2, 3], draws)


def demo(k: int, draws: int, folder: Path, dpo_steps: int = 40) -> dict:
    """The demo's task (seed 0): its SFT reference, its partial-coverage pairs, DPO (β = 0.1) trained for
    ``dpo_steps`` so that the policy has left the reference (the demo's DPO drifts off-template), then the
    online term's gradient on 4 training prompts × k samples per draw."""
    from transformers import AutoTokenizer

    from hypo_fast.examples.coverage_task import (TaskSpec, TrainSpec, draw_pairs, make_task, policy_config,
                                                   reference_policy, train_sft, write_rows)
    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer

    spec, task = TaskSpec(), make_task(0, TaskSpec())
    train_sft(task, folder / "sft", spec)
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    pairs, _ = draw_pairs(task, reference_policy(folder / "sft"), tokenizer, spec, "partial", "worse")
    data = write_rows(pairs, folder / "partial.jsonl")
    cfg = policy_config(folder / "run", data, folder / "sft", 0.1, 0.0, 0, TrainSpec(steps=dpo_steps), spec)
    trainer = Trainer(config_from_dict(cfg))
    for _ in range(dpo_steps):
        trainer.train_step()
    return _step_draws(trainer, k, list(range(8)), [0, 1, 2, 3], draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--settings", nargs="+", default=["toy2", "trainer", "demo"])
    parser.add_argument("--no-save", action="store_true")
    add_results_options(parser)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    env = environment("cpu")
    print(f"# {env['machine']} | torch {env['torch']} | commit {env['commit']}")
    rows = []
    for k in args.ks:
        cases = []
        if "toy2" in args.settings:
            cases.append(("toy2", 1.0, lambda folder: toy2(k, max(args.draws, 2000))))
        if "trainer" in args.settings:
            for tau in (1.0, 0.6):
                cases.append(("trainer", tau, lambda folder, tau=tau: trainer_toy(k, args.draws, tau, folder)))
        if "demo" in args.settings:
            cases.append(("demo", 1.0, lambda folder: demo(k, args.draws, folder)))
        for setting, tau, run in cases:
            with tempfile.TemporaryDirectory() as tmp:
                result = run(Path(tmp))
            row = {**env, "bench": "kl_estimator_variance", "setting": setting, "k": k, "temperature": tau,
                   "draws": args.draws if setting != "toy2" else max(args.draws, 2000), **result}
            print(json.dumps({key: row[key] for key in ("setting", "k", "temperature", "variance_ratio",
                                                         "max_abs_z_mean_difference")}), flush=True)
            rows.append(row)
    print_table(rows, [("setting", "setting", "s"), ("k", "k", "d"), ("temperature", "τ", ".1f"),
                       ("draws", "draws", "d"), ("var_per_sample_rloo", "var/sample RLOO", ".4g"),
                       ("var_per_sample_exact_token", "var/sample exact", ".4g"),
                       ("variance_ratio", "exact/RLOO", ".3f"), ("max_abs_z_mean_difference", "max|z| means", ".2f")])
    if not args.no_save:
        print(f"rows appended to {append_rows('kl_estimator_variance', rows, args.results_dir)}")


if __name__ == "__main__":
    main()
