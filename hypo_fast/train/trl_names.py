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


# TRL / TrainingArguments / ModelConfig / ScriptArguments name → dotted hypo_fast key
NAMES = {
    "model_name_or_path": "model.path",
    "dtype": "model.dtype", "torch_dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules", "use_dora": "model.lora.use_dora",
    "use_rslora": "model.lora.use_rslora", "lora_modules_to_save": "model.lora.modules_to_save",
    "dataset_name": "data.train_file", "dataset_train_split": "data.split", "dataset_test_split": "data.eval_split",
    "max_length": "data.max_length", "max_prompt_length": "data.max_prompt_length",
    "beta": "algorithm.beta", "loss_type": "algorithm.loss_type", "loss_weights": "algorithm.loss_weights",
    "label_smoothing": "algorithm.label_smoothing", "discopop_tau": "algorithm.discopop_tau",
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.scheduler", "lr_scheduler_kwargs": "optim.scheduler_kwargs",
    "warmup_steps": "optim.warmup_steps", "warmup_ratio": "optim.warmup_steps", "weight_decay": "optim.weight_decay",
    "adam_epsilon": "optim.eps",
    "max_grad_norm": "optim.max_grad_norm", "per_device_train_batch_size": "optim.pairs_per_micro_batch",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps", "num_train_epochs": "optim.num_epochs",
    "max_steps": "optim.max_steps", "seed": "optim.seed",
    "output_dir": "output.dir", "logging_steps": "output.log_every", "save_steps": "output.save_every",
    "save_total_limit": "output.keep_last", "report_to": "output.report_to", "eval_steps": "eval.every",
    "run_name": "output.run_name",
    # HyPO's additions, flat beside TRL's names
    "kl_coef": "algorithm.kl_coef", "num_samples": "algorithm.num_samples", "kl_loss": "algorithm.kl_loss",
    "temperature": "sampling.temperature", "max_new_tokens": "sampling.max_new_tokens",
    "prompts_per_step": "sampling.prompts_per_step",
    "data_files": "data.data_files",  # datasets.load_dataset's data_files, for a local folder
}
# TRL 1.16's defaults that differ from hypo_fast's, applied to a TRL-style config that leaves them out
TRL_DEFAULTS = {"learning_rate": 1e-6, "lr_scheduler_type": "linear", "bf16": True, "gradient_checkpointing": True,
                "num_train_epochs": 3.0, "per_device_train_batch_size": 8, "logging_steps": 10, "seed": 42,
                "max_length": 1024, "save_steps": 500, "report_to": "none", "eval_strategy": "no"}
# settings that change what is computed and that hypo_fast does not implement: refused unless at TRL's default
# (the default named here is used when TRL is not installed; with TRL, its dataclasses' own default is used)
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
    "load_in_8bit": (False, "8-bit loading is not implemented (load_in_4bit is, on CUDA with bitsandbytes)"),
    "lora_target_parameters": (None, "LoRA on parameters (MoE experts) is not implemented; use lora_target_modules"),
    "neftune_noise_alpha": (None, "NEFTune's embedding noise is not implemented"),
    "load_best_model_at_end": (False, "hypo_fast keeps the last step's model; pick a checkpoint-N folder instead"),
    "fsdp": (None, "FSDP is not supported; use deepspeed (ZeRO-3 shards as FSDP does)"),
    "fsdp_config": (None, "FSDP is not supported; use deepspeed (ZeRO-3 shards as FSDP does)"),
    "optim_args": (None, "optimizer arguments are not supported (hypo_fast runs torch AdamW)"),
    "optim_target_modules": (None, "GaLore/APOLLO target modules are not supported (hypo_fast runs torch AdamW)"),
    "train_sampling_strategy": ("random", "hypo_fast shuffles pairs at random each epoch"),
    "auto_find_batch_size": (False, "hypo_fast does not retry with smaller batches; set per_device_train_batch_size"),
    "model_init_kwargs": (None, "give dtype and attn_implementation as their own keys"),
    "peft_config": (None, "give LoRA as use_peft and the lora_* keys"),
}
# TRL / HF infrastructure that has no effect on what hypo_fast computes: ignored, with one warning naming those
# set away from TRL's default
IGNORED = {"push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token", "hub_always_push",
           "hub_revision", "logging_first_step", "logging_dir", "logging_strategy", "logging_nan_inf_filter",
           "log_level", "log_level_replica", "log_on_each_node", "dataloader_num_workers", "dataloader_pin_memory",
           "dataloader_drop_last", "dataloader_persistent_workers", "dataloader_prefetch_factor",
           "dataloader_multiprocessing_context", "dataloader_in_order", "remove_unused_columns", "dataset_num_proc",
           "per_device_eval_batch_size", "precompute_ref_log_probs", "precompute_ref_batch_size", "padding_free",
           "pad_to_multiple_of", "use_liger_kernel", "liger_kernel_config", "use_cpu", "tf32", "bf16_full_eval",
           "fp16_full_eval", "ddp_find_unused_parameters", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
           "ddp_static_graph", "ddp_backend", "local_rank", "save_only_model", "save_on_each_node", "eval_on_start",
           "eval_delay", "model_revision", "trust_remote_code", "gradient_checkpointing_kwargs",
           "activation_checkpointing_kwargs", "activation_offloading", "torch_compile", "torch_compile_backend",
           "torch_compile_mode", "torch_empty_cache_steps", "overwrite_output_dir", "dataset_config",
           "dataset_streaming", "do_train", "do_eval", "do_predict", "lora_task_type", "disable_tqdm",
           "include_num_input_tokens_seen", "eval_accumulation_steps", "use_cache", "average_tokens_across_devices",
           "label_smoothing_factor", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
           "prediction_loss_only", "eval_do_concat_batches", "eval_use_gather_object", "include_for_metrics",
           "batch_eval_metrics", "enable_jit_checkpoint", "metric_for_best_model", "greater_is_better",
           "ignore_data_skip", "restore_callback_states_from_checkpoint", "full_determinism", "data_seed",
           "accelerator_config", "parallelism_config", "label_names", "length_column_name", "debug",
           "skip_memory_metrics", "router_aux_loss_coef", "f_alpha_divergence_coef", "ref_model_mixup_alpha",
           "ref_model_sync_steps", "pad_token", "ignore_bias_buffers", "use_mps_device", "jit_mode_eval",
           "past_index", "ray_scope", "tpu_num_cores", "tpu_metrics_debug", "split_batches", "dispatch_batches",
           "include_tokens_per_second", "include_inputs_for_metrics"}  # the last ten: older transformers' names
# read by the rules below (not by the plain name → key table)
CONSUMED = {"use_peft", "bf16", "eval_strategy", "save_strategy", "adam_beta1", "adam_beta2", "optim", "deepspeed",
            "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
            "activation_checkpointing", "resume_from_checkpoint"}
# TRL's null for a name whose hypo_fast setting cannot be null: what TRL does then (None: hypo_fast's default)
NONE_MEANS = {"attn_implementation": None, "output_dir": "trainer_output", "save_total_limit": 2**31 - 1,
              "max_grad_norm": 0.0, "lora_target_modules": None}
SECTIONS = {"model", "data", "algorithm", "sampling", "optim", "deepspeed", "eval", "output", "distributed"}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")  # TRL's optim values that are torch's AdamW
_DEEPSPEED_KEYS = {"zero_stage", "offload_optimizer", "offload_params", "config_file", "config"}


def is_section(key: str, value) -> bool:
    """``optim``/``deepspeed`` are both hypo_fast sections and TRL names: a mapping is the section (a
    ``deepspeed`` mapping only when it holds hypo_fast's keys; else it is an inline DeepSpeed JSON, as in TRL)."""
    if key not in SECTIONS or not isinstance(value, dict):
        return False
    return key != "deepspeed" or set(value) <= _DEEPSPEED_KEYS


def is_trl_style(data: dict) -> bool:
    return any(not is_section(key, value) for key, value in data.items())


def trl_fields() -> dict:
    """Every field of TRL's ``DPOConfig``, ``ModelConfig`` and ``ScriptArguments`` → its default (``{}`` when
    TRL is not installed). A field a newer TRL adds is thereby known: at its default it changes nothing."""
    import dataclasses
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return {}
    import trl

    fields = {}
    for cls in (trl.ScriptArguments, trl.ModelConfig, trl.DPOConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                fields[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                fields[f.name] = f.default_factory()
            else:
                fields[f.name] = None
    return fields


def _at_default(value, default) -> bool:
    empty = (None, False, "", 0, [], {})
    return value == default or (default in empty and value in empty)


def translate(data: dict, defaults: bool = True) -> tuple[dict, list[str]]:
    """A TRL-style flat config → hypo_fast's dotted settings (``{"optim.lr": 1e-6, ...}``) and notes.

    ``defaults``: fill in TRL 1.16's defaults for what the config leaves out (a whole TRL config); off for
    TRL-named overrides on a hypo_fast config. Raises ``ConfigError`` naming a key whose value hypo_fast
    cannot honour, or a key that is neither a TRL field nor a hypo_fast name.
    """

    flat = {k: v for k, v in data.items() if not is_section(k, v)}
    if defaults:
        for key, default in TRL_DEFAULTS.items():
            flat.setdefault(key, default)
    trl = trl_fields()
    dotted, ignored = {}, []
    for key, value in flat.items():
        if key in UNSUPPORTED:
            default, why = UNSUPPORTED[key]
            if not _at_default(value, trl.get(key, default)):
                raise ConfigError(f"{key}: {value!r} is not supported ({why})")
        elif key in CONSUMED:
            continue
        elif key in NAMES and value is None and key in NONE_MEANS:
            if NONE_MEANS[key] is not None:
                dotted[NAMES[key]] = NONE_MEANS[key]
        elif key in NAMES:
            dotted[NAMES[key]] = value
        elif key in IGNORED:
            if key not in TRL_DEFAULTS and not _at_default(value, trl.get(key)):
                ignored.append(key)
        elif key in trl:  # a TRL field this table does not name (a newer TRL): accepted only at its default
            if not _at_default(value, trl[key]):
                raise ConfigError(f"{key}: {value!r} is not supported (a TRL setting hypo_fast does not implement; "
                                  f"remove it or set TRL's default {trl[key]!r})")
        else:
            raise ConfigError(f"unknown key {key} (neither a hypo_fast section nor a TRL DPOConfig, ModelConfig or "
                              "ScriptArguments name; see docs/trl.md)")
    if "adam_beta1" in flat or "adam_beta2" in flat:
        dotted["optim.betas"] = [flat.get("adam_beta1", 0.9), flat.get("adam_beta2", 0.999)]
    _optimizer(flat)
    _deepspeed(flat, dotted)
    _precision(flat, dotted)
    _peft(flat, dotted, set_away=[k for k in flat if not _at_default(flat[k], trl.get(k, object()))])
    _schedule(flat, dotted)
    _evaluation(flat, dotted, explicit="eval_strategy" in data)
    _saving(flat, dotted)
    if flat.get("activation_checkpointing") is not None:  # transformers 5's name for gradient checkpointing
        dotted["model.gradient_checkpointing"] = bool(flat["activation_checkpointing"])
    if flat.get("resume_from_checkpoint"):
        dotted["output.resume"] = str(flat["resume_from_checkpoint"])
    if "report_to" in flat:
        dotted["output.report_to"] = _reporters(flat["report_to"])
    for key in ("output.log_every", "output.save_every", "eval.every"):  # TRL: < 1 is a share of the run
        if isinstance(dotted.get(key), float) and dotted[key] < 1:
            raise ConfigError(f"{ {v: k for k, v in NAMES.items()}[key]}: ratios below 1 are not supported; "
                              "give a number of steps")
        if isinstance(dotted.get(key), float):
            dotted[key] = int(dotted[key])
    notes = [f"ignored TRL settings that do not change what hypo_fast computes: {', '.join(sorted(ignored))}"] \
        if ignored else []
    return dotted, notes


def _optimizer(flat: dict) -> None:
    name = flat.get("optim")
    if name is not None and str(name) not in OPTIMIZERS:

        raise ConfigError(f"optim: {name!r} is not supported (hypo_fast runs torch AdamW: {', '.join(OPTIMIZERS)}; "
                          "give its settings as learning_rate, weight_decay, adam_beta1/2, adam_epsilon)")


def _deepspeed(flat: dict, dotted: dict) -> None:
    """TRL's ``deepspeed``: a JSON file or an inline mapping, whose keys override the generated config."""
    value = flat.get("deepspeed")
    if isinstance(value, str):
        dotted["deepspeed.config_file"] = value
    elif isinstance(value, dict):
        dotted["deepspeed.config"] = value


def _precision(flat: dict, dotted: dict) -> None:
    if "bf16" in flat and flat["bf16"] is None:  # TRL 1.16's default: bf16 unless fp16
        flat = {**flat, "bf16": not flat.get("fp16")}
    if "bf16" not in flat and dotted.get("model.dtype") in ("auto", None):
        dotted.pop("model.dtype", None)
        return
    if flat.get("bf16") and dotted.get("model.dtype") in ("auto", None):
        dotted["model.dtype"] = "bfloat16"
    if dotted.get("model.dtype") in ("auto", None):
        dotted["model.dtype"] = "float32"


_BNB = {"bnb_4bit_quant_type": "quant_type", "use_bnb_nested_quant": "double_quant",
        "bnb_4bit_quant_storage": "quant_storage"}


def _peft(flat: dict, dotted: dict, set_away: list[str]) -> None:
    """LoRA as TRL's scripts build it: only with ``use_peft: true`` (the lora_* keys alone do nothing);
    QLoRA's 4-bit loading with ``load_in_4bit`` and its ``bnb_*`` keys."""
    lora = {k: dotted.pop(k) for k in list(dotted) if k.startswith("model.lora.")}
    if flat.get("load_in_4bit"):
        dotted["model.load_in_4bit"] = {name: flat[key] for key, name in _BNB.items() if key in flat}
    elif any(key in set_away for key in _BNB):
        log.warning("%s given without load_in_4bit: true are ignored, as TRL ignores them",
                    ", ".join(key for key in _BNB if key in set_away))
    if "use_peft" in flat and not flat["use_peft"]:
        dotted["model.lora"] = None
    if not flat.get("use_peft"):
        named = [k for k in set_away if NAMES.get(k, "").startswith("model.lora.")]
        if named:
            log.warning("%s given without use_peft: true are ignored, as TRL ignores them", ", ".join(named))
        return
    # TRL's ModelConfig defaults: dropout 0.05, target modules PEFT's per-architecture choice
    dotted["model.lora"] = {"dropout": 0.05, "target_modules": None, **{k.split(".")[-1]: v for k, v in lora.items()}}
    for key in ("target_modules", "modules_to_save"):  # e.g. "all-linear", PEFT's shorthand
        if isinstance(dotted["model.lora"].get(key), str):
            dotted["model.lora"][key] = [dotted["model.lora"][key]]


def _schedule(flat: dict, dotted: dict) -> None:
    if "warmup_ratio" in flat and "warmup_steps" in flat:
    
        raise ConfigError("warmup_ratio: give warmup_ratio or warmup_steps, not both")
    if "warmup_ratio" in flat:
        dotted["optim.warmup_steps"] = float(flat["warmup_ratio"])
    if dotted.get("optim.max_steps") is not None and dotted["optim.max_steps"] <= 0:
        dotted["optim.max_steps"] = None  # TRL's -1: run num_train_epochs
    if isinstance(dotted.get("algorithm.loss_type"), list) and len(dotted["algorithm.loss_type"]) == 1:
        dotted["algorithm.loss_type"] = dotted["algorithm.loss_type"][0]


def _strategy(flat: dict, key: str, allowed: tuple[str, ...]) -> str | None:
    value = flat.get(key)
    value = getattr(value, "value", value)  # an IntervalStrategy enum from TRL's own parser
    value = "no" if value is False else value  # YAML reads an unquoted `no` as false
    if value is not None and value not in allowed:

        raise ConfigError(f"{key}: {value!r} is not supported (one of: {', '.join(allowed)})")
    return value


def _evaluation(flat: dict, dotted: dict, explicit: bool) -> None:
    """TRL evaluates only with ``eval_strategy: steps`` (every ``eval_steps``, default ``logging_steps``) or
    ``epoch`` (after each pass over the training pairs): the test split is used only then."""
    strategy = _strategy(flat, "eval_strategy", ("no", "steps", "epoch"))
    if strategy is None and "eval.every" not in dotted:
        return
    if strategy in ("no", None):
        dotted.pop("data.eval_split", None)
        dotted.pop("eval.every", None)
        if explicit:  # a written `eval_strategy: no` turns evaluation off; TRL's default leaves an eval section be
            dotted["eval.every"] = 0
    elif strategy == "epoch":
        dotted["eval.every"] = 0
        dotted["eval.strategy"] = "epoch"
    elif dotted.get("eval.every") is None:
        dotted["eval.every"] = flat.get("logging_steps", 10)


def _saving(flat: dict, dotted: dict) -> None:
    """``save_strategy``: steps (every ``save_steps``), epoch, or no (the final model only)."""
    strategy = _strategy(flat, "save_strategy", ("no", "steps", "epoch"))
    if strategy == "no":
        dotted["output.save_every"] = 0
    elif strategy == "epoch":
        dotted["output.save_every"] = 0
        dotted["output.save_strategy"] = "epoch"


def _reporters(report) -> list[str]:
    names = [report] if isinstance(report, str) else list(report or [])
    if names in (["none"], []):
        return []
    if names == ["all"]:
        import importlib.util

        return ["tensorboard"] + [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n)]
    return names

