"""TRL's names: a config written for TRL's ``DPOConfig`` (flat keys, as ``trl dpo --config`` reads them)
runs under ``hypo-fast train`` unchanged, with HyPO's additions beside it.

Each TRL key maps to one hypo_fast setting; a TRL-style config also gets TRL 1.16's defaults for the keys it
leaves out (learning rate 1e-6, linear schedule, bf16, 3 epochs, …), so it trains what TRL would. Keys
that would change the maths in ways hypo_fast does not implement are refused by name; keys that only
concern TRL's own infrastructure (the Hub, dataloader workers, …) are ignored with one warning.
"""

from __future__ import annotations

import logging

from hypo_fast.train.errors import ConfigError

log = logging.getLogger("hypo_fast")


# TRL / TrainingArguments / ModelConfig / ScriptArguments name → dotted hypo_fast key (and a value converter)
NAMES = {
    "model_name_or_path": "model.path",
    "dtype": "model.dtype", "torch_dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules",
    "dataset_name": "data.train_file", "dataset_train_split": "data.split", "dataset_test_split": "data.eval_split",
    "max_length": "data.max_length", "max_prompt_length": "data.max_prompt_length",
    "beta": "algorithm.beta", "loss_type": "algorithm.loss_type", "loss_weights": "algorithm.loss_weights",
    "label_smoothing": "algorithm.label_smoothing", "discopop_tau": "algorithm.discopop_tau",
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.scheduler", "lr_scheduler_kwargs": "optim.scheduler_kwargs",
    "warmup_steps": "optim.warmup_steps", "warmup_ratio": "optim.warmup_steps", "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm", "per_device_train_batch_size": "optim.pairs_per_micro_batch",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps", "num_train_epochs": "optim.num_epochs",
    "max_steps": "optim.max_steps", "seed": "optim.seed",
    "output_dir": "output.dir", "logging_steps": "output.log_every", "save_steps": "output.save_every",
    "save_total_limit": "output.keep_last", "report_to": "output.report_to", "eval_steps": "eval.every",
    "deepspeed": "deepspeed.config_file",
    # HyPO's additions, flat beside TRL's names
    "kl_coef": "algorithm.kl_coef", "num_samples": "algorithm.num_samples", "kl_loss": "algorithm.kl_loss",
    "temperature": "sampling.temperature", "max_new_tokens": "sampling.max_new_tokens",
    "prompts_per_step": "sampling.prompts_per_step",
}
# TRL 1.16's defaults that differ from hypo_fast's, applied to a TRL-style config that leaves them out
TRL_DEFAULTS = {"learning_rate": 1e-6, "lr_scheduler_type": "linear", "bf16": True, "gradient_checkpointing": True,
                "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "logging_steps": 10, "seed": 42,
                "max_length": 1024, "save_steps": 500, "report_to": "none"}
# settings that change what is computed and that hypo_fast does not implement: refused unless at TRL's default
UNSUPPORTED = {
    "f_divergence_type": ("reverse_kl", "only the reverse-KL DPO family is implemented"),
    "use_weighting": (False, "WPO weighting is not implemented"),
    "ld_alpha": (None, "LD-DPO is not implemented"),
    "sync_ref_model": (False, "TR-DPO's reference syncing is not implemented (HyPO keeps π_ref fixed)"),
    "reference_free": (False, "a reference-free DPO is not implemented (TRL moved it to CPOTrainer)"),
    "rpo_alpha": (None, "use loss_type: [sigmoid, sft] with loss_weights: [1, α], as TRL ≥ 0.29 does"),
    "max_completion_length": (None, "removed in TRL 0.29; max_length bounds prompt + completion"),
    "truncation_mode": ("keep_start", "only keep_start (TRL 1.16's default) is implemented"),
    "disable_dropout": (True, "hypo_fast always trains with dropout off"),
    "fp16": (False, "use bf16 (fp16 needs loss scaling hypo_fast does not configure)"),
    "load_in_4bit": (False, "quantised loading is not implemented"),
    "load_in_8bit": (False, "quantised loading is not implemented"),
    "use_dora": (False, "DoRA is not implemented"),
    "use_rslora": (False, "rsLoRA is not implemented"),
}
# TRL / HF infrastructure that has no effect on what hypo_fast computes
IGNORED = {"run_name", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token",
           "logging_first_step", "logging_dir", "logging_strategy", "dataloader_num_workers", "dataloader_pin_memory",
           "dataloader_drop_last", "remove_unused_columns", "dataset_num_proc", "per_device_eval_batch_size",
           "precompute_ref_log_probs", "precompute_ref_batch_size", "padding_free", "pad_to_multiple_of",
           "use_liger_kernel", "use_cpu", "tf32", "bf16_full_eval", "fp16_full_eval", "ddp_find_unused_parameters",
           "ddp_timeout", "local_rank", "save_only_model", "save_strategy", "eval_on_start", "model_revision",
           "trust_remote_code", "gradient_checkpointing_kwargs", "optim", "torch_compile", "overwrite_output_dir",
           "dataset_config", "dataset_streaming", "do_train", "do_eval", "eval_strategy", "lora_task_type",
           "disable_tqdm", "include_num_input_tokens_seen", "adam_epsilon", "model_init_kwargs",
           "eval_accumulation_steps"}
CONSUMED = {"use_peft", "bf16", "eval_strategy", "adam_beta1", "adam_beta2"}  # read by the rules below
SECTIONS = {"model", "data", "algorithm", "sampling", "optim", "deepspeed", "eval", "output", "distributed"}


def is_trl_style(data: dict) -> bool:
    return any(key not in SECTIONS for key in data)


def translate(data: dict) -> tuple[dict, list[str]]:
    """A TRL-style flat config → hypo_fast's dotted settings (``{"optim.lr": 1e-6, ...}``) and notes.

    Raises ``ConfigError`` naming a key that is unknown, or whose value hypo_fast cannot honour.
    """

    flat = {k: v for k, v in data.items() if k not in SECTIONS}
    for key, default in TRL_DEFAULTS.items():
        flat.setdefault(key, default)
    dotted, ignored = {}, []
    for key, value in flat.items():
        if key in UNSUPPORTED:
            default, why = UNSUPPORTED[key]
            if value != default and not (default is None and value in (None, 0)):
                raise ConfigError(f"{key}: {value!r} is not supported ({why})")
            continue
        if key in CONSUMED:
            continue
        if key in IGNORED:
            if key not in TRL_DEFAULTS:
                ignored.append(key)
            continue
        if key not in NAMES:
            raise ConfigError(f"unknown key {key} (neither a hypo_fast section nor a TRL DPOConfig name hypo_fast "
                              "knows; see the README's table of TRL names)")
        dotted[NAMES[key]] = value
    if "adam_beta1" in flat or "adam_beta2" in flat:
        dotted["optim.betas"] = [flat.get("adam_beta1", 0.9), flat.get("adam_beta2", 0.999)]
    _precision(flat, dotted)
    _peft(flat, dotted)
    _schedule(flat, dotted)
    _evaluation(flat, dotted)
    report = flat.get("report_to")
    dotted["output.report_to"] = _reporters(report)
    for key in ("output.log_every", "output.save_every", "eval.every"):  # TRL: < 1 is a share of the run
        if isinstance(dotted.get(key), float) and dotted[key] < 1:
            raise ConfigError(f"{ {v: k for k, v in NAMES.items()}[key]}: ratios below 1 are not supported; "
                              "give a number of steps")
        if isinstance(dotted.get(key), float):
            dotted[key] = int(dotted[key])
    notes = [f"ignored TRL settings that do not change what hypo_fast computes: {', '.join(sorted(ignored))}"] \
        if ignored else []
    return dotted, notes


def _precision(flat: dict, dotted: dict) -> None:
    if flat.get("bf16") and "model.dtype" not in dotted:
        dotted["model.dtype"] = "bfloat16"
    if dotted.get("model.dtype") in ("auto", None):
        dotted["model.dtype"] = "bfloat16" if flat.get("bf16") else "float32"


def _peft(flat: dict, dotted: dict) -> None:
    """LoRA as TRL's scripts build it: only with ``use_peft: true`` (the lora_* keys alone do nothing)."""
    lora = {k: dotted.pop(k) for k in list(dotted) if k.startswith("model.lora.")}
    if not flat.get("use_peft"):
        if lora:
            log.warning("lora_* settings given without use_peft: true are ignored, as TRL ignores them")
        return
    # TRL's ModelConfig defaults: dropout 0.05, target modules PEFT's per-architecture choice
    dotted["model.lora"] = {"dropout": 0.05, "target_modules": None, **{k.split(".")[-1]: v for k, v in lora.items()}}
    if isinstance(dotted["model.lora"]["target_modules"], str):  # e.g. "all-linear", PEFT's shorthand
        dotted["model.lora"]["target_modules"] = [dotted["model.lora"]["target_modules"]]


def _schedule(flat: dict, dotted: dict) -> None:
    if "warmup_ratio" in flat and "warmup_steps" in flat:
    
        raise ConfigError("warmup_ratio: give warmup_ratio or warmup_steps, not both")
    if "warmup_ratio" in flat:
        dotted["optim.warmup_steps"] = float(flat["warmup_ratio"])
    if dotted.get("optim.max_steps") is not None and dotted["optim.max_steps"] <= 0:
        dotted["optim.max_steps"] = None  # TRL's -1: run num_train_epochs
    if isinstance(dotted.get("algorithm.loss_type"), list) and len(dotted["algorithm.loss_type"]) == 1:
        dotted["algorithm.loss_type"] = dotted["algorithm.loss_type"][0]


def _evaluation(flat: dict, dotted: dict) -> None:
    """TRL evaluates only with ``eval_strategy: steps``/``epoch``: the test split is used only then."""
    strategy = flat.get("eval_strategy", "no")
    if strategy == "no":
        dotted.pop("data.eval_split", None)
        dotted.pop("eval.every", None)
    elif "eval.every" not in dotted:
        dotted["eval.every"] = flat.get("logging_steps", 10)


def _reporters(report) -> list[str]:
    names = [report] if isinstance(report, str) else list(report or [])
    if names in (["none"], []):
        return []
    if names == ["all"]:
        import importlib.util

        return ["tensorboard"] + [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n)]
    return names

