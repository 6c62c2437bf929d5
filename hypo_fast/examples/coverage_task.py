"""A preference task that exercises coverage: whole-sequence templates, an SFT reference, reference-drawn pairs.

Used by ``benchmarks/coverage.py`` (the experiment over seeds, whose docstring declares the design) and by
``python -m hypo_fast.demo`` (one seed of it). Everything is built locally from a seed; nothing downloads.

**Responses** are whole sequences, *templates*: three slots, each filled by one of three two-letter words
(drawn per seed from the letters a–h), so 27 templates of six letters, each followed by EOS. Any other
string the model writes is *off-template*.

**The reference** is an SFT model, trained by :func:`train_sft` (a plain next-token cross-entropy loop on a
Llama-style model built from a ``transformers`` config) on random prompts followed by templates drawn
from the SFT distribution: the six *covered* templates hold 90% of the mass (15% each), the 21 others
10% (≈ 0.48% each). The covered six are drawn per seed so that every word of every slot appears in at
least one of them: an uncovered template is a new combination of familiar parts.

**Offline pairs** (:func:`draw_pairs`) are drawn from the SFT model itself: ``ref_samples`` samples per
training prompt; the data collector keeps only covered templates (the reference's typical set), pairs
them in order of drawing (a pair of two equal templates is dropped) and labels each pair by the gold
reward. Coverage is therefore partial *relative to the reference*: the reference puts ≈ 10% on
responses the pairs never show. In the *global-coverage control* each kept sample is replaced, with
probability ½, by a uniformly drawn uncovered template before pairing, so the pairs cover all 27.

**Gold reward** (:meth:`Task.reward`), whole-sequence and not additive over letters or words: the
covered templates get 0, 0.2, …, 1.0 in a random order; the uncovered ones get evenly spaced values in
[−0.8, −0.2] in scenario ``worse`` (below every covered one) or the same values + 2, in [1.2, 1.8], in
scenario ``better`` (above the best covered one); off-template responses get −1 in both. The pairs of the
partial-coverage data compare covered templates only, so their labels — and the trained policies — are the
same in both scenarios: only the evaluation differs.

**Evaluation** (:func:`evaluate_policy`): fresh prompts, ``k`` samples each from the policy (τ = 1);
per sample the gold reward under both scenarios, the sequence log-ratio log π(y|x) − log π_ref(y|x) (its
mean is the k1 estimate of the reverse KL) and its class (covered, uncovered template, off-template);
means with standard errors clustered by prompt. Beside the samples, the exact probability of every
template on every evaluation prompt (teacher-forced), a noise-free cross-check of the masses.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from hypo_fast.models.packing import pad_rows
from hypo_fast.seeds import derive_seed

ALPHABET = "abcdefgh"
SEPARATOR = "="  # ends every prompt, so the model can tell where the response starts
SCENARIOS = ("worse", "better")  # the reward of the uncovered templates, relative to the covered ones
OFF_TEMPLATE_REWARD = -1.0
CLASSES = ("covered", "uncovered", "off")  # uncovered: an uncovered template; off: not a template at all


@dataclass(frozen=True)
class TaskSpec:
    """The task's declared sizes (``benchmarks/coverage.py`` documents why each is what it is)."""

    slots: int = 3
    options: int = 3  # words per slot
    word_length: int = 2
    covered: int = 6  # templates in the reference's typical set (the data collector's support)
    covered_mass: float = 0.9  # SFT mass of the covered templates together
    sft_sequences: int = 4000
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3
    train_prompts: int = 128  # prompts of the offline pairs (and of HyPO's online samples)
    ref_samples: int = 8  # reference samples per training prompt, from which pairs are formed
    eval_prompts: int = 256
    eval_samples: int = 8  # per evaluation prompt: 2,048 samples per policy
    max_new_tokens: int = 8  # six letters + EOS fit; longer is off-template


MODEL = {"model_type": "llama", "vocab_size": 5 + len(ALPHABET), "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 32, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Task:
    seed: int
    words: tuple[tuple[str, ...], ...]  # [slot][option]
    templates: tuple[str, ...]  # all slot combinations, in itertools.product order
    covered: frozenset[int]  # indices into templates
    sft_probs: tuple[float, ...]  # per template
    rewards: dict  # scenario -> tuple of per-template rewards

    @property
    def uncovered(self) -> list[int]:
        return [i for i in range(len(self.templates)) if i not in self.covered]

    def template_index(self, text: str) -> int:
        """The template a response string is, or −1 when it is off-template."""
        return self._index.get(text, -1)

    def __post_init__(self):
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.templates)})

    def reward(self, scenario: str, response: str) -> float:
        i = self.template_index(response)
        return OFF_TEMPLATE_REWARD if i < 0 else self.rewards[scenario][i]

    def describe(self) -> str:
        lines = []
        for i in sorted(range(len(self.templates)), key=lambda i: -self.rewards["worse"][i]):
            tag = "covered  " if i in self.covered else "uncovered"
            lines.append(f"  {self.templates[i]}  {tag}  SFT p={self.sft_probs[i]:.4f}  reward worse="
                         f"{self.rewards['worse'][i]:+.2f} better={self.rewards['better'][i]:+.2f}")
        return "\n".join(lines)


def make_task(seed: int, spec: TaskSpec = TaskSpec()) -> Task:
    """Words, templates, the covered set, SFT probabilities and gold rewards of one seed."""
    rng = random.Random(derive_seed(seed, "coverage-task"))
    all_words = ["".join(w) for w in itertools.product(ALPHABET, repeat=spec.word_length)]
    words = tuple(tuple(rng.sample(all_words, spec.options)) for _ in range(spec.slots))
    templates = tuple("".join(parts) for parts in itertools.product(*words))
    combos = list(itertools.product(range(spec.options), repeat=spec.slots))
    while True:  # every word of every slot appears in some covered template
        covered = sorted(rng.sample(range(len(templates)), spec.covered))
        if all({combos[i][s] for i in covered} == set(range(spec.options)) for s in range(spec.slots)):
            break
    covered = frozenset(covered)
    n_unc = len(templates) - spec.covered
    probs = tuple(spec.covered_mass / spec.covered if i in covered else (1 - spec.covered_mass) / n_unc
                  for i in range(len(templates)))
    covered_values = [k / (spec.covered - 1) for k in range(spec.covered)]  # 0, 0.2, …, 1
    uncovered_values = [-0.8 + 0.6 * k / (n_unc - 1) for k in range(n_unc)]  # [−0.8, −0.2]
    rng.shuffle(covered_values)
    rng.shuffle(uncovered_values)
    worse, better, ci, ui = [], [], iter(covered_values), iter(uncovered_values)
    for i in range(len(templates)):
        if i in covered:
            worse.append(next(ci))
            better.append(worse[-1])
        else:
            worse.append(next(ui))
            better.append(worse[-1] + 2.0)  # [1.2, 1.8]: above the best covered template
    return Task(seed, words, templates, covered, probs, {"worse": tuple(worse), "better": tuple(better)})


def random_prompts(n: int, seed: int, stream: str) -> list[str]:
    rng = random.Random(derive_seed(seed, "prompts", stream))
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 5))) + SEPARATOR for _ in range(n)]


def write_tokenizer(folder: Path):
    from hypo_fast.examples.toy import char_tokenizer

    tokenizer = char_tokenizer(ALPHABET + SEPARATOR)
    tokenizer.save_pretrained(folder)
    return tokenizer


def encode(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` as the trainer tokenizes a pair (TRL 1.16: BOS once, EOS appended)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    if response is None:
        return prompt_ids, []
    full = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    return prompt_ids, full[len(prompt_ids):]


# ---- the SFT reference ---------------------------------------------------------------------------

def train_sft(task: Task, folder: Path, spec: TaskSpec = TaskSpec(), log_every: int = 0, model_config: dict = MODEL,
              prepare=None, eos_in_loss: bool = True) -> dict:
    """Train the reference by next-token cross entropy on ``prompt → template`` sequences; save it to
    ``folder`` (model and tokenizer), the ``model.path`` of every policy trained from it.

    ``model_config`` is the transformers config; ``prepare(model, tokenizer)`` runs on the fresh model
    before training; ``eos_in_loss=False`` leaves the end token out of the loss (the second task's
    responses have a fixed length and no end token)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder)
    rng = random.Random(derive_seed(task.seed, "sft-data"))
    prompts = random_prompts(spec.sft_sequences, task.seed, "sft")
    responses = rng.choices(task.templates, weights=task.sft_probs, k=spec.sft_sequences)
    rows = [encode(tokenizer, p, r) for p, r in zip(prompts, responses)]

    kwargs = dict(model_config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(derive_seed(task.seed, "sft-init"))
    model = AutoModelForCausalLM.from_config(config)
    if prepare is not None:
        prepare(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / spec.sft_steps)))
    order = torch.Generator().manual_seed(derive_seed(task.seed, "sft-order"))
    model.train()
    losses = []
    for step in range(spec.sft_steps):
        batch = [rows[i] for i in torch.randint(len(rows), (spec.sft_batch,), generator=order).tolist()]
        ids, mask = pad_rows([p + r for p, r in batch], tokenizer.pad_token_id)
        scored = [len(r) - (not eos_in_loss) for _, r in batch]  # the loss reads response tokens (EOS if asked)
        labels, _ = pad_rows([[-100] * len(p) + r[:n] + [-100] * (len(r) - n) for (p, r), n in zip(batch, scored)],
                             -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  sft step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    model.save_pretrained(folder)
    tokens = len(task.templates[0]) + 1  # per response token (the letters + EOS)
    entropy = -sum(p * math.log(p) for p in task.sft_probs) / tokens
    return {"sft_loss": sum(losses[-50:]) / len(losses[-50:]), "sft_entropy_floor": entropy}


# ---- offline pairs ----------------------------------------------------------------------------------

def draw_pairs(task: Task, policy, tokenizer, spec: TaskSpec = TaskSpec(), condition: str = "partial",
               scenario: str = "worse") -> tuple[list[dict], dict]:
    """Preference rows ``{prompt, chosen, rejected}`` from the reference's own samples (see the module doc):
    ``spec.ref_samples`` samples on each training prompt, then :func:`pairs_from_samples`."""
    from hypo_fast.sampling import Sampler, SamplingConfig

    prompts = random_prompts(spec.train_prompts, task.seed, "train")
    sampler = Sampler(policy, SamplingConfig(max_new_tokens=spec.max_new_tokens, num_samples=spec.ref_samples,
                                             stop_token_ids=(tokenizer.eos_token_id,)),
                      pad_id=tokenizer.pad_token_id)
    samples = sampler.generate([encode(tokenizer, p)[0] for p in prompts], seed=derive_seed(task.seed, "pairs"))
    index = classify(task, tokenizer, samples.responses())
    k = spec.ref_samples
    return pairs_from_samples(task, prompts, [index[j * k:(j + 1) * k] for j in range(len(prompts))], condition,
                              scenario)


def pairs_from_samples(task: Task, prompts: list[str], samples: list[list[int]], condition: str = "partial",
                       scenario: str = "worse") -> tuple[list[dict], dict]:
    """The data collector: per prompt, the template indices of its reference samples (−1 off-template) →
    preference rows, with counts of what it saw and kept.

    ``partial``: only covered templates are kept; a pair's labels are the same in both scenarios.
    ``global`` (the control): each kept sample is replaced with probability ½ by a uniformly drawn uncovered
    template before pairing, and pairs are labelled by ``scenario``'s reward. Consecutive kept samples are
    paired; a pair of two equal templates is dropped."""
    if condition not in ("partial", "global"):
        raise ValueError(f"condition must be partial or global, got {condition!r}")
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    rng = random.Random(derive_seed(task.seed, "pairs", condition, scenario))
    uncovered = [task.templates[i] for i in task.uncovered]
    rows, counts = [], {"samples": sum(len(s) for s in samples), "kept": 0, "replaced": 0, "tied": 0}
    for prompt, indices in zip(prompts, samples):
        kept = [task.templates[i] for i in indices if i in task.covered]
        counts["kept"] += len(kept)
        if condition == "global":
            for i in range(len(kept)):
                if rng.random() < 0.5:
                    kept[i] = rng.choice(uncovered)
                    counts["replaced"] += 1
        for a, b in zip(kept[0::2], kept[1::2]):
            if a == b:
                counts["tied"] += 1
                continue
            chosen, rejected = (a, b) if task.reward(scenario, a) > task.reward(scenario, b) else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    counts["pairs"] = len(rows)
    counts["templates_in_pairs"] = len({t for r in rows for t in (r["chosen"], r["rejected"])})
    return rows, counts


def classify(task: Task, tokenizer, responses: list[list[int]]) -> list[int]:
    """The template index of each sampled response (token ids, EOS included), −1 when off-template
    (a stray special token or a missing EOS makes a response off-template, whatever it decodes to)."""
    ids = {tuple(encode(tokenizer, "", t)[1]): i for i, t in enumerate(task.templates)}
    return [ids.get(tuple(r), -1) for r in responses]


def reference_policy(sft_dir: Path):
    """The SFT model as a :class:`Policy` whose reference is a frozen copy of itself (KL = 0)."""
    from hypo_fast.models import FrozenReference, Policy, load_causal_lm

    model = load_causal_lm(str(sft_dir))
    return Policy(model, FrozenReference.copy_of(model))


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- training config ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSpec:
    steps: int = 80
    lr: float = 5e-4
    pairs_per_micro_batch: int = 8
    prompts_per_step: int = 4  # HyPO's online prompts per step
    num_samples: int = 4  # k per online prompt (RLOO baseline over k)
    warmup_steps: int = 5


def policy_config(out: Path, data: Path, sft_dir: Path, beta: float, kl_coef: float, seed: int,
                  train: TrainSpec = TrainSpec(), spec: TaskSpec = TaskSpec()) -> dict:
    """A ``hypo_fast`` trainer config: DPO (``kl_coef = 0``) or HyPO from the SFT reference."""
    return {
        "model": {"path": str(sft_dir)},
        "data": {"train_file": str(data), "eval_fraction": 0.0, "max_prompt_length": 8, "max_length": 24,
                 "cache_dir": str(out.parent / "data-cache")},
        "algorithm": {"beta": beta, "kl_coef": kl_coef, "num_samples": train.num_samples},
        "sampling": {"prompts_per_step": train.prompts_per_step, "max_new_tokens": spec.max_new_tokens},
        "optim": {"lr": train.lr, "max_steps": train.steps, "pairs_per_micro_batch": train.pairs_per_micro_batch,
                  "warmup_steps": train.warmup_steps, "scheduler": "constant_with_warmup", "seed": seed},
        "eval": {"every": 0, "kl_prompts": 1, "kl_samples": 1},  # the real evaluation is evaluate_policy
        "output": {"dir": str(out), "save_every": 0, "keep_last": 1, "resume": "never", "overwrite": True,
                   "report_to": []},
    }


# ---- evaluation ----------------------------------------------------------------------------------------

def clustered(values: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error with samples clustered by prompt (the SE of the per-prompt means,
    which is the cluster-robust SE when every prompt has the same number of samples)."""
    n = int(clusters.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, clusters, values.double())
    sizes = torch.zeros(n, dtype=torch.float64).index_add_(0, clusters, torch.ones_like(values, dtype=torch.float64))
    means = sums / sizes
    mean = float(values.double().mean())
    return mean, float(means.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


@torch.no_grad()
def sequence_logprobs(policy, sequences: list[tuple[list[int], list[int]]], reference: bool = False,
                      chunk: int = 512, pad_id: int = 0) -> torch.Tensor:
    """``[S]`` log π(y|x) (or log π_ref) of each ``(prompt, response)``, scored in padded chunks (packing
    everything in one row would make CPU attention quadratic in the total length)."""
    from hypo_fast.losses import sequence_logps
    from hypo_fast.models.packing import pad_sequences

    out = []
    device = policy.head.weight.device
    for start in range(0, len(sequences), chunk):
        batch = pad_sequences(sequences[start:start + chunk], pad_id=pad_id).to(device)
        token = policy.reference_token_logprobs(batch) if reference else policy.token_logprobs(batch)
        out.append(sequence_logps(token.float(), batch.segment_ids, num_segments=batch.num_sequences).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_policy(task: Task, policy, tokenizer, spec: TaskSpec = TaskSpec(), seed_stream: str = "eval") -> dict:
    """Gold reward (both scenarios), reverse KL and class masses of a policy on fresh samples, with
    prompt-clustered standard errors; plus the exact template masses (teacher-forced)."""
    from hypo_fast.sampling import Sampler, SamplingConfig

    was_training = policy.model.training
    policy.model.eval()
    prompts = random_prompts(spec.eval_prompts, task.seed, "eval")
    prompt_ids = [encode(tokenizer, p)[0] for p in prompts]
    sampler = Sampler(policy, SamplingConfig(max_new_tokens=spec.max_new_tokens, num_samples=spec.eval_samples,
                                             stop_token_ids=(tokenizer.eos_token_id,)),
                      pad_id=tokenizer.pad_token_id)
    samples = sampler.generate(prompt_ids, seed=derive_seed(task.seed, seed_stream))
    responses = samples.responses()
    cluster = samples.prompt_index.cpu()
    sequences = [(prompt_ids[j], r) for j, r in zip(cluster.tolist(), responses)]
    pad = tokenizer.pad_token_id
    log_ratio = sequence_logprobs(policy, sequences, pad_id=pad) - sequence_logprobs(policy, sequences, True, pad_id=pad)
    index = classify(task, tokenizer, responses)
    cls = torch.tensor([2 if i < 0 else (0 if i in task.covered else 1) for i in index])
    out = {"samples": len(responses), "prompts": len(prompts)}
    out["kl"], out["kl_se"] = clustered(log_ratio, cluster)
    for scenario in SCENARIOS:
        table = task.rewards[scenario]
        reward = torch.tensor([OFF_TEMPLATE_REWARD if i < 0 else table[i] for i in index], dtype=torch.float64)
        out[f"reward_{scenario}"], out[f"reward_{scenario}_se"] = clustered(reward, cluster)
    for c, name in enumerate(CLASSES):
        out[f"mass_{name}"], out[f"mass_{name}_se"] = clustered((cls == c).double(), cluster)
    out["mass_not_covered"], out["mass_not_covered_se"] = clustered((cls != 0).double(), cluster)
    out["response_length"] = float(samples.mask.sum(1).float().mean())
    keys = [tuple(r) for r in responses]  # what the policy writes most often, special tokens shown
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    out["top_responses"] = [[tokenizer.decode(list(key)), n / len(keys), CLASSES[int(cls[first[key]])]]
                            for key, n in Counter(keys).most_common(4)]
    out.update(exact_masses(task, policy, tokenizer, prompt_ids))
    policy.model.train(was_training)
    return out


@torch.no_grad()
def exact_masses(task: Task, policy, tokenizer, prompt_ids: list[list[int]]) -> dict:
    """Teacher-forced probability of every template on every evaluation prompt, averaged over prompts."""
    template_ids = [encode(tokenizer, "", t)[1] for t in task.templates]
    sequences = [(p, t) for p in prompt_ids for t in template_ids]
    logp = sequence_logprobs(policy, sequences, pad_id=tokenizer.pad_token_id).view(len(prompt_ids), -1)
    probs = logp.double().exp().mean(0)  # [templates]
    covered = sum(float(probs[i]) for i in task.covered)
    uncovered = sum(float(probs[i]) for i in task.uncovered)
    out = {"exact_mass_covered": covered, "exact_mass_uncovered": uncovered,
           "exact_mass_off": 1.0 - covered - uncovered}
    for scenario in SCENARIOS:
        out[f"exact_reward_{scenario}"] = (float((probs * torch.tensor(task.rewards[scenario], dtype=torch.float64)).sum())
                                           + OFF_TEMPLATE_REWARD * out["exact_mass_off"])
    out["exact_template_probs"] = [round(float(p), 6) for p in probs]
    return out


# ---- one seed of the experiment -----------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One training configuration: DPO (``kl_coef = 0``) or HyPO."""

    beta: float
    kl_coef: float = 0.0

    @property
    def method(self) -> str:
        return "HyPO" if self.kl_coef > 0 else "DPO"

    @property
    def name(self) -> str:
        return f"HyPO β={self.beta:g} λ={self.kl_coef:g}" if self.kl_coef > 0 else f"DPO β={self.beta:g}"

    @property
    def slug(self) -> str:
        return f"hypo-b{self.beta:g}-l{self.kl_coef:g}" if self.kl_coef > 0 else f"dpo-b{self.beta:g}"


# the training sets of one seed: (coverage, the scenario whose reward labels the pairs). Partial-coverage
# pairs compare covered templates only, so one partial set serves both scenarios.
DATASETS = (("partial", "worse"), ("global", "worse"), ("global", "better"))


def plot_frontier(panels: dict[str, dict[str, tuple]], path: Path, title: str) -> Path:
    """Gold reward against KL(π ‖ π_ref), one panel per setting: ``{panel: {policy: ((kl, se), (reward, se))}}``.
    DPO points are joined across β (DPO's own frontier); HyPO points are joined across λ at each β."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.6 * rows), squeeze=False)
    for ax, (panel, points) in zip(axes.flat, panels.items()):
        groups: dict[str, list] = {}
        for policy, ((kl, kl_se), (reward, reward_se)) in points.items():
            if policy == "reference":
                group, style = "reference", dict(marker="*", markersize=14, color="black")
            elif policy.endswith("early-stopped"):  # DPO stopped on held-out pairs (the second task)
                group, style = "DPO early-stopped (β varies)", dict(marker="D", color="tab:purple")
            elif policy.startswith("DPO") and policy.endswith("st."):  # one β, several training lengths
                beta = policy.split()[1]
                group, style = f"DPO {beta} (steps vary)", dict(marker="o", color="tab:red" if beta == "β=0.1" else
                                                                "tab:orange")
            elif policy.startswith("DPO"):
                group, style = "DPO (β varies)", dict(marker="o", color="tab:red")
            else:
                beta = policy.split()[1]
                group, style = f"HyPO {beta} (λ varies)", dict(marker="s", color="tab:blue" if "0.1" in beta else
                                                                   "tab:cyan")
            groups.setdefault(group, []).append((kl, reward, policy, style))
            ax.errorbar(kl, reward, xerr=None if math.isnan(kl_se) else kl_se,
                        yerr=None if math.isnan(reward_se) else reward_se, linestyle="none", capsize=3, **style)
            ax.annotate(policy.replace("HyPO ", "").replace("DPO ", "DPO "), (kl, reward), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        for group, members in groups.items():
            members.sort()
            ax.plot([m[0] for m in members], [m[1] for m in members], color=members[0][3]["color"], alpha=0.5,
                    label=group, marker=members[0][3]["marker"], linestyle="-" if len(members) > 1 else "none")
        ax.set(title=panel, xlabel="reverse KL(π ‖ π_ref), nats per response", ylabel="gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quiet_progress_bars() -> None:
    """No per-library progress bars (tokenizing, loading, saving) between this script's own lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _train_summary(history: list[dict]) -> dict:
    steps = [h for h in history if "loss" in h]
    last = steps[-10:]
    mean = lambda key: sum(h[key] for h in last) / len(last) if last and key in last[0] else None  # noqa: E731
    return {"train_dpo_loss": mean("loss/dpo") if "loss/dpo" in steps[-1] else mean("loss"),
            "train_accuracy": mean("rewards/accuracies"), "train_online_kl": mean("kl/online"),
            "train_seconds": sum(h.get("step_seconds", 0.0) for h in steps)}


def run_seed(seed: int, cells: list[Cell], root: Path, spec: TaskSpec = TaskSpec(), train: TrainSpec = TrainSpec(),
             datasets: tuple[tuple[str, str], ...] = DATASETS, say=print) -> list[dict]:
    """SFT reference → pairs → every cell on every training set → evaluation; one row per policy.

    Each row holds the policy's evaluation (both scenarios' rewards, KL, class masses, exact masses);
    ``data`` names its training set (``reference`` for the SFT model itself)."""
    import gc
    import shutil
    import time

    from transformers import AutoTokenizer

    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer

    folder = root / f"seed{seed}"
    task = make_task(seed, spec)
    start = time.time()
    sft = train_sft(task, folder / "sft", spec)
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    reference = reference_policy(folder / "sft")
    base = {"seed": seed, "covered_templates": sorted(task.covered), **sft}
    ref_eval = evaluate_policy(task, reference, tokenizer, spec)
    say(f"seed {seed}: SFT reference in {time.time() - start:.0f} s (loss {sft['sft_loss']:.3f}, floor "
        f"{sft['sft_entropy_floor']:.3f}); reference mass covered {ref_eval['mass_covered']:.3f}, uncovered "
        f"templates {ref_eval['mass_uncovered']:.3f}, off-template {ref_eval['mass_off']:.3f}")
    rows = [{**base, "data": "reference", "policy": "reference", "method": "reference", "beta": None,
             "kl_coef": None, **ref_eval}]
    for coverage, scenario in datasets:
        pairs, counts = draw_pairs(task, reference, tokenizer, spec, coverage, scenario)
        data_name = "partial" if coverage == "partial" else f"global-{scenario}"
        if not pairs:
            raise RuntimeError(f"seed {seed}: the reference drew no pair of distinct covered templates "
                               f"({counts}); train it longer (TaskSpec.sft_steps)")
        data = write_rows(pairs, folder / f"{data_name}.jsonl")
        for cell in cells:
            start = time.time()
            out = folder / f"{data_name}-{cell.slug}"
            trainer = Trainer(config_from_dict(policy_config(out, data, folder / "sft", cell.beta, cell.kl_coef, seed,
                                                             train, spec)))
            history = trainer.train()
            evaluation = evaluate_policy(task, trainer.policy, tokenizer, spec)
            rows.append({**base, "data": data_name, "policy": cell.name, "method": cell.method, "beta": cell.beta,
                         "kl_coef": cell.kl_coef, **{f"pairs_{k}": v for k, v in counts.items()},
                         **_train_summary(history), **evaluation})
            say(f"seed {seed} {data_name:<14} {cell.name:<20} reward worse {evaluation['reward_worse']:+.3f} "
                f"better {evaluation['reward_better']:+.3f}  KL {evaluation['kl']:.2f}  not covered "
                f"{evaluation['mass_not_covered']:.3f}  ({time.time() - start:.0f} s)")
            for checkpoint in out.glob("checkpoint-*"):  # the rows keep what matters; weights are re-made by seed
                shutil.rmtree(checkpoint, ignore_errors=True)
            del trainer
            gc.collect()
    return rows
