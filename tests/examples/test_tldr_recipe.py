"""The TL;DR / Pythia-1.4B recipe: its config loads as declared, a tiny-shaped run of it trains on CPU and its
summary is the median and min–max over seeds of what each run logged; a reward model without a pad token
scores batches."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from hypo_fast.examples import tldr
from hypo_fast.train.config import load_config


def test_recipe_config_loads_as_declared():
    cfg = load_config(tldr.RECIPE)
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing and cfg.model.lora is None
    assert cfg.algorithm.kl_coef > 0 and cfg.algorithm.num_samples >= 2 and cfg.sampling.temperature == 1.0
    assert cfg.eval.reward and cfg.eval.every > 0 and cfg.data.eval_file
    assert cfg.data.max_length == cfg.data.max_prompt_length + cfg.sampling.max_new_tokens
    dpo = load_config(tldr.RECIPE, ["algorithm.kl_coef=0", "model.path=/elsewhere"])
    assert dpo.algorithm.kl_coef == 0 and dpo.model.path == "/elsewhere"


def test_pythia_shape_is_pythia_1b4():
    from transformers import AutoConfig

    kwargs = dict(tldr.SHAPES["pythia-1.4b"])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 1.40e9 < n < 1.42e9  # Pythia-1.4B: 1,414,647,808 parameters


def _write_metrics(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_is_median_and_range_over_seeds(tmp_path):
    kl = {0: [0.0, 1.0, 3.0], 1: [0.0, 2.0, 5.0], 2: [0.0, 4.0, 4.0]}
    for seed, values in kl.items():
        rows = [{"step": 1, "loss": 0.7}]  # a training row: ignored
        rows += [{"step": 10 * i, "eval/kl/k1": v, "eval/reward": -v} for i, v in enumerate(values)]
        if seed == 2:
            rows.append({"step": 30, "eval/kl/k1": 9.0})  # a step not every seed reached: left out
        _write_metrics(tmp_path / f"seed{seed}", rows)
    summary = tldr.main(["summarise", str(tmp_path)])
    assert summary["steps"] == [0, 10, 20]
    rows = summary["metrics"]["eval/kl/k1"]
    assert [r["median"] for r in rows] == [0.0, 2.0, 4.0]
    assert [(r["min"], r["max"]) for r in rows] == [(0.0, 0.0), (1.0, 4.0), (3.0, 5.0)]
    assert [r["median"] for r in summary["metrics"]["eval/reward"]] == [0.0, -2.0, -4.0]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "kl_over_training.png").stat().st_size > 5000


@pytest.mark.slow
def test_tiny_recipe_trains_on_cpu_and_summarises(tmp_path):
    summary = tldr.main(["smoke", "--out", str(tmp_path), "--shape", "tiny", "--steps", "2", "--seeds", "0", "1"])
    assert summary["seeds"] == ["seed0", "seed1"] and summary["steps"] == [0, 1, 2]
    kl = summary["metrics"]["eval/kl/k1"]
    assert kl[0]["per_seed"] == pytest.approx([0.0, 0.0], abs=1e-5)  # step 0: the policy is the reference (fp32 noise)
    assert all(r["max"] > 0 for r in kl[1:])  # it moved
    for metric, rows in summary["metrics"].items():  # the summary is what each seed logged
        for row in rows:
            logged = [tldr.read_evaluations(tmp_path / "runs" / f"seed{s}")[row["step"]][metric] for s in (0, 1)]
            assert row["per_seed"] == logged and row["median"] == pytest.approx(statistics.median(logged))
    rewards = summary["metrics"]["eval/reward"]
    assert len(rewards) == 3 and all(isinstance(r["median"], float) for r in rewards)
    cfg = (tmp_path / "runs" / "seed1" / "config.yaml").read_text()
    assert "kl_coef: 0.05" in cfg and "gradient_checkpointing: true" in cfg and "zero_stage: 2" in cfg


def test_reward_model_without_pad_token_scores_a_batch(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hypo_fast.examples.toy import char_tokenizer
    from hypo_fast.train.evaluate import load_reward

    tokenizer = char_tokenizer("abc ")
    tokenizer.pad_token = None
    kwargs = dict(tldr.SHAPES["tiny"], num_labels=1)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    model = AutoModelForSequenceClassification.from_config(config)
    assert model.config.pad_token_id is None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    score = load_reward(str(tmp_path), "cpu")
    batch = score(["ab", "a"], [" c", " cab ab"])
    alone = score(["ab"], [" c"])
    assert len(batch) == 2 and batch[0] == pytest.approx(alone[0], abs=1e-5)  # padding does not change a score
