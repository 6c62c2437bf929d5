"""Few-step DPO and HyPO runs in one process: metrics, checkpoints that plain transformers loads, LoRA,
non-finite losses, and CLI errors."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import yaml

from hypo_fast.train.config import config_from_dict
from hypo_fast.train.trainer import Trainer
from tests.train.helpers import PYTHON, subprocess_env, toy_config


def test_dpo_run_logs_trl_metrics_and_saves_a_loadable_checkpoint(tmp_path):
    trainer = Trainer(config_from_dict(toy_config(tmp_path, "dpo", steps=4)))
    history = trainer.train()
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4  # policy = reference at the first step
    assert steps[-1]["loss"] < steps[0]["loss"]
    for key in ("rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/chosen", "logits/chosen",
                "tokens_per_s", "peak_memory_mb", "learning_rate", "grad_norm", "epoch", "num_tokens"):
        assert key in steps[-1]
    pairs = trainer.train_pairs
    per_pair = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / len(pairs)
    assert [h["epoch"] for h in steps] == [4 * (s + 1) / len(pairs) for s in range(4)]  # 4 pairs a step
    assert steps[-1]["num_tokens"] > steps[0]["num_tokens"] > 0.5 * 4 * per_pair  # cumulative, TRL's count
    assert "generation/tokens_per_s" not in steps[-1]  # λ = 0: DPO never samples
    final = history[-1]
    assert {"eval/kl/k1", "eval/reward", "eval/rewards/accuracies"} <= set(final)

    from transformers import AutoModelForCausalLM

    checkpoint = tmp_path / "dpo" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()
    assert yaml.safe_load((checkpoint / "config.yaml").read_text())["optim"]["max_steps"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    for (name, a), b in zip(loaded.state_dict().items(), trainer.policy.model.state_dict().values()):
        assert torch.equal(a, b.cpu()), name
    lines = (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1


def test_hypo_run_samples_and_regularises(tmp_path):
    history = Trainer(config_from_dict(toy_config(tmp_path, "hypo", kl_coef=0.5, steps=3))).train()
    steps = [h for h in history if "loss" in h]
    assert all("generation/tokens_per_s" in h and "kl/online" in h and "loss/kl" in h for h in steps)
    assert all(math.isfinite(h["loss"]) for h in steps)


def test_lora_run_saves_the_adapter(tmp_path):
    cfg = toy_config(tmp_path, "lora", kl_coef=0.5, steps=2)
    cfg["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    trainer = Trainer(config_from_dict(cfg))
    trainer.train()
    checkpoint = tmp_path / "lora" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()


def test_nonfinite_loss_skips_the_step_and_changes_no_weights(tmp_path):
    trainer = Trainer(config_from_dict(toy_config(tmp_path, "nan", steps=3)))
    original = trainer.micro_step

    def poisoned(micro):
        out = original(micro)
        if trainer.step == 1:
            out.loss = out.loss * float("nan")
        return out

    trainer.micro_step = poisoned
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    metrics = trainer.train_step()  # the poisoned step
    assert metrics["skipped_nonfinite"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.model.state_dict().items())
    assert trainer.train_step()["skipped_nonfinite"] == 0.0
    assert not all(torch.equal(before[k], v) for k, v in trainer.policy.model.state_dict().items())


def _cli(*args, cwd):
    return subprocess.run([PYTHON, "-m", "hypo_fast.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=subprocess_env(), timeout=600)


@pytest.mark.slow
def test_cli_reports_bad_config_and_bad_data(tmp_path):
    cfg = toy_config(tmp_path, "cli", steps=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _cli("train", str(path), "optim.lrr=1", cwd=tmp_path)
    assert result.returncode == 2 and "optim.lrr" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab", "chosen": "c", "rejected": "d"}\n{"prompt": "ab", "chosen": "c"}\n')
    result = _cli("train", str(path), f"data.train_file={bad}", cwd=tmp_path)
    assert result.returncode == 2 and "bad.jsonl: line 2" in result.stderr and "rejected" in result.stderr


def test_reward_from_a_local_sequence_classifier(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hypo_fast.examples.toy import char_tokenizer
    from hypo_fast.train.evaluate import load_reward

    tokenizer = char_tokenizer("abcdefgh")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"), torch.device("cpu"))
    scores = reward(["ab", "abc"], ["cd", "e"])
    with torch.no_grad():
        expected = model(**tokenizer(["abcd"], return_tensors="pt")).logits[0, 0].item()
    assert len(scores) == 2 and abs(scores[0] - expected) < 1e-5


def test_tensorboard_events_are_written(tmp_path):
    cfg = toy_config(tmp_path, "tb", steps=1)
    cfg["output"]["report_to"] = ["tensorboard"]
    Trainer(config_from_dict(cfg)).train()
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_names_are_those_of_hf_trainer_and_trl(tmp_path):
    """TRL's integration logs through HF's Trainer, whose TensorBoard/W&B callbacks rename its log history
    (``loss``, ``eval_rewards/chosen``) with ``rewrite_logs``: the CLI's scalars carry the same names."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations.integration_utils import rewrite_logs

    cfg = toy_config(tmp_path, "tb", steps=2, eval={"every": 1})
    cfg["output"]["report_to"] = ["tensorboard"]
    Trainer(config_from_dict(cfg)).train()
    rows = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    history = {(k.replace("eval/", "eval_", 1) if k.startswith("eval/") else k): v  # HF's log-history names
               for row in rows for k, v in row.items() if k != "step"}
    tags = set(EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload().Tags()["scalars"])
    assert tags == set(rewrite_logs(history))
    assert {"train/loss", "train/rewards/chosen", "train/learning_rate", "eval/rewards/chosen"} <= tags
    assert {"train/entropy", "train/mean_token_accuracy", "eval/entropy", "eval/mean_token_accuracy"} <= tags


def test_the_schedule_is_transformers_get_scheduler(tmp_path):
    """Warm-up as Hugging Face's: the first update runs at lr·0; the logged rate is the one each step used."""
    import torch
    from transformers import get_scheduler

    cfg = toy_config(tmp_path, "schedule", steps=6, optim={"lr": 1e-3, "warmup_steps": 2, "scheduler": "cosine"})
    history = Trainer(config_from_dict(cfg)).train()
    logged = [h["learning_rate"] for h in history if "loss" in h]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    reference = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert logged == pytest.approx(expected, abs=1e-12) and logged[0] == 0.0
