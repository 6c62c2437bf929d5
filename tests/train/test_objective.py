"""The trainer optimises the HyPO objective it claims, checked end to end through its own step.

A two-letter task with responses of at most two tokens has 31 possible responses per prompt, so
KL(π_τ ‖ π_ref,τ) can be summed exactly from the Hugging Face model's own logits (an oracle that shares
no code with the packer, the fused head or the sampler). The gradient of the trainer's step loss,
averaged over many draws, must equal the exact gradient of mean ℓ_dpo + λ·KL within its standard error,
at τ = 1 and at τ ≠ 1, for both estimators of the online term (the paper's RLOO and exact_token).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from hypo_fast.examples.toy import char_tokenizer
from hypo_fast.losses import dpo_loss
from hypo_fast.models import pack_step
from hypo_fast.objective import OnlineLogps
from hypo_fast.train import evaluate
from hypo_fast.train.config import config_from_dict
from hypo_fast.train.trainer import Trainer
from tests.train.helpers import toy_config

ALPHABET = "ab"
MAX_NEW = 2


def _tiny_task(tmp_path, temperature: float, kl_coef: float, num_samples: int = 4, **algorithm) -> Trainer:
    tokenizer = tmp_path / "tok"
    char_tokenizer(ALPHABET).save_pretrained(tokenizer)
    rows = [{"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in (("ab", "a", "b"), ("ba", "b", "ab"), ("aab", "ba", "a"), ("bba", "a", "bb"))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"config": {"model_type": "llama", "vocab_size": 6, "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "max_position_embeddings": 16, "tie_word_embeddings": False},
                  "tokenizer": str(tokenizer), "init_seed": 0},
        "data": {"train_file": str(data), "max_prompt_length": 4, "max_length": 8},
        "algorithm": {"beta": 0.5, "kl_coef": kl_coef, "num_samples": num_samples, **algorithm},
        "sampling": {"max_new_tokens": MAX_NEW, "temperature": temperature},
        "optim": {"lr": 1e-3, "max_steps": 1},
        "output": {"dir": str(tmp_path / "run"), "resume": "never", "report_to": []},
    }
    trainer = Trainer(config_from_dict(cfg))
    with torch.no_grad():  # move the policy away from the reference so that ∇KL is large
        generator = torch.Generator().manual_seed(1)
        for p in trainer.policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.6)
    return trainer


def _responses(eos: int, vocab: int) -> list[list[int]]:
    """Every response the sampler can return: EOS first, or two tokens (EOS allowed second)."""
    return [[eos]] + [[a, b] for a, b in itertools.product(range(vocab), repeat=2) if a != eos]


def _sequence_logps(model, prompt, responses, temperature) -> torch.Tensor:
    """``[R]`` log π_τ(y | x) from the HF model's own logits (its LM head, no hypo_fast code)."""
    out = []
    for response in responses:
        ids = torch.tensor([list(prompt) + response])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature  # [|y|, V]
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum())
    return torch.stack(out)


def _exact_objective(trainer: Trainer, pair_index, prompt_index) -> torch.Tensor:
    """mean ℓ_dpo over the pairs (deterministic) + λ · mean over prompts of the exact KL(π_τ ‖ π_ref,τ)."""
    dpo = trainer.step_loss(pair_index, [], seed=0).loss  # no prompts: the step is its DPO term alone
    tau, policy = trainer.policy.temperature, trainer.policy
    responses = _responses(trainer.tokenizer.eos_token_id, 6)
    kls = []
    for i in prompt_index:
        prompt = trainer.prompts[i].ids
        logp = _sequence_logps(policy.model, prompt, responses, tau)
        with torch.no_grad():
            ref = _sequence_logps(policy.reference.model, prompt, responses, tau)
        assert abs(logp.exp().sum().item() - 1) < 1e-5  # the enumeration covers the whole sequence space
        kls.append((logp.exp() * (logp - ref)).sum())
    return dpo + trainer.objective.kl_coef * torch.stack(kls).mean()


def _gradient(trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
    """The flat gradient of ``loss`` as the trainer's DeepSpeed engine computes it."""
    params = [p for p in trainer.policy.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    trainer.engine.backward(loss)
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return grad


@pytest.mark.parametrize("kl_loss", ["rloo", "exact_token"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_step_gradient_is_unbiased_for_dpo_plus_lambda_kl(tmp_path, temperature, kl_loss):
    trainer = _tiny_task(tmp_path, temperature, kl_coef=1.0, kl_loss=kl_loss)
    pair_index, prompt_index = [0, 1, 2, 3], [0, 1, 2, 3]

    exact_objective = _exact_objective(trainer, pair_index, prompt_index)
    exact = _gradient(trainer, exact_objective)
    dpo_only_loss = trainer.step_loss(pair_index, [], seed=0).loss
    dpo_only = _gradient(trainer, dpo_only_loss)
    steps = [trainer.step_loss(pair_index, prompt_index, seed=s) for s in range(120)]
    draws = torch.stack([_gradient(trainer, step.loss) for step in steps])  # [draws, params]
    if kl_loss == "exact_token":  # the logged exact KL estimates the same KL as the k1 one, with less noise
        exact_kl = (exact_objective - dpo_only_loss).item()
        for key in ("kl/online_exact", "kl/online"):
            values = torch.tensor([float(step.metrics[key]) for step in steps])
            se = values.std() / len(values) ** 0.5
            assert abs(values.mean() - exact_kl) < 4.5 * se, (key, values.mean(), exact_kl, se)
        assert all(abs(float(step.metrics["loss/kl"]) - float(step.metrics["kl/online_exact"])) < 1e-5
                   for step in steps)  # the surrogate's value is the exact KL estimate

    kl_direction = (exact - dpo_only) / (exact - dpo_only).norm()  # where the KL term moves the gradient
    directions = torch.cat([kl_direction[None], torch.randn(4, exact.numel(), generator=torch.Generator().manual_seed(0))])
    projected = draws @ directions.T  # [draws, 5]
    mean, se = projected.mean(0), projected.std(0) / math.sqrt(draws.shape[0])
    z = (mean - directions @ exact) / se
    assert z.abs().max() < 4.5, f"step gradient is biased: z = {z.tolist()}"
    # the test has power: leaving out the KL term would be this many standard errors off
    assert ((exact - dpo_only) @ kl_direction) / se[0] > 10


def test_step_loss_normalises_by_response_length_like_the_hf_model(tmp_path):
    """Length-normalised loss types through the trainer's step (packed forward, cached summed reference
    log-probs, token counts from the packer) equal the same losses from the HF model's own logits."""
    algorithm = {"loss_type": ["ipo", "sigmoid_norm", "sft", "aot"], "loss_weights": [1.0, 0.5, 0.3, 0.2]}
    trainer = _tiny_task(tmp_path, 1.0, kl_coef=0.0, **algorithm)
    pair_index = [0, 1, 2, 3]
    pairs = [trainer.train_pairs[i] for i in pair_index]
    policy, reference = trainer.policy.model, trainer.policy.reference.model
    sides = ("chosen", "rejected")
    responses = {side: [list(getattr(p, f"{side}_ids")) for p in pairs] for side in sides}
    with torch.no_grad():
        logps, ref = ({side: torch.cat([_sequence_logps(model, p.prompt_ids, [y], 1.0)
                                        for p, y in zip(pairs, responses[side])]) for side in sides}
                      for model in (policy, reference))
        step = trainer.step_loss(pair_index, [], seed=0).loss
    counts = {side: torch.tensor([float(len(y)) for y in responses[side]]) for side in sides}
    assert counts["chosen"].tolist() != counts["rejected"].tolist()  # lengths differ, so normalising matters
    expected = dpo_loss(logps["chosen"], logps["rejected"], ref["chosen"], ref["rejected"], beta=0.5,
                        chosen_tokens=counts["chosen"], rejected_tokens=counts["rejected"], **algorithm)[0].mean()
    assert abs(step.item() - expected.item()) < 1e-5, (step.item(), expected.item())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_evaluation_estimates_the_objectives_kl_on_the_same_samples(tmp_path, temperature):
    trainer = _tiny_task(tmp_path, temperature, kl_coef=0.5)
    prompts = [trainer.prompts[i] for i in (0, 1)]
    samples = trainer.sampler.generate([p.ids for p in prompts], seed=7)
    online = [(prompts[i].ids, r) for i, r in zip(samples.prompt_index.tolist(), samples.responses())]
    # the training objective's KL on these samples (training forward, online reference forward)
    batch = pack_step([], online)
    with torch.no_grad():
        _, training = batch.split(trainer.policy.step_logprobs(batch))
        ref = trainer.policy.reference_online_logprobs(batch)
    objective_kl = OnlineLogps(training, ref, batch.online_segment_ids, batch.num_online).kl("k1").mean()
    # evaluation on the same draw (same sampler settings and seed)
    evaluation = evaluate.sampled_kl_metrics(trainer.policy, trainer.sampler, prompts, seed=7, tokenizer=None,
                                             reward=None, device=torch.device("cpu"))
    assert abs(evaluation["eval/kl/k1"] - objective_kl.item()) < 1e-5
    assert objective_kl.item() > 0.05  # a policy away from its reference, so the check is not 0 = 0


def _metric_rows(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], rows[-1]


def test_hypo_run_logs_the_loss_identity_and_ends_closer_to_the_reference(tmp_path):
    finals = {}
    for name, kl_coef in (("dpo", 0.0), ("hypo", 0.5)):
        cfg = toy_config(tmp_path, name, kl_coef=kl_coef, steps=12, optim={"lr": 5e-3, "pairs_per_micro_batch": 4},
                         eval={"every": 0, "kl_prompts": 8, "kl_samples": 4})
        Trainer(config_from_dict(cfg)).train()
        steps, final = _metric_rows(tmp_path / name)
        for row in steps:  # the logged loss is the objective: loss = loss/dpo + λ·loss/kl
            assert abs(row["loss"] - (row["loss/dpo"] + kl_coef * row.get("loss/kl", 0.0))) < 1e-6, row
            assert ("kl/online" in row) == (kl_coef > 0)
        finals[name] = final["eval/kl/k1"]
    assert finals["dpo"] > 1.0, finals  # DPO drifts on this task …
    assert finals["hypo"] < 0.5 * finals["dpo"], finals  # … and the KL term holds HyPO near the reference
