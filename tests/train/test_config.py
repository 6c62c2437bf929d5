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


def test_loss_type_list_and_weights(tmp_path):
    """TRL 1.16's ``loss_type`` list with ``loss_weights``; a plain name stays a plain name."""
    cfg = config_from_dict(BASE, ["algorithm.loss_type=[sigmoid, bco_pair, sft]",
                                  "algorithm.loss_weights=[0.8, 0.2, 1]", "algorithm.discopop_tau=0.1"])
    assert cfg.algorithm.loss_type == ("sigmoid", "bco_pair", "sft")
    assert cfg.algorithm.loss_weights == (0.8, 0.2, 1.0) and cfg.algorithm.discopop_tau == 0.1
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert config_from_dict(BASE, ["algorithm.loss_type=aot"]).algorithm.loss_type == "aot"


@pytest.mark.parametrize("overrides,match", [
    (["algorithm.loss_type=[sigmoid, sft]", "algorithm.loss_weights=[1]"], "algorithm.loss_weights: has 1 weights"),
    (["algorithm.loss_type=[sigmoid, aot_pair]"], "algorithm.loss_type: .*'aot_pair'"),
    (["algorithm.loss_type=3"], "algorithm.loss_type: expected a string, got 3 or expected a list"),
    (["algorithm.loss_type=[sigmoid, 3]"], r"algorithm.loss_type\[1\]"),
    (["algorithm.loss_weights=[x]"], r"algorithm.loss_weights\[0\]: expected a number"),
    (["algorithm.loss_type=exo_pair"], "algorithm.label_smoothing"),
])
def test_bad_loss_options_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(BASE, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_sampling_is_one_class_whose_trainer_set_fields_are_not_keys():
    """The `sampling` section is the Sampler's own SamplingConfig: its engine settings are keys, the fields the
    trainer sets from elsewhere (k, the stop tokens, the seed) are refused naming their home, and not saved."""
    from hypo_fast.sampling import SamplingConfig

    cfg = config_from_dict(BASE, ["sampling.cache=dynamic", "sampling.compact_below=0.25"])
    assert isinstance(cfg.sampling, SamplingConfig)
    assert (cfg.sampling.cache, cfg.sampling.compact_below) == ("dynamic", 0.25)
    saved = config_to_dict(cfg)["sampling"]
    assert saved["cache"] == "dynamic" and not {"num_samples", "stop_token_ids", "seed", "greedy"} & set(saved)
    for key, home in (("seed", "optim.seed"), ("stop_token_ids", "sampling.stop_on_eos"), ("greedy", "π_τ")):
        with pytest.raises(ConfigError, match=f"sampling.{key}: not a key .*{home}"):
            config_from_dict(BASE, [f"sampling.{key}=1"])


def test_a_run_record_from_before_a_new_key_is_unchanged_at_its_default():
    """Resuming a run recorded by an earlier release: keys it lacks compare equal at their defaults."""
    from hypo_fast.train.run_folder import differences

    new = config_to_dict(config_from_dict(BASE))
    old = {**new, "sampling": {k: v for k, v in new["sampling"].items() if k != "cache"}}
    assert differences(old, new, {}, {}) == []
    changed = config_to_dict(config_from_dict(BASE, ["sampling.cache=dynamic"]))
    assert differences(old, changed, {}, {}) == ["sampling.cache: 'auto' → 'dynamic'"]
