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
        if value == "auto":  # Hugging Face's placeholder: the generated value stands
            continue
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
    if z.config:
        ds = _merge(ds, z.config)
    return ds


def warmup_steps(warmup: float, total: int) -> int:
    """An integer counts steps; a fraction below 1 is a share of the run (``transformers``' rule)."""
    return math.ceil(warmup * total) if 0 < warmup < 1 else int(warmup)


def make_optimizer(module: torch.nn.Module, o) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with ``optim``'s lr, betas, eps (TRL's ``adam_epsilon``) and decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def build_engine(module: torch.nn.Module, cfg: TrainConfig, world_size: int, total_steps: int):
    """DeepSpeed around ``module`` with AdamW and a ``transformers.get_scheduler`` schedule over ``total_steps``
    (warm-up as Hugging Face's: the first update runs at ``lr·0``, the w-th at the full ``lr``)."""
    import deepspeed
    from transformers import get_scheduler

    o = cfg.optim
    optimizer = make_optimizer(module, o)
    scheduler = get_scheduler(o.scheduler, optimizer, num_warmup_steps=warmup_steps(o.warmup_steps, total_steps),
                              num_training_steps=total_steps, scheduler_specific_kwargs=o.scheduler_kwargs)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, world_size))
    return engine
