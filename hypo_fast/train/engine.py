"""DeepSpeed: the generated config, optimizer and schedule, the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from hypo_fast.train.config import TrainConfig


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON generated from the config tree (a user JSON's keys override it)."""
    o, z = cfg.optim, cfg.deepspeed
    zero: dict = {"stage": z.zero_stage}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": o.pairs_per_micro_batch,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "train_batch_size": o.pairs_per_micro_batch * o.gradient_accumulation_steps * world_size,
        "gradient_clipping": o.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    if z.config_file:
        ds = _merge(ds, json.loads(Path(z.config_file).read_text()))
    return ds


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up, then cosine / linear decay to 0 (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def build_engine(module: torch.nn.Module, cfg: TrainConfig, world_size: int):
    import deepspeed

    o = cfg.optim
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, o.warmup_steps, o.max_steps, o.scheduler))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, world_size))
    return engine
