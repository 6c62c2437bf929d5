"""Set-up for a run: the output folder, tokenizer, policy and datasets, each failing with an error that names
the config key (or file and row) at fault instead of a traceback from deep inside a library."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from hypo_fast.models import FrozenReference, Policy, add_lora, load_causal_lm
from hypo_fast.models.loading import DTYPES, four_bit_config, known_model_type, load_errors, short_reason
from hypo_fast.train.config import ConfigError, TrainConfig
from hypo_fast.train.data import PreferencePair, Prompt, Source
from hypo_fast.train.fingerprint import Fingerprint
from hypo_fast.train.tokenization import load_pairs, load_prompts

log = logging.getLogger("hypo_fast")


def check_output_dir(path: Path) -> None:
    """Create ``output.dir`` and prove it writable before any expensive work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output.dir: cannot write to {path} ({err.strerror or err})") from err


def is_hub_id(path: str) -> bool:
    """``org/name``, not a local path: transformers resolves it (its cache first, then the Hub when online)."""
    parts = path.split("/")
    return not Path(path).exists() and len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def _local_folder(key: str, path: str, needs: str) -> str:
    """The folder (or Hub id) to load from; a missing or foreign folder is an error naming ``key``."""
    if is_hub_id(path):
        return path
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {path} is not a local folder (nor a Hub id of the form org/name)")
    if not (folder / needs).exists():
        raise ConfigError(f"{key}: {path} holds no {needs} (not a saved Hugging Face "
                          f"{'model' if needs == 'config.json' else 'tokenizer'} folder)")
    return str(folder)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the policy (TRL's default): the sampler's log-probs then equal the training forward's."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
        for module in model.modules():
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer and the pad id used for packing and sampling."""
    from transformers import AutoTokenizer

    key, source = ("model.tokenizer", cfg.model.tokenizer) if cfg.model.tokenizer else ("model.path", cfg.model.path)
    folder = _local_folder(key, source, "tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=not is_hub_id(folder))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: cannot load a tokenizer from {source} ({str(err).splitlines()[0]})") from err
    pad = tokenizer.pad_token_id
    return tokenizer, pad if pad is not None else (tokenizer.eos_token_id or 0)


def load_policy(cfg: TrainConfig, device: torch.device) -> Policy:
    """The trainable model (LoRA-wrapped or full) with its reference and the sampling temperature."""
    m = cfg.model
    if m.path is not None:
        source = _local_folder("model.path", m.path, "config.json")
    else:
        from transformers import AutoConfig

        kwargs = dict(m.config)
        model_type = kwargs.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.config.model_type: is required (e.g. llama)")
        if not known_model_type(model_type):
            raise ConfigError(f"model.config.model_type: {model_type!r} is not a model type this transformers "
                              "knows (e.g. llama, mistral, qwen2, gpt2)")
        try:
            source = AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"model.config: {short_reason(err)}") from err
    quantization = None
    if m.load_in_4bit is not None:
        if m.path is None:
            raise ConfigError("model.load_in_4bit: needs model.path (a model built from model.config is not quantised)")
        q = m.load_in_4bit
        quantization = four_bit_config(q.quant_type, q.double_quant, q.quant_storage, compute_dtype=DTYPES[m.dtype])
    try:
        model = load_causal_lm(source, dtype=DTYPES[m.dtype], attn_implementation=m.attn_implementation,
                               gradient_checkpointing=m.gradient_checkpointing, seed=m.init_seed,
                               quantization_config=quantization)
        model = model if quantization is not None else model.to(device)
    except load_errors() as err:  # a damaged or incomplete folder, an unknown architecture, offline
        raise ConfigError(f"model.path: cannot load a causal LM from {m.path or 'model.config'} "
                          f"({type(err).__name__}: {short_reason(err)})") from err
    disable_dropout(model)
    reference = None
    if m.lora is not None:
        try:
            model = add_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                             target_modules=m.lora.target_modules, use_dora=m.lora.use_dora,
                             use_rslora=m.lora.use_rslora, modules_to_save=m.lora.modules_to_save)
        except ValueError as err:
            key = "modules_to_save" if str(err).startswith("modules_to_save") else "target_modules"
            raise ConfigError(f"model.lora.{key}: {err}") from err
    else:
        reference = FrozenReference.copy_of(model, device=m.reference_device)
    model.train()
    return Policy(model, reference, temperature=cfg.sampling.temperature)


def fingerprint(items) -> str:
    """A short hash of token ids (data, tokenizer and truncation all enter through them)."""
    return Fingerprint(*items).hex()


@dataclass
class Datasets:
    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    prompts: list[Prompt]  # online prompts for sampling
    eval_prompts: list[Prompt]  # for the evaluation KL

    def fingerprints(self) -> dict[str, str]:
        return {"train": fingerprint(p.ids for p in self.train_pairs),
                "eval": fingerprint(p.ids for p in self.eval_pairs),
                "prompts": fingerprint(p.ids for p in self.prompts)}


def load_datasets(cfg: TrainConfig, tokenizer, report: bool) -> Datasets:
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "hypo_fast"

    def pairs_of(spec, split, split_key="data.split"):
        source = Source(spec, split, split_key, d.data_files if spec == d.train_file else None)
        loaded, stats = load_pairs(source, tokenizer, d, cache)
        _report(source.name + (f" [{split}]" if split else ""), stats, report)
        return loaded

    pairs = pairs_of(d.train_file, d.split)
    if d.eval_file or d.eval_split:
        eval_pairs = pairs_of(d.eval_file, None) if d.eval_file else pairs_of(d.train_file, d.eval_split, "data.eval_split")
    else:
        n_eval = int(len(pairs) * d.eval_fraction)
        pairs, eval_pairs = pairs[n_eval:], pairs[:n_eval]
    if d.prompt_file:
        prompts, stats = load_prompts(Source(d.prompt_file), tokenizer, d, cache)
        _report(d.prompt_file, stats, report)
    else:  # the preference set's own prompts, once each
        prompts = [Prompt(ids, text) for ids, text in {p.prompt_ids: p.prompt for p in pairs}.items()]
    eval_unique = {p.prompt_ids: p.prompt for p in (eval_pairs or pairs)}
    eval_prompts = [Prompt(ids, text) for ids, text in eval_unique.items()][: cfg.eval.kl_prompts]
    return Datasets(pairs, eval_pairs, prompts, eval_prompts)


def _report(path, stats, report: bool) -> None:
    if report:
        log.info("%s: %d rows, %d prompts truncated, %d responses truncated, %d dropped, %d bad rows skipped",
                 path, stats.rows, stats.prompts_truncated, stats.responses_truncated, stats.dropped, stats.bad_rows)
