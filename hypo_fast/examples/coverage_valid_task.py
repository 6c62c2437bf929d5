"""The coverage experiment's second task: every response is valid, the reward is additive over slots.

Used by ``benchmarks/coverage.py --task valid``, whose docstring declares the design. Everything is built
locally from a seed; nothing downloads. It shares the first task's prompts, tokenizer, SFT loop, trainer
config and frontier plot (:mod:`hypo_fast.examples.coverage_task`).

**Responses** are exactly ``length`` tokens (4), each one of ``letters`` ("abcd"): 256 responses, every one
a legal answer. The sampler writes exactly ``length`` tokens with no stop token, so no end token can be
lost. Any other token in a response (e–h, "=", a special token) makes it *malformed*; no training row
holds one, and its mass is measured exactly.

**Gold reward** (:meth:`ValidTask.reward`): per slot, the letters get the values 0, 1/3, 2/3, 1 in a
random order; a response scores the mean of its slots' values. The *covered* responses hold at most
``max_best_covered`` (1) of their slots' best letters, the *uncovered* ones more: every response better
than the best covered one is uncovered. Scenario
``consistent`` scores every response by the additive rule; ``adversarial`` subtracts ``penalty`` (1) from
the uncovered ones. Malformed responses score −1 in both.

**The reference** is an SFT model (:func:`~hypo_fast.examples.coverage_task.train_sft`) on responses whose
slots are drawn independently: a slot's best letter with probability ``best_prob`` (5%), each other
letter with the rest shared equally, so ≈ 98.6% of its mass is on the covered set. Its LM head masks
every token that is not a response letter (:func:`mask_head`): no response can be malformed.

**Pairs** (:func:`pairs_from_samples`): the reference's own samples, valid covered ones kept, paired in
order of drawing, pairs of equal reward dropped, labelled by the additive reward (the same in both
scenarios, since both pair members are covered).

**Evaluation** (:func:`exact_evaluation`) is exact: the teacher-forced probability of every valid
response on every evaluation prompt; no sampling noise.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hypo_fast.examples import coverage_task as first
from hypo_fast.seeds import derive_seed

SCENARIOS = ("consistent", "adversarial")
# the policy model: the first task's sizes, as Phi, whose LM head has a bias: every token that is not a response
# letter gets MASK_BIAS there, so no response can hold one (its probability, e^−50 a token, is below float32's
# resolution of 1, and its gradient with it: AdamW never moves it)
MODEL = {**first.MODEL, "model_type": "phi"}
MASK_BIAS = -50.0
MALFORMED_REWARD = -1.0
CLASSES = ("covered", "uncovered", "malformed")


@dataclass(frozen=True)
class ValidSpec:
    """The second task's declared sizes (``benchmarks/coverage.py`` documents them)."""

    length: int = 4
    letters: str = "abcd"
    best_prob: float = 0.05  # the reference's probability of a slot's best letter (the others share the rest)
    max_best_covered: int = 1  # covered: at most this many best letters
    penalty: float = 1.0  # subtracted from the uncovered responses in scenario adversarial
    train_prompts: int = 128
    heldout_prompts: int = 32
    ref_samples: int = 8
    eval_prompts: int = 16
    sft: first.TaskSpec = first.TaskSpec()  # the SFT loop's sizes (only its sft_* fields are read)


@dataclass(frozen=True)
class ValidTask:
    seed: int
    values: tuple[tuple[float, ...], ...]  # [slot][letter index]
    templates: tuple[str, ...]  # every valid response, in itertools.product order (train_sft reads the name)
    covered: frozenset[int]
    sft_probs: tuple[float, ...]
    rewards: dict  # scenario -> per-response rewards

    @property
    def uncovered(self) -> list[int]:
        return [i for i in range(len(self.templates)) if i not in self.covered]

    def __post_init__(self):
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.templates)})

    def index(self, response: str) -> int:
        """The response's index, or −1 when it is malformed."""
        return self._index.get(response, -1)

    def reward(self, scenario: str, response: str) -> float:
        i = self.index(response)
        return MALFORMED_REWARD if i < 0 else self.rewards[scenario][i]


def make_task(seed: int, spec: ValidSpec = ValidSpec()) -> ValidTask:
    """Letter values, responses, the covered set, SFT probabilities and both scenarios' rewards of a seed."""
    rng = random.Random(derive_seed(seed, "coverage-valid-task"))
    n = len(spec.letters)
    levels = [k / (n - 1) for k in range(n)]
    values = tuple(tuple(rng.sample(levels, n)) for _ in range(spec.length))
    best = [values[s].index(1.0) for s in range(spec.length)]
    slot_probs = [[spec.best_prob if i == best[s] else (1 - spec.best_prob) / (n - 1) for i in range(n)]
                  for s in range(spec.length)]
    combos = list(itertools.product(range(n), repeat=spec.length))
    templates = tuple("".join(spec.letters[i] for i in c) for c in combos)
    additive = [sum(values[s][i] for s, i in enumerate(c)) / spec.length for c in combos]
    n_best = [sum(i == best[s] for s, i in enumerate(c)) for c in combos]
    covered = frozenset(j for j, n in enumerate(n_best) if n <= spec.max_best_covered)
    probs = tuple(math.prod(slot_probs[s][i] for s, i in enumerate(c)) for c in combos)
    adversarial = tuple(r if j in covered else r - spec.penalty for j, r in enumerate(additive))
    return ValidTask(seed, values, templates, covered, probs, {"consistent": tuple(additive), "adversarial": adversarial})


def mask_head(model, tokenizer, spec: ValidSpec) -> None:
    """Set the LM head's bias to :data:`MASK_BIAS` on every token that is not a response letter."""
    allowed = {tokenizer.convert_tokens_to_ids(c) for c in spec.letters}
    with torch.no_grad():
        for token in range(model.lm_head.bias.shape[0]):
            model.lm_head.bias[token] = 0.0 if token in allowed else MASK_BIAS


def response_ids(tokenizer, task: ValidTask) -> list[list[int]]:
    """The token ids of every valid response (no end token: a response is exactly ``length`` tokens)."""
    ids = [first.encode(tokenizer, "", t)[1][:-1] for t in task.templates]
    assert all(len(i) == len(task.templates[0]) for i in ids), "one token per letter"
    return ids


def classify(task: ValidTask, tokenizer, responses: list[list[int]]) -> list[int]:
    """The index of each sampled response (token ids), −1 when malformed."""
    table = {tuple(ids): i for i, ids in enumerate(response_ids(tokenizer, task))}
    return [table.get(tuple(r), -1) for r in responses]


def pairs_from_samples(task: ValidTask, prompts: list[str], samples: list[list[int]]) -> tuple[list[dict], dict]:
    """Per prompt, the indices of its reference samples (−1 malformed) → preference rows: valid covered
    samples kept, consecutive ones paired, pairs of equal reward dropped, labelled by the additive reward."""
    rows, counts = [], {"samples": sum(len(s) for s in samples), "kept": 0, "tied": 0}
    additive = task.rewards["consistent"]
    for prompt, indices in zip(prompts, samples):
        kept = [i for i in indices if i in task.covered]
        counts["kept"] += len(kept)
        for a, b in zip(kept[0::2], kept[1::2]):
            if math.isclose(additive[a], additive[b], abs_tol=1e-12):
                counts["tied"] += 1
                continue
            chosen, rejected = (a, b) if additive[a] > additive[b] else (b, a)
            rows.append({"prompt": prompt, "chosen": task.templates[chosen], "rejected": task.templates[rejected]})
    counts["pairs"] = len(rows)
    counts["responses_in_pairs"] = len({t for r in rows for t in (r["chosen"], r["rejected"])})
    return rows, counts


def draw_pairs(task: ValidTask, policy, tokenizer, spec: ValidSpec, stream: str) -> tuple[list[dict], dict]:
    """Pairs from ``spec.ref_samples`` reference samples on each prompt of ``stream`` ("train" or "heldout")."""
    from hypo_fast.sampling import Sampler, SamplingConfig

    n = spec.train_prompts if stream == "train" else spec.heldout_prompts
    prompts = first.random_prompts(n, task.seed, f"valid-{stream}")
    sampler = Sampler(policy, SamplingConfig(max_new_tokens=spec.length, num_samples=spec.ref_samples),
                      pad_id=tokenizer.pad_token_id)
    samples = sampler.generate([first.encode(tokenizer, p)[0] for p in prompts],
                               seed=derive_seed(task.seed, "valid-pairs", stream))
    index = classify(task, tokenizer, samples.responses())
    k = spec.ref_samples
    return pairs_from_samples(task, prompts, [index[j * k:(j + 1) * k] for j in range(len(prompts))])


# ---- exact evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def response_probs(policy, tokenizer, task: ValidTask, prompt_ids: list[list[int]], reference: bool = False) -> torch.Tensor:
    """``[prompts, responses]`` float64 probability of every valid response (teacher-forced)."""
    ids = response_ids(tokenizer, task)
    sequences = [(p, r) for p in prompt_ids for r in ids]
    logp = first.sequence_logprobs(policy, sequences, reference, pad_id=tokenizer.pad_token_id)
    return logp.double().exp().view(len(prompt_ids), len(ids))


def distribution_metrics(task: ValidTask, probs: torch.Tensor, ref_probs: torch.Tensor) -> dict:
    """Masses, both scenarios' gold reward and the lumped KL from per-prompt probabilities ``[P, R]``
    (the policy's and the reference's), averaged over prompts."""
    covered = torch.tensor([i in task.covered for i in range(probs.shape[1])])
    malformed = (1 - probs.sum(1)).clamp(min=0)
    ref_malformed = (1 - ref_probs.sum(1)).clamp(min=0)
    out = {"mass_covered": float(probs[:, covered].sum(1).mean()),
           "mass_uncovered": float(probs[:, ~covered].sum(1).mean()),
           "mass_malformed": float(malformed.mean())}
    out["mass_not_covered"] = out["mass_uncovered"] + out["mass_malformed"]
    for scenario in SCENARIOS:
        reward = torch.tensor(task.rewards[scenario], dtype=torch.float64)
        out[f"reward_{scenario}"] = float((probs @ reward + MALFORMED_REWARD * malformed).mean())
    tiny = 1e-300
    terms = probs * (probs.clamp(min=tiny).log() - ref_probs.clamp(min=tiny).log())
    lumped = malformed * (malformed.clamp(min=tiny).log() - ref_malformed.clamp(min=tiny).log())
    out["kl"] = float((terms.sum(1) + lumped).mean())
    mean = probs.mean(0)
    top = torch.argsort(mean, descending=True)[:3].tolist()
    out["top_responses"] = [[task.templates[i], round(float(mean[i]), 4), CLASSES[0 if i in task.covered else 1]]
                            for i in top]
    return out


class Evaluator:
    """Exact evaluation of any policy on a seed's evaluation prompts (the reference's probabilities once)."""

    def __init__(self, task: ValidTask, tokenizer, reference_policy, spec: ValidSpec = ValidSpec()):
        self.task, self.tokenizer = task, tokenizer
        prompts = first.random_prompts(spec.eval_prompts, task.seed, "valid-eval")
        self.prompt_ids = [first.encode(tokenizer, p)[0] for p in prompts]
        self.ref_probs = response_probs(reference_policy, tokenizer, task, self.prompt_ids, reference=True)

    def __call__(self, policy) -> dict:
        was_training = policy.model.training
        policy.model.eval()
        probs = response_probs(policy, self.tokenizer, self.task, self.prompt_ids)
        policy.model.train(was_training)
        return distribution_metrics(self.task, probs, self.ref_probs)


# ---- training ------------------------------------------------------------------------------------------

EVAL_EVERY = 5  # DPO runs: held-out pairs (and the exact evaluation) every this many steps
HELDOUT_KEY = "eval/loss/dpo"


def order_seed(seed: int, order: int) -> int:
    """The trainer's seed for one training order of a seed (pair order and HyPO's samples)."""
    return derive_seed(seed, "order", order)


def valid_config(out: Path, data: Path, heldout: Path, sft_dir: Path, cell: first.Cell, seed: int,
                 train: first.TrainSpec, spec: ValidSpec) -> dict:
    """The first task's trainer config, with this task's response length (no stop token), the held-out
    pairs, and (for DPO) an evaluation every :data:`EVAL_EVERY` steps."""
    config = first.policy_config(out, data, sft_dir, cell.beta, cell.kl_coef, seed, train)
    config["sampling"] = {**config["sampling"], "max_new_tokens": spec.length, "stop_on_eos": False}
    config["data"] = {**config["data"], "eval_file": str(heldout)}
    config["eval"] = {**config["eval"], "every": EVAL_EVERY if cell.method == "DPO" else 0}
    return config


def early_stopped(trajectory: list[dict]) -> dict:
    """The evaluation at the step of the lowest held-out DPO loss among steps ≥ 1 (the first on a tie)."""
    candidates = [t for t in trajectory if t["step"] >= 1]
    return min(candidates, key=lambda t: (t["heldout_loss"], t["step"]))


def train_cell(config: dict, evaluate) -> tuple[list[dict], list[dict]]:
    """Train with the project's trainer; return its history and, at each of its evaluations, the held-out
    pair metrics with the exact evaluation of the policy at that step."""
    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer

    trajectory = []

    class Recording(Trainer):
        def _evaluate_and_log(self, logger):
            out = super()._evaluate_and_log(logger)
            trajectory.append({"step": self.step, "heldout_loss": out.get(HELDOUT_KEY),
                               "heldout_accuracy": out.get("eval/rewards/accuracies"), **evaluate(self.policy)})
            return out

    trainer = Recording(config_from_dict(config))
    history = trainer.train()
    return history, trajectory


def run_seed(seed: int, cells: list[first.Cell], root: Path, orders=(0, 1), spec: ValidSpec = ValidSpec(),
             train: first.TrainSpec = first.TrainSpec(), say=print) -> list[dict]:
    """SFT reference → training and held-out pairs → every cell in every order → exact evaluation.

    Rows: the reference; per (cell, order) the final policy; per DPO (cell, order) also the early-stopped one
    (policy name ``DPO β=… early-stopped``) with its step. Each row keeps the policy's trajectory only for DPO."""
    import gc
    import shutil
    import time

    from transformers import AutoTokenizer

    folder = root / f"valid-seed{seed}"
    task = make_task(seed, spec)
    start = time.time()
    sft = first.train_sft(task, folder / "sft", spec.sft, model_config=MODEL,
                          prepare=lambda model, tok: mask_head(model, tok, spec), eos_in_loss=False)
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    reference = first.reference_policy(folder / "sft")
    evaluate = Evaluator(task, tokenizer, reference, spec)
    ref_eval = evaluate(reference)
    sft_tv = sft_total_variation(task, evaluate.ref_probs)
    base = {"task": "valid", "seed": seed, **sft, "sft_tv": sft_tv}
    say(f"seed {seed}: SFT reference in {time.time() - start:.0f} s (TV to the SFT distribution {sft_tv:.3f}); mass "
        f"covered {ref_eval['mass_covered']:.3f}, valid uncovered {ref_eval['mass_uncovered']:.3f}, malformed "
        f"{ref_eval['mass_malformed']:.4f}")
    rows = [{**base, "policy": "reference", "method": "reference", "order": None, "beta": None, "kl_coef": None,
             **ref_eval}]
    pairs, counts = draw_pairs(task, reference, tokenizer, spec, "train")
    held, held_counts = draw_pairs(task, reference, tokenizer, spec, "heldout")
    if not pairs or not held:
        raise RuntimeError(f"seed {seed}: the reference drew too few covered pairs (train {counts}, held-out "
                           f"{held_counts}); train it longer (ValidSpec.sft.sft_steps)")
    data = first.write_rows(pairs, folder / "train.jsonl")
    heldout = first.write_rows(held, folder / "heldout.jsonl")
    base = {**base, **{f"pairs_{k}": v for k, v in counts.items()}, "heldout_pairs": held_counts["pairs"]}
    for order in orders:
        for cell in cells:
            start = time.time()
            out = folder / f"{cell.slug}-o{order}"
            config = valid_config(out, data, heldout, folder / "sft", cell, order_seed(seed, order), train, spec)
            history, trajectory = train_cell(config, evaluate)
            final = trajectory[-1]
            row = {**base, "policy": cell.name, "method": cell.method, "order": order, "beta": cell.beta,
                   "kl_coef": cell.kl_coef, "steps": final["step"], **first._train_summary(history),
                   **{k: v for k, v in final.items() if k != "step"}}
            rows.append(row)
            if cell.method == "DPO":
                row["trajectory"] = [{k: t[k] for k in ("step", "heldout_loss", "heldout_accuracy", "mass_uncovered",
                                                        "mass_malformed", "reward_consistent", "reward_adversarial",
                                                        "kl")} for t in trajectory]
                stop = early_stopped(trajectory)
                rows.append({**row, "policy": f"{cell.name} early-stopped", "method": "DPO-ES", "steps": stop["step"],
                             **{k: v for k, v in stop.items() if k != "step"}})
            say(f"seed {seed} order {order} {cell.name:<20} reward consistent {final['reward_consistent']:+.3f} "
                f"adversarial {final['reward_adversarial']:+.3f}  KL {final['kl']:.2f}  valid uncovered "
                f"{final['mass_uncovered']:.3f}  malformed {final['mass_malformed']:.4f}"
                + (f"  (early stop at step {rows[-1]['steps']})" if cell.method == "DPO" else "")
                + f"  ({time.time() - start:.0f} s)")
            for checkpoint in out.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
            gc.collect()
    return rows


def sft_total_variation(task: ValidTask, ref_probs: torch.Tensor) -> float:
    """Total variation between the reference's response distribution (mean over the evaluation prompts,
    malformed as one outcome) and the SFT distribution it was trained on."""
    mean = ref_probs.mean(0)
    target = torch.tensor(task.sft_probs, dtype=torch.float64)
    return float(0.5 * ((mean - target).abs().sum() + (1 - mean.sum()).clamp(min=0)))


def with_sizes(spec: ValidSpec, **sft_sizes) -> ValidSpec:
    """``spec`` with some of the SFT loop's sizes changed (tests run a shorter SFT)."""
    return replace(spec, sft=replace(spec.sft, **sft_sizes))
