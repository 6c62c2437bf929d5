"""The ``README.md`` saved with each checkpoint: a model card as TRL writes one (base model, method and its
paper, hyperparameters, data, framework versions), in place of PEFT's empty template."""

from __future__ import annotations

import importlib.metadata

import yaml

DPO_PAPER = ("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", "2305.18290")
HYPO_PAPER = ("The Importance of Online Data: Understanding Preference Fine-tuning via Coverage", "2406.01462")
FRAMEWORKS = (("hypo_fast", "hypo_fast"), ("TRL", "trl"), ("Transformers", "transformers"), ("PyTorch", "torch"),
              ("Datasets", "datasets"), ("Tokenizers", "tokenizers"), ("PEFT", "peft"), ("DeepSpeed", "deepspeed"))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _method(algorithm: dict) -> tuple[str, tuple[str, str]]:
    if algorithm.get("kl_coef"):
        return "HyPO (DPO on offline pairs plus a KL penalty on the policy's own samples)", HYPO_PAPER
    return "DPO", DPO_PAPER


def _hyperparameters(cfg: dict) -> dict:
    a, o, d, m = cfg.get("algorithm", {}), cfg.get("optim", {}), cfg.get("data", {}), cfg.get("model", {})
    rows = {"beta": a.get("beta"), "loss_type": a.get("loss_type"), "loss_weights": a.get("loss_weights"),
            "label_smoothing": a.get("label_smoothing"), "learning_rate": o.get("lr"),
            "lr_scheduler_type": o.get("scheduler"), "warmup_steps": o.get("warmup_steps"),
            "weight_decay": o.get("weight_decay"), "adam_betas": o.get("betas"), "adam_epsilon": o.get("eps"),
            "per_device_train_batch_size": o.get("pairs_per_micro_batch"),
            "gradient_accumulation_steps": o.get("gradient_accumulation_steps"),
            "num_train_epochs": o.get("num_epochs"), "max_steps": o.get("max_steps"), "seed": o.get("seed"),
            "max_length": d.get("max_length"), "dtype": m.get("dtype")}
    if a.get("kl_coef"):
        rows.update(kl_coef=a["kl_coef"], num_samples=a.get("num_samples"), kl_loss=a.get("kl_loss"),
                    temperature=cfg.get("sampling", {}).get("temperature"))
    if m.get("lora"):
        rows.update({f"lora_{k}": v for k, v in m["lora"].items() if v not in (None, False)})
    return {k: v for k, v in rows.items() if v is not None}


def model_card(cfg: dict, step: int) -> str:
    """The card's Markdown for the resolved config tree ``cfg`` (``config.yaml``'s contents) at ``step``."""
    model, data = cfg.get("model", {}), cfg.get("data", {})
    base = model.get("path") or f"a {model.get('config', {}).get('model_type', 'randomly initialised')} model " \
                                "built from its config"
    method, (title, paper) = _method(cfg.get("algorithm", {}))
    tags = ["hypo_fast", "trl", "dpo"] + (["hypo"] if cfg.get("algorithm", {}).get("kl_coef") else []) + \
        (["lora"] if model.get("lora") else [])
    front = {"base_model": model.get("path"), "library_name": "peft" if model.get("lora") else "transformers",
             "tags": tags, "datasets": [data["train_file"]] if data.get("train_file") else None}
    front = {k: v for k, v in front.items() if v is not None}
    splits = ", ".join(f"{k}: {data[k]}" for k in ("split", "eval_split", "eval_file", "data_files") if data.get(k))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {cfg.get('output', {}).get('run_name') or 'Model card'}", "",
             f"This model is a fine-tuned version of {base}, trained with {method} by hypo_fast "
             f"(checkpoint at optimizer step {step}){' as a LoRA adapter' if model.get('lora') else ''}.", "",
             "## Training procedure", "",
             f"Method: {method}, introduced in [{title}](https://huggingface.co/papers/{paper}).", "",
             f"Data: `{data.get('train_file')}`" + (f" ({splits})" if splits else "") + ".", "",
             "### Hyperparameters", ""]
    lines += [f"- {k}: {v}" for k, v in _hyperparameters(cfg).items()]
    lines += ["", "The full configuration is `config.yaml` beside this card.", "", "### Framework versions", ""]
    lines += [f"- {name}: {v}" for name, package in FRAMEWORKS if (v := _version(package))]
    return "\n".join(lines) + "\n"
