"""Load Hugging Face causal LMs for training: dtype, attention backend, Liger patches, checkpointing, LoRA.

A local folder is read with ``local_files_only``; an ``org/name`` Hub id is resolved by ``transformers``
(its cache, then the Hub when online). Tests and the demo pass a ``transformers`` config instead, which
builds a randomly initialised model: nothing of theirs is downloaded.

Models load with Hugging Face's Hub kernels off (``use_kernels=False``, transformers' own default before
5.25, which turned them on): those kernels are downloaded from the Hub at run time, and hypo_fast's choice
of layer kernels on CUDA is Liger's patches (below). On CPU they change nothing.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

log = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # config names → dtypes


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged, incomplete or foreign model folder raises (safetensors' own error included:
    a truncated ``model.safetensors`` is not an ``OSError``)."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def short_reason(err: BaseException, limit: int = 300) -> str:
    """The first line of an error, cut to ``limit`` characters (transformers lists every model type in one)."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return first if len(first) <= limit else first[:limit] + " …"


def known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def attention_implementation(requested: str = "auto") -> str:
    """``auto``: flash-attention-2 when ``flash_attn`` imports and a GPU is present, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def apply_liger_patches(model: torch.nn.Module) -> bool:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on a CUDA model (its losses stay off: ours replace them)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    try:
        _apply_liger_kernel_to_instance(model=model, rms_norm=True, rope=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as err:  # an architecture Liger does not know: run unpatched, say so
        log.warning("liger-kernel patches not applied: %s", err)
        return False
    return True


def load_causal_lm(
    source: str | PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    liger: str | bool = "auto",
    seed: int | None = None,
    quantization_config=None,
) -> torch.nn.Module:
    """A causal LM from a local folder or a config, ready for hypo_fast (the HF LM head is never called).

    Args:
        source: local model folder, or a ``PretrainedConfig`` (random initialisation, seeded by ``seed``).
        dtype: parameter dtype (fp32, bf16 or fp16).
        attn_implementation: ``auto`` (flash-attention-2 on GPU when installed, else ``sdpa``) or any
            value ``transformers`` accepts.
        gradient_checkpointing: recompute decoder activations in the backward (non-reentrant).
        liger: ``auto`` patches RMSNorm/RoPE/SwiGLU with Liger on CUDA when installed; True/False force it.
        quantization_config: e.g. ``four_bit_config()``: the weights load quantised onto the current CUDA device.
    """
    attn = attention_implementation(attn_implementation)
    if isinstance(source, PretrainedConfig):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(source, dtype=dtype, attn_implementation=attn)
    else:
        extra = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                        "device_map": {"": torch.cuda.current_device()}}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                                     local_files_only=Path(source).exists(), use_kernels=False, **extra)
    if liger is True or (liger == "auto" and torch.cuda.is_available()):
        apply_liger_patches(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def add_lora(model: torch.nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             target_modules: Sequence[str] | None = DEFAULT_LORA_TARGETS, use_dora: bool = False,
             use_rslora: bool = False, modules_to_save: Sequence[str] | None = None):
    """Wrap with PEFT LoRA adapters; the base weights (LM head included) are frozen, except
    ``modules_to_save`` (trained in full, saved with the adapter).

    ``target_modules``: module names (those the model lacks are skipped), ``["all-linear"]``, or None for
    PEFT's default for the architecture (what TRL's ``lora_target_modules: null`` means). ``use_dora`` and
    ``use_rslora`` are PEFT's (DoRA's magnitude vectors; scaling alpha/sqrt(r) instead of alpha/r).
    """
    from peft import LoraConfig, get_peft_model

    if target_modules is None or list(target_modules) == ["all-linear"]:
        targets = None if target_modules is None else "all-linear"
    else:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in target_modules if t in present]
        if not targets:
            raise ValueError(f"none of target_modules {list(target_modules)} exist in the model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                        use_dora=use_dora, use_rslora=use_rslora,
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    wrapped = get_peft_model(model, config)
    if type(output_embeddings(wrapped)).__name__ == "ModulesToSaveWrapper":
        raise ValueError(f"modules_to_save {list(modules_to_save)}: the LM head cannot be trained in full beside "
                         "LoRA here (the reference is the base model with adapters off, and the fused head reads "
                         "the head's weight itself, so the reference would score with the trained copy)")
    return wrapped


def four_bit_config(quant_type: str = "nf4", double_quant: bool = False, quant_storage: str | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16):
    """bitsandbytes' 4-bit loading as TRL's ``get_quantization_config`` builds it (QLoRA)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=quant_storage)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body whose forward returns final hidden states (LoRA layers included)."""
    base = model.get_base_model() if is_peft(model) else model
    return base.get_decoder()


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if is_peft(model) else model
    return base.get_output_embeddings()
