"""One tree of frozen dataclasses for a training run: YAML in, dotted overrides, validated at start.

    cfg = load_config("run.yaml", ["algorithm.kl_coef=0.05", "optim.lr=1e-6"])

Unknown keys and bad values raise ``ConfigError`` naming the dotted key. The resolved tree is saved with
every run (``config.yaml`` in the output folder and in each checkpoint).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import logging

import torch
import yaml

from hypo_fast.models.loading import DEFAULT_LORA_TARGETS, DTYPES
from hypo_fast.objective import HyPOObjective, OptionError
from hypo_fast.sampling import SamplingConfig
from hypo_fast.train import trl_names
from hypo_fast.train.data import DataConfig
from hypo_fast.train.errors import ConfigError


log = logging.getLogger("hypo_fast")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = DEFAULT_LORA_TARGETS  # None: PEFT's choice for the architecture
    use_dora: bool = False  # weight-decomposed LoRA (PEFT's use_dora)
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) (PEFT's use_rslora)
    modules_to_save: tuple[str, ...] | None = None  # modules trained in full beside the adapters (e.g. lm_head)


@dataclass(frozen=True)
class FourBitConfig:  # QLoRA: the base weights loaded in 4 bits by bitsandbytes (CUDA only)
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = False  # TRL's use_bnb_nested_quant
    quant_storage: str | None = None  # e.g. uint8, bfloat16


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # local folder (never downloaded); or `config` below for a fresh model
    config: dict | None = None  # transformers config kwargs (model_type included) for a random init
    tokenizer: str | None = None  # local tokenizer folder (default: `path`)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    load_in_4bit: FourBitConfig | None = None  # needs model.lora, a CUDA GPU and bitsandbytes
    reference_device: str | None = None  # full fine-tuning: keep the frozen reference here (e.g. "cpu")
    init_seed: int = 0


AlgorithmConfig = HyPOObjective  # the `algorithm` section is the objective's own settings: β, λ, k, …


REPORTERS = ("tensorboard", "wandb", "mlflow")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-7
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8  # AdamW's epsilon (TRL's adam_epsilon)
    max_steps: int | None = None  # optimizer steps; None: num_epochs over the training pairs
    num_epochs: float = 1.0  # used when max_steps is None
    pairs_per_micro_batch: int = 2  # per rank
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    warmup_steps: float = 0  # steps (an integer), or a fraction of the run below 1 (TRL's warmup_ratio)
    scheduler: str = "cosine"  # any transformers.get_scheduler name (SCHEDULERS)
    scheduler_kwargs: dict | None = None  # e.g. {min_lr_rate: 0.1} for cosine_with_min_lr
    seed: int = 0


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    config_file: str | None = None  # a user DeepSpeed JSON whose keys override the generated ones
    config: dict | None = None  # the same, inline (TRL's `deepspeed:` mapping); applied after config_file


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps; 0 = only at the end
    strategy: str = "steps"  # steps: every `every` steps | epoch: after each pass over the training pairs
    kl_prompts: int = 16
    kl_samples: int = 2
    reward: str | None = None  # "module:function" (prompts, responses) -> floats, or a local HF classifier folder


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/hypo"
    save_every: int = 0  # steps; 0 = only at the end
    save_strategy: str = "steps"  # steps: every `save_every` steps | epoch: after each pass over the pairs
    run_name: str | None = None  # the W&B / MLflow run's name (default: the output folder's name)
    keep_last: int = 2
    log_every: int = 1
    resume: str = "auto"  # auto: continue the run in dir if its config and data match | never | a checkpoint folder
    overwrite: bool = False  # start over in a dir that holds a run (its checkpoints and logs are deleted)
    report_to: tuple[str, ...] = ("tensorboard",)  # tensorboard | wandb | mlflow (metrics.jsonl is always written)


@dataclass(frozen=True)
class DistributedConfig:
    timeout_minutes: float = 30.0  # a collective waiting longer (a frozen or dead rank) ends the run


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ---- building from plain data --------------------------------------------------------------------

def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        problems = []
        for alternative in inner:  # e.g. `str | tuple[str, ...]`: the first that accepts the value
            try:
                return _coerce(value, alternative, key)
            except ConfigError as err:
                problems.append(str(err))
        raise ConfigError(f"{key}: " + " or ".join(p.removeprefix(f"{key}: ") for p in problems))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _in_files(f: dataclasses.Field) -> bool:
    """A key of the config file (fields with ``set_by`` metadata are set by the trainer from another key)."""
    return "set_by" not in f.metadata


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = {name for name, f in fields.items() if _in_files(f)}
    where = f"{prefix}." if prefix else ""
    for key in sorted(set(data) & set(fields) - names):
        raise ConfigError(f"{where}{key}: not a key of the config (set by {fields[key].metadata['set_by']})")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except OptionError as err:  # a section validating itself (the objective) names the option
        raise ConfigError(f"{prefix}.{err.option}: {err.detail}" if prefix else str(err)) from err


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def config_from_dict(data: dict, overrides: list[str] = ()) -> TrainConfig:
    """The validated tree from hypo_fast's sections, or from a TRL-style flat config (TRL's names, with
    TRL's defaults for what it leaves out); ``overrides`` are ``key=value`` in either naming: a dotted key
    sets that setting, a flat (TRL) name is read as if the file held it."""

    tree = _plain(data or {})
    parsed = [_parse_override(item) for item in overrides]
    flat_overrides = {k: v for k, v in parsed if "." not in k and not trl_names.is_section(k, v)}
    if trl_names.is_trl_style(tree):
        dotted, notes = trl_names.translate({**tree, **flat_overrides})
    elif flat_overrides:  # TRL names over a hypo_fast config: no TRL defaults for the rest
        dotted, notes = trl_names.translate(flat_overrides, defaults=False)
    else:
        dotted, notes = {}, []
    tree = {k: v for k, v in tree.items() if trl_names.is_section(k, v)}
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    for note in notes:
        log.warning(note)
    for key, value in parsed:
        if "." in key or trl_names.is_section(key, value):
            _set_dotted(tree, key, value)
    cfg = _build(TrainConfig, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    return config_from_dict(data, overrides)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if _in_files(f)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def config_to_dict(cfg: TrainConfig) -> dict:
    return _plain(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---- validation ----------------------------------------------------------------------------------

def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: TrainConfig) -> None:
    m, d, s, o, z, e, out = cfg.model, cfg.data, cfg.sampling, cfg.optim, cfg.deepspeed, cfg.eval, cfg.output
    _require((m.path is None) != (m.config is None), "model.path", "give exactly one of model.path or model.config")
    _require(m.path is not None or m.tokenizer is not None, "model.tokenizer",
             "a model built from model.config needs a local tokenizer folder")
    _require(m.dtype in DTYPES, "model.dtype", f"unknown dtype {m.dtype!r} (known: {', '.join(DTYPES)})")
    _require(d.train_file is not None, "data.train_file", "is required")
    _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    _require(d.max_length is None or d.max_length >= 2, "data.max_length", "must be ≥ 2 (or null: no limit)")
    _require(d.max_prompt_length is None or d.max_prompt_length >= 1, "data.max_prompt_length", "must be ≥ 1")
    _require(None in (d.max_length, d.max_prompt_length) or d.max_length > d.max_prompt_length, "data.max_length",
             "must exceed data.max_prompt_length")
    _require(d.eos in ("trl", "ensure"), "data.eos", f"must be trl or ensure, got {d.eos!r}")
    _require(not (d.eval_file and d.eval_split), "data.eval_split", "give data.eval_file or data.eval_split, not both")
    _require(s.prompts_per_step >= 1, "sampling.prompts_per_step", "must be ≥ 1")
    _require(s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be ≥ 1")
    _require(s.temperature > 0, "sampling.temperature", "must be positive")
    _require(o.lr > 0, "optim.lr", "must be positive")
    _require(o.max_steps is None or o.max_steps >= 1, "optim.max_steps", "must be ≥ 1 (or null: num_epochs)")
    _require(o.num_epochs > 0, "optim.num_epochs", "must be positive")
    _require(o.pairs_per_micro_batch >= 1, "optim.pairs_per_micro_batch", "must be ≥ 1")
    _require(o.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps", "must be ≥ 1")
    _require(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be ≥ 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be ≥ 0")
    _require(o.scheduler in SCHEDULERS, "optim.scheduler",
             f"unknown schedule {o.scheduler!r} (transformers.get_scheduler names: {', '.join(SCHEDULERS)})")
    _require(z.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    _require(not z.offload_params or z.zero_stage == 3, "deepspeed.offload_params", "needs zero_stage 3")
    _require(not z.offload_optimizer or z.zero_stage >= 1, "deepspeed.offload_optimizer", "needs zero_stage ≥ 1")
    _require(e.every >= 0 and e.kl_prompts >= 0 and e.kl_samples >= 1, "eval", "every/kl_prompts ≥ 0, kl_samples ≥ 1")
    _require(e.strategy in ("steps", "epoch"), "eval.strategy", f"must be steps or epoch, got {e.strategy!r}")
    _require(out.save_strategy in ("steps", "epoch"), "output.save_strategy",
             f"must be steps or epoch, got {out.save_strategy!r}")
    _require(o.eps > 0, "optim.eps", "must be positive")
    _validate_four_bit(m)
    _require(out.keep_last >= 1, "output.keep_last", "must be ≥ 1")
    unknown = sorted(set(out.report_to) - set(REPORTERS))
    _require(not unknown, "output.report_to", f"unknown {unknown} (known: {', '.join(REPORTERS)})")
    _require(out.save_every >= 0 and out.log_every >= 1, "output.save_every", "save_every ≥ 0 and log_every ≥ 1")
    _require(cfg.distributed.timeout_minutes > 0, "distributed.timeout_minutes", "must be positive")
    _require(m.dtype != "float16" or torch.cuda.is_available(), "model.dtype",
             "float16 needs a CUDA GPU (on CPU use float32 or bfloat16)")
    _require(z.config_file is None or Path(z.config_file).is_file(), "deepspeed.config_file",
             f"{z.config_file}: no such file")


def _validate_four_bit(m: ModelConfig) -> None:
    """QLoRA as TRL runs it: 4-bit base weights under LoRA adapters, on CUDA with bitsandbytes."""
    if m.load_in_4bit is None:
        return
    import importlib.util

    _require(m.lora is not None, "model.load_in_4bit", "trains LoRA adapters only: set model.lora (TRL: use_peft)")
    _require(m.load_in_4bit.quant_type in ("nf4", "fp4"), "model.load_in_4bit.quant_type", "must be nf4 or fp4")
    _require(torch.cuda.is_available(), "model.load_in_4bit",
             "needs a CUDA GPU (bitsandbytes' 4-bit layers do not run here: no CUDA device)")
    _require(importlib.util.find_spec("bitsandbytes") is not None, "model.load_in_4bit",
             "needs the bitsandbytes package (pip install bitsandbytes)")
