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
    assert "ignored TRL settings that do not change what hypo_fast computes: precompute_ref_log_probs, push_to_hub" \
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
