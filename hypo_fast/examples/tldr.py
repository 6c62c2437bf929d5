"""The TL;DR / Pythia-1.4B recipe (``tldr_pythia1b4_hypo.yaml``): seeds, the paper's local metrics, a smoke test.

    python -m hypo_fast.examples.tldr run CONFIG.yaml --seeds 0 1 2 [key=value ...]   # one GPU, seed after seed
    python -m hypo_fast.examples.tldr summarise RUN_DIR [RUN_DIR/seed0 ...]
    python -m hypo_fast.examples.tldr smoke --out DIR [--shape pythia-1.4b|tiny] [--steps 3] [--seeds 0]

``run`` trains the config once per seed (``optim.seed = S``, ``output.dir = <dir>/seedS``), then summarises.
``summarise`` reads each seed's ``metrics.jsonl`` and reports what Song et al. (2024) plot for TL;DR and can
be computed locally: the reverse KL(π ‖ π_ref) over training, estimated on fresh samples of the evaluation
prompts (``eval/kl/k1``), as the median and the min–max over seeds at every evaluated step, and the reward
model's score of the same samples (``eval/reward``, from ``eval.reward`` = a local classifier folder). It
writes ``summary.json`` and ``kl_over_training.png`` into the run folder. (GPT-4 win rates need a remote
model and are not computed.)

``smoke`` runs the recipe's own settings for a few steps on a random-weight model of the Pythia-1.4B shape
(``--shape pythia-1.4b``, for a GPU) or a tiny one (``--shape tiny``, for CPU tests), with a character
tokenizer, synthetic TL;DR-shaped pairs and a random reward classifier, all written locally: nothing
downloads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import yaml

RECIPE = Path(__file__).with_name("tldr_pythia1b4_hypo.yaml")
METRICS = ("eval/kl/k1", "eval/reward")
SHAPES = {  # GPT-NeoX configs; pythia-1.4b is EleutherAI/pythia-1.4b's shape (random weights here)
    "pythia-1.4b": {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "intermediate_size": 8192, "rotary_pct": 0.25,
                    "rotary_emb_base": 10000, "max_position_embeddings": 2048, "use_parallel_residual": True,
                    "layer_norm_eps": 1e-5, "hidden_act": "gelu", "tie_word_embeddings": False},
    "tiny": {"model_type": "gpt_neox", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 256, "rotary_pct": 0.25, "rotary_emb_base": 10000,
             "max_position_embeddings": 1024, "use_parallel_residual": True, "layer_norm_eps": 1e-5,
             "hidden_act": "gelu", "tie_word_embeddings": False},
}


def seed_dir(base: str | Path, seed: int) -> Path:
    return Path(base) / f"seed{seed}"


def run(config: str | Path, seeds: list[int], overrides: list[str] = ()) -> dict:
    """Train ``config`` once per seed (in this process, one after the other), then :func:`summarise`."""
    from hypo_fast.train.config import load_config
    from hypo_fast.train.trainer import Trainer

    base = Path(load_config(config, list(overrides)).output.dir)
    for seed in seeds:
        cfg = load_config(config, [*overrides, f"optim.seed={seed}", f"output.dir={seed_dir(base, seed)}"])
        Trainer(cfg).train()
    return summarise([seed_dir(base, s) for s in seeds], base)


def read_evaluations(run_dir: Path) -> dict[int, dict]:
    """``{step: {metric: value}}`` of one run's evaluation rows (the last row of a step wins)."""
    rows = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (has this seed been trained?)")
    for line in path.read_text().splitlines():
        row = json.loads(line)
        values = {m: row[m] for m in METRICS if m in row}
        if values:
            rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def summarise(run_dirs: list[Path], out: Path | None = None) -> dict:
    """Median and min–max over seeds, per evaluated step present in every seed, of each metric."""
    runs = {Path(d).name: read_evaluations(Path(d)) for d in run_dirs}
    steps = sorted(set.intersection(*(set(r) for r in runs.values()))) if runs else []
    summary = {"seeds": list(runs), "steps": steps, "metrics": {}}
    for metric in METRICS:
        rows = []
        for step in steps:
            values = [r[step][metric] for r in runs.values() if metric in r[step]]
            if len(values) == len(runs):
                rows.append({"step": step, "median": statistics.median(values), "min": min(values),
                             "max": max(values), "per_seed": values})
        if rows:
            summary["metrics"][metric] = rows
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        summary["plot"] = str(_plot(summary, out / "kl_over_training.png"))
    print(report(summary))
    return summary


def report(summary: dict) -> str:
    lines = [f"seeds: {', '.join(summary['seeds'])}; median [min, max] over seeds"]
    names = {"eval/kl/k1": "reverse KL (k1)", "eval/reward": "reward-model score"}
    header = f"{'step':>6}" + "".join(f"  {names[m]:>30}" for m in summary["metrics"])
    lines.append(header)
    by_step = {m: {r["step"]: r for r in rows} for m, rows in summary["metrics"].items()}
    for step in summary["steps"]:
        cells = []
        for metric in summary["metrics"]:
            r = by_step[metric].get(step)
            cells.append(f"{r['median']:>10.4g} [{r['min']:.4g}, {r['max']:.4g}]" if r else "-")
        lines.append(f"{step:>6}" + "".join(f"  {c:>30}" for c in cells))
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(summary["metrics"])
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5.5 * max(1, len(metrics)), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = summary["metrics"][metric]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["median"] for r in rows], marker="o", label="median")
        ax.fill_between(steps, [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.25, label="min–max")
        ax.set(title=f"{metric} over training ({len(summary['seeds'])} seeds)", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the smoke test: the recipe on a random-weight model and synthetic data ----------------------------

WORDS = ("my girlfriend said she wants to move to another city for a new job and i do not know what to do "
         "we have been together for three years and i love her but my family and friends live here").split()


def synthetic_tldr(n: int, seed: int = 0, post_words: int = 60) -> list[dict]:
    """TL;DR-shaped pairs (prompt ≈ 400 characters, summaries ≈ 40) made of random words."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": f"SUBREDDIT: r/relationships\n\nTITLE: {words(8)}\n\nPOST: {words(post_words)}\n\nTL;DR:",
             "chosen": " " + words(8), "rejected": " " + words(8)} for _ in range(n)]


def write_smoke_inputs(out: Path, shape: str) -> dict:
    """Tokenizer, train/eval pairs and a random reward classifier, all local."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hypo_fast.examples.toy import char_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = synthetic_tldr(64, 0), synthetic_tldr(16, 1)
    alphabet = sorted({ch for row in train + evaluation for text in row.values() for ch in text})
    tokenizer = char_tokenizer("".join(alphabet))
    tokenizer.save_pretrained(out / "tokenizer")
    for name, rows in (("train", train), ("validation", evaluation)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = dict(SHAPES["tiny"], num_labels=1, pad_token_id=tokenizer.pad_token_id)  # the reward model: tiny
    kwargs["vocab_size"] = max(kwargs["vocab_size"], len(tokenizer))
    rm_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(rm_config).save_pretrained(out / "reward_model")
    tokenizer.save_pretrained(out / "reward_model")
    return {"tokenizer": out / "tokenizer", "train": out / "train.jsonl", "validation": out / "validation.jsonl",
            "reward": out / "reward_model", "vocab": len(tokenizer)}


def smoke_config(out: Path, shape: str, steps: int, inputs: dict, recipe: Path = RECIPE) -> dict:
    """The recipe's config with the model, data and reward swapped for the local random ones and the run cut
    to ``steps`` optimizer steps of one small micro-batch (every other setting is the recipe's own)."""
    import torch

    cfg = yaml.safe_load(Path(recipe).read_text())
    model = dict(SHAPES[shape])
    model["vocab_size"] = max(model["vocab_size"], inputs["vocab"])
    cfg["model"].update(path=None, config=model, tokenizer=str(inputs["tokenizer"]))
    if not torch.cuda.is_available():
        cfg["model"]["dtype"] = "float32"  # bf16 matmuls on CPU are slow; on a GPU the recipe's bf16 runs
    cfg["data"].update(train_file=str(inputs["train"]), eval_file=str(inputs["validation"]),
                       cache_dir=str(out / "data-cache"))
    cfg["optim"].update(max_steps=steps, pairs_per_micro_batch=2, gradient_accumulation_steps=1, warmup_steps=0)
    cfg["sampling"].update(prompts_per_step=2)
    cfg["eval"].update(every=1, kl_prompts=4, kl_samples=2, reward=str(inputs["reward"]))
    cfg["output"].update(dir=str(out / "runs"), save_every=0, keep_last=1, resume="never", overwrite=True)
    return cfg


def smoke(out: str | Path, shape: str = "tiny", steps: int = 2, seeds: list[int] = (0,)) -> dict:
    """A few steps of the recipe on a random-weight model, per seed, then the summary."""
    import time

    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer

    out = Path(out)
    inputs = write_smoke_inputs(out / "inputs", shape)
    base = smoke_config(out, shape, steps, inputs)
    dirs = []
    for seed in seeds:
        cfg = json.loads(json.dumps(base))
        cfg["optim"]["seed"] = seed
        cfg["output"]["dir"] = str(seed_dir(out / "runs", seed))
        start = time.time()
        history = Trainer(config_from_dict(cfg)).train()
        train = [h for h in history if "step_seconds" in h]
        print(f"smoke {shape} seed {seed}: {len(train)} steps in {time.time() - start:.1f} s (last step "
              f"{train[-1]['step_seconds']:.2f} s, peak memory {train[-1]['peak_memory_mb']:.0f} MB)", flush=True)
        dirs.append(seed_dir(out / "runs", seed))
    return summarise(dirs, out / "runs")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p_run = commands.add_parser("run", help="train the config once per seed, then summarise")
    p_run.add_argument("config")
    p_run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_run.add_argument("overrides", nargs="*", help="dotted key=value, e.g. model.path=/models/sft")
    p_sum = commands.add_parser("summarise", help="median and min–max over seeds of KL and reward")
    p_sum.add_argument("runs", nargs="+", help="a run folder holding seed*/, or the seed folders themselves")
    p_smoke = commands.add_parser("smoke", help="a few steps on a random-weight model (nothing downloads)")
    p_smoke.add_argument("--out", default="runs/tldr-smoke")
    p_smoke.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p_smoke.add_argument("--steps", type=int, default=2)
    p_smoke.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.command == "run":
        return run(args.config, args.seeds, args.overrides)
    if args.command == "summarise":
        dirs = []
        for path in map(Path, args.runs):
            dirs += sorted(path.glob("seed*")) if not (path / "metrics.jsonl").exists() else [path]
        base = Path(args.runs[0]) if len(args.runs) == 1 else None
        return summarise(dirs, base)
    return smoke(args.out, args.shape, args.steps, args.seeds)


if __name__ == "__main__":
    main()
