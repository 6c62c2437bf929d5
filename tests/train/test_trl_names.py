"""A config written for TRL's DPOConfig runs under `hypo-fast train` unchanged, HyPO's additions beside it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from hypo_fast.cli import main
from hypo_fast.examples.toy import char_tokenizer, tiny_llama
from hypo_fast.train.config import ConfigError, config_from_dict

TRL_CONFIG = {  # what `trl dpo --config` reads, as a TRL user writes it
    "model_name_or_path": "MODEL", "dataset_name": "DATA", "output_dir": "OUT",
    "beta": 0.2, "loss_type": ["sigmoid"], "label_smoothing": 0.0, "max_length": 64,
    "learning_rate": 5.0e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.25,
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4,
    "bf16": False, "gradient_checkpointing": True, "seed": 7, "logging_steps": 1, "save_steps": 2,
    "save_total_limit": 1, "report_to": "none", "precompute_ref_log_probs": True,
    "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"],
    "push_to_hub": False, "eval_strategy": "no", "dataset_test_split": "test",
    "kl_coef": 0.1, "num_samples": 2, "temperature": 1.0, "max_new_tokens": 6,  # HyPO's additions
}


def test_every_trl_name_lands_on_its_setting():
    cfg = config_from_dict({**TRL_CONFIG, "model_name_or_path": "/m", "dataset_name": "/d.jsonl"})
    assert (cfg.model.path, cfg.data.train_file, cfg.output.dir) == ("/m", "/d.jsonl", "OUT")
    assert (cfg.algorithm.beta, cfg.algorithm.loss_type, cfg.algorithm.kl_coef, cfg.algorithm.num_samples) == \
        (0.2, "sigmoid", 0.1, 2)
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.eval_split) == (64, None, None)  # no eval
    o = cfg.optim
    assert (o.lr, o.scheduler, o.warmup_steps, o.pairs_per_micro_batch, o.gradient_accumulation_steps,
            o.max_steps, o.seed) == (5e-4, "cosine", 0.25, 4, 2, 4, 7)
    assert cfg.model.dtype == "float32" and cfg.model.gradient_checkpointing
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout, cfg.model.lora.target_modules) == \
        (4, 8, 0.05, ("q_proj", "v_proj"))
    assert (cfg.output.log_every, cfg.output.save_every, cfg.output.keep_last, cfg.output.report_to) == (1, 2, 1, ())
    assert cfg.sampling.max_new_tokens == 6


def test_a_trl_config_gets_trls_defaults_for_what_it_leaves_out():
    cfg = config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d.jsonl", "output_dir": "o"})
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.optim.num_epochs, cfg.optim.max_steps, cfg.optim.seed) == \
        (1e-6, "linear", 3.0, None, 42)
    assert (cfg.model.dtype, cfg.model.gradient_checkpointing, cfg.optim.pairs_per_micro_batch) == ("bfloat16", True, 8)
    assert cfg.model.lora is None and cfg.algorithm.kl_coef == 0.0  # plain DPO, full fine-tuning, as TRL


@pytest.mark.parametrize("key,value,match", [
    ("f_divergence_type", "forward_kl", "f_divergence_type: 'forward_kl' is not supported"),
    ("use_weighting", True, "use_weighting: True is not supported"),
    ("rpo_alpha", 0.5, "loss_type: \\[sigmoid, sft\\]"),
    ("max_completion_length", 128, "removed in TRL 0.29"),
    ("truncation_mode", "keep_end", "keep_start"),
    ("learning_rat", 1e-6, "unknown key learning_rat"),
])
def test_names_that_would_change_the_maths_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d.jsonl", key: value})


def test_trl_config_trains_under_the_cli(tmp_path, capsys):
    model = tiny_llama(vocab_size=12, hidden_size=32, layers=1)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer("abcdefgh").save_pretrained(tmp_path / "model")
    rows = [{"prompt": "ab" * (1 + i % 3), "chosen": "cd", "rejected": "gh"} for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {**TRL_CONFIG, "model_name_or_path": str(tmp_path / "model"), "dataset_name": str(tmp_path / "pairs.jsonl"),
           "output_dir": str(tmp_path / "out")}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "learning_rate=1e-3"]) == 0, capsys.readouterr().err[-2000:]  # TRL names too
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all("kl/online" in r for r in steps)
    assert max(r["learning_rate"] for r in steps) == pytest.approx(1e-3)
    assert (tmp_path / "out" / "checkpoint-4" / "adapter_model.safetensors").exists()
    card = (tmp_path / "out" / "checkpoint-4" / "README.md").read_text()  # TRL's kind of card, not PEFT's template
    assert "fine-tuned version of" in card and "### Framework versions" in card and "[More Information" not in card
    assert "ignored TRL settings that do not change what hypo_fast computes: precompute_ref_log_probs\n" \
        in capsys.readouterr().err


def test_num_train_epochs_sets_the_run_length(tmp_path):
    model = tiny_llama(vocab_size=12, hidden_size=32, layers=1)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer("abcdefgh").save_pretrained(tmp_path / "model")
    rows = [{"prompt": "ab", "chosen": "cd", "rejected": "gh"} for _ in range(10)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from hypo_fast.train.trainer import Trainer

    cfg = config_from_dict({"model_name_or_path": str(tmp_path / "model"), "dataset_name": str(tmp_path / "pairs.jsonl"),
                            "output_dir": str(tmp_path / "out"), "num_train_epochs": 2, "per_device_train_batch_size": 3,
                            "bf16": False, "gradient_checkpointing": False})
    assert Trainer(cfg).max_steps == 7  # ceil(2 epochs · 10 pairs / 3 per step)
    assert torch.get_default_dtype() == torch.float32


# ---- a flat TRL file as TRL users write it (the alignment-handbook's DPO recipe style) ------------------

RECIPE = """\
# Model arguments
model_name_or_path: {model}
torch_dtype: null
attn_implementation: sdpa
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_modules: all-linear
use_rslora: true
# Data training arguments
dataset_name: {data}
dataset_num_proc: 2
# DPOTrainer arguments
bf16: false
beta: 0.05
do_eval: true
eval_strategy: epoch
gradient_accumulation_steps: 1
gradient_checkpointing: false
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: tiny-dpo
learning_rate: 5.0e-4
adam_epsilon: 1.0e-6
log_level: info
logging_steps: 1
lr_scheduler_type: cosine
max_length: 64
num_train_epochs: 2
optim: adamw_torch
deepspeed: {deepspeed}
output_dir: {out}
run_name: my-tiny-dpo
per_device_train_batch_size: 4
per_device_eval_batch_size: 4
push_to_hub: false
report_to:
- none
save_strategy: epoch
save_total_limit: 3
seed: 42
warmup_ratio: 0.1
data_seed: 3
load_best_model_at_end: false
"""


def test_a_flat_trl_recipe_with_section_names_as_values_translates():
    cfg = config_from_dict(yaml.safe_load(RECIPE.format(model="/m", data="/d", deepspeed="null", out="o")))
    assert cfg.optim.eps == 1e-6 and cfg.output.run_name == "my-tiny-dpo"
    assert (cfg.eval.strategy, cfg.eval.every, cfg.output.save_strategy, cfg.output.save_every) == \
        ("epoch", 0, "epoch", 0)
    assert cfg.model.lora.use_rslora and cfg.model.lora.target_modules == ("all-linear",)
    assert cfg.deepspeed.config_file is None and cfg.model.attn_implementation == "sdpa"


@pytest.mark.parametrize("value,match", [("adafactor", "optim: 'adafactor' is not supported"),
                                         ("sgd", "hypo_fast runs torch AdamW")])
def test_an_optimizer_other_than_adamw_is_refused(value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d.jsonl", "optim": value})


def test_trl_deepspeed_file_and_inline_mapping(tmp_path):
    from hypo_fast.train.engine import deepspeed_config

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    cfg = config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", "deepspeed": str(tmp_path / "ds.json")})
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8  # "auto": the generated value
    inline = config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d",
                               "deepspeed": {"zero_optimization": {"stage": 1}}})
    assert deepspeed_config(inline, world_size=1)["zero_optimization"]["stage"] == 1
    section = config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", "deepspeed": {"zero_stage": 1}})
    assert section.deepspeed.zero_stage == 1  # hypo_fast's own section keeps working in a TRL file


def _trl_fields_or_skip():
    from hypo_fast.train.trl_names import trl_fields

    fields = trl_fields()
    if not fields:
        pytest.skip("TRL is not installed")
    return fields


def test_every_field_of_trls_dataclasses_is_classified():
    from hypo_fast.train import trl_names

    known = set(trl_names.NAMES) | set(trl_names.UNSUPPORTED) | trl_names.IGNORED | trl_names.CONSUMED
    assert sorted(set(_trl_fields_or_skip()) - known) == []


def test_every_trl_field_at_its_default_is_accepted():
    """All of DPOConfig, ModelConfig and ScriptArguments at TRL's defaults at once: what TRL itself would run."""
    fields = _trl_fields_or_skip()
    cfg = config_from_dict({**fields, "model_name_or_path": "/m", "dataset_name": "/d"})
    # ModelConfig's dtype default (float32) is given explicitly here, and an explicit dtype wins over bf16
    assert (cfg.model.dtype, cfg.output.dir, cfg.optim.eps, cfg.data.split) == ("float32", "trainer_output", 1e-8,
                                                                                  "train")


@pytest.mark.parametrize("key,value,match", [
    ("neftune_noise_alpha", 5.0, "NEFTune"), ("load_best_model_at_end", True, "last step's model"),
    ("fsdp", "full_shard", "FSDP is not supported"), ("lora_target_parameters", ["experts"], "MoE"),
    ("save_strategy", "best", "save_strategy: 'best' is not supported"),
])
def test_trl_fields_that_change_the_result_are_refused_with_a_reason(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", key: value})


def test_ignored_fields_are_named_once_and_only_when_set(caplog):
    _trl_fields_or_skip()
    config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", "log_level": "info", "data_seed": 3,
                      "full_determinism": False, "pad_token": "<pad>", "average_tokens_across_devices": True})
    notes = [r.getMessage() for r in caplog.records if "ignored TRL settings" in r.getMessage()]
    assert notes == ["ignored TRL settings that do not change what hypo_fast computes: data_seed, log_level, pad_token"]


def test_a_field_a_newer_trl_adds_is_classified_not_unknown(monkeypatch):
    from hypo_fast.train import trl_names

    monkeypatch.setattr(trl_names, "trl_fields", lambda: {"shiny_new_option": 0.0})
    config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", "shiny_new_option": 0.0})
    with pytest.raises(ConfigError, match="shiny_new_option: 0.5 is not supported .*TRL's default 0.0"):
        config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", "shiny_new_option": 0.5})


@pytest.mark.parametrize("override", ["bf16=false", "use_peft=true", "eval_strategy=steps", "adam_epsilon=1e-5",
                                      "optim=adamw_torch", "lora_modules_to_save=[lm_head]", "use_dora=true"])
def test_overrides_take_exactly_the_names_the_file_takes(override):
    base = {"model_name_or_path": "/m", "dataset_name": "/d", "use_peft": True, "dataset_test_split": "test"}
    key, value = override.split("=", 1)
    as_file = config_from_dict({**base, key: yaml.safe_load(value)})
    assert config_from_dict(base, [override]) == as_file


def test_trl_overrides_on_a_hypo_fast_config_get_no_trl_defaults():
    native = {"model": {"path": "/m"}, "data": {"train_file": "/d"}, "optim": {"lr": 1e-3}}
    cfg = config_from_dict(native, ["bf16=true", "use_peft=true", "lora_r=4", "adam_epsilon=1e-5"])
    assert (cfg.model.dtype, cfg.model.lora.r, cfg.optim.eps, cfg.optim.lr, cfg.optim.scheduler) == \
        ("bfloat16", 4, 1e-5, 1e-3, "cosine")


def test_trls_command_line_form_becomes_overrides():
    from hypo_fast.cli import trl_arguments

    argv = ["train", "--config", "dpo.yaml", "--learning_rate", "1e-6", "--use_peft", "--lora_target_modules",
            "q_proj", "v_proj", "--eval_strategy=epoch", "--no_gradient_checkpointing", "optim.seed=3"]
    assert trl_arguments(argv) == ["train", "dpo.yaml", "learning_rate=1e-6", "use_peft=true",
                                   "lora_target_modules=[q_proj, v_proj]", "eval_strategy=epoch",
                                   "gradient_checkpointing=false", "optim.seed=3"]


def test_peft_options_reach_peft():
    from hypo_fast.models.loading import add_lora

    model = add_lora(tiny_llama(vocab_size=12, hidden_size=32, layers=1), r=4, alpha=8,
                     target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True,
                     modules_to_save=["embed_tokens"])
    peft_config = model.peft_config["default"]
    assert peft_config.use_dora and peft_config.use_rslora and list(peft_config.modules_to_save) == ["embed_tokens"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA's magnitudes
    assert any("embed_tokens" in n and "modules_to_save" in n for n in trainable)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)


def test_load_in_4bit_is_refused_with_the_reason_where_it_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the refusal is for machines without it")
    base = {"model_name_or_path": "/m", "dataset_name": "/d", "load_in_4bit": True}
    with pytest.raises(ConfigError, match="model.load_in_4bit: trains LoRA adapters only"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match="model.load_in_4bit: needs a CUDA GPU"):
        config_from_dict({**base, "use_peft": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True})


def test_adam_epsilon_reaches_the_optimizer():
    from hypo_fast.train.engine import make_optimizer

    cfg = config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d", "adam_epsilon": 1e-5, "bf16": False})
    assert make_optimizer(torch.nn.Linear(2, 2), cfg.optim).param_groups[0]["eps"] == 1e-5


@pytest.mark.slow
def test_a_flat_trl_recipe_trains_under_the_cli_as_written(tmp_path, capsys):
    """The recipe above, launched as TRL's CLI is: ``--config`` and ``--name value``; evaluation and
    checkpoints after each of the 2 epochs, run named as given."""
    model = tiny_llama(vocab_size=12, hidden_size=32, layers=1)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer("abcdefgh").save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    rows = [{"prompt": "ab" * (1 + i % 3), "chosen": "cd", "rejected": "gh"} for i in range(8)]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                                  "gradient_clipping": "auto"}))
    path = tmp_path / "dpo.yaml"
    path.write_text(RECIPE.format(model=tmp_path / "model", data=tmp_path / "data" / "train.jsonl",
                                  deepspeed=tmp_path / "ds.json", out=tmp_path / "out"))
    assert main(["train", "--config", str(path), "--learning_rate", "1e-3", "--num_samples", "1"]) == 0, \
        capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "loss" not in r] == [0, 2, 4]  # the start, then after each epoch
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "ignored TRL settings that do not change what hypo_fast computes: data_seed, dataset_num_proc, " \
           "do_eval, gradient_checkpointing_kwargs, hub_model_id, log_level, per_device_eval_batch_size" in capsys.readouterr().err


def test_the_model_card_is_trls_kind_not_pefts_template():
    from hypo_fast.train.model_card import model_card

    cfg = config_from_dict({**TRL_CONFIG, "model_name_or_path": "/models/base", "dataset_name": "/d/pairs.jsonl",
                            "run_name": "tiny-hypo"})
    from hypo_fast.train.config import config_to_dict

    card = model_card(config_to_dict(cfg), step=4)
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "/models/base" and front["library_name"] == "peft"
    assert {"hypo_fast", "trl", "dpo", "hypo", "lora"} <= set(front["tags"])
    assert front["datasets"] == ["/d/pairs.jsonl"]
    for text in ("# tiny-hypo", "fine-tuned version of /models/base", "https://huggingface.co/papers/2406.01462",
                 "- beta: 0.2", "- learning_rate: 0.0005", "- kl_coef: 0.1", "- lora_r: 4",
                 "### Framework versions", "- TRL: ", "- Transformers: ", "- PyTorch: "):
        assert text in card, text
    dpo = model_card(config_to_dict(config_from_dict({"model_name_or_path": "/m", "dataset_name": "/d"})), 1)
    assert "https://huggingface.co/papers/2305.18290" in dpo and "hypo\n" not in dpo


def test_eval_strategy_no_as_written_or_as_trls_default():
    base = {"model_name_or_path": "/m", "dataset_name": "/d", "dataset_test_split": "test"}
    assert config_from_dict({**base, "eval": {"every": 5}}).eval.every == 5  # TRL's default: the section stands
    assert config_from_dict({**base, "eval": {"every": 5}, "eval_strategy": "no"}).eval.every == 0
    native = {"model": {"path": "/m"}, "data": {"train_file": "/d"}, "eval": {"every": 5}}
    assert config_from_dict(native, ["eval_strategy=no"]).eval.every == 0
    steps = config_from_dict({**base, "eval_strategy": "steps", "logging_steps": 3})
    assert (steps.eval.every, steps.data.eval_split) == (3, "test")  # eval_steps defaults to logging_steps


def test_the_lm_head_in_modules_to_save_is_refused_with_the_reason():
    """The LoRA reference is the base model with adapters off; the fused head borrows the head's weight, which
    would be the trained copy: refused rather than scoring the reference with it."""
    from hypo_fast.models.loading import add_lora

    with pytest.raises(ValueError, match="modules_to_save \\['lm_head'\\]: the LM head cannot be trained in full"):
        add_lora(tiny_llama(vocab_size=12, hidden_size=32, layers=1), r=4, alpha=8, target_modules=["q_proj"],
                 modules_to_save=["lm_head"])
