"""The config tree: YAML + dotted overrides, validation errors that name the key, round trip."""

from __future__ import annotations

import pytest

from hypo_fast.train.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config

BASE = {"model": {"path": "/models/x"}, "data": {"train_file": "pairs.jsonl"}}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: /models/x, lora: {r: 8}}\ndata: {train_file: pairs.jsonl}\n"
                    "algorithm: {kl_coef: 0.05}\n")
    cfg = load_config(path, ["optim.lr=2e-6", "algorithm.loss_type=ipo", "model.lora.target_modules=[q_proj]",
                             "deepspeed.zero_stage=3"])
    assert cfg.algorithm.kl_coef == 0.05 and cfg.optim.lr == 2e-6 and cfg.algorithm.loss_type == "ipo"
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ("q_proj",)
    assert cfg.deepspeed.zero_stage == 3
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert config_to_dict(cfg)["model"]["lora"]["r"] == 8


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], "optim.lrr"),
    (["algorithm.kl_coef=-1"], "algorithm.kl_coef"),
    (["algorithm.loss_type=kto"], "algorithm.loss_type"),
    (["optim.max_steps=ten"], "optim.max_steps"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.offload_params=true"], "deepspeed.offload_params"),
    (["data.max_length=10", "data.max_prompt_length=20"], "data.max_length"),
    (["model.config={model_type: llama}"], "model.path"),
    (["bogus.key=1"], "bogus"),
    (["sampling.temperature=0"], "sampling.temperature"),
    (["algorithm.num_samples=0"], "algorithm.num_samples"),
    (["algorithm.kl_loss=k2"], "algorithm.kl_loss"),
    (["sampling.num_samples=2"], "sampling.num_samples"),  # k has one home: algorithm.num_samples
    (["optim.lr"], "key.sub=value"),
])
def test_bad_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(BASE, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
