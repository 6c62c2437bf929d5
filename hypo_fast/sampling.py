"""In-process sampler: k completions per prompt with a KV cache, scored as they are drawn.

Each decode step runs the decoder body on one token per row and hands its last hidden state to the
fused sampling head, which returns the next token *and* its log-probability without ``[B, V]`` logits.
Those recorded log-probs are the ones HyPO's KL reward uses: no second scoring pass.

The temperature is the policy's (:class:`hypo_fast.models.Policy` owns it): samples come from
π_τ = softmax(z/τ) and the recorded log-probs are log π_τ, exactly what the training forward computes for
online samples (tested at τ = 1 and τ ≠ 1). There is no top-k/top-p truncation: a truncated draw would
not come from π_τ, and the KL estimate would be biased.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache, StaticCache

from hypo_fast.models.loading import decoder_of
from hypo_fast.models.packing import pad_rows
from hypo_fast.models.policy import Policy
from hypo_fast.seeds import derive_seed


def _set_by(where: str) -> dict:
    """Field metadata: not a key of a run's ``sampling`` section (the trainer sets it from ``where``)."""
    return {"set_by": where}


@dataclass(frozen=True)
class SamplingConfig:
    """How online samples are drawn: the ``sampling`` section of ``hypo-fast train`` and the :class:`Sampler`'s
    settings, one class (as the ``algorithm`` section is :class:`hypo_fast.HyPOObjective`)."""

    prompts_per_step: int = 4  # trainer: online prompts per micro-batch (per rank), each given num_samples
    max_new_tokens: int = 64
    temperature: float = 1.0  # τ of π_τ. The Policy owns τ (it scores what is drawn): the trainer builds its
                              # Policy with this value, and the Sampler refuses a policy at another τ
    stop_on_eos: bool = True  # trainer: the tokenizer's EOS ends a sample (it becomes stop_token_ids)
    num_samples: int = field(default=2, metadata=_set_by("algorithm.num_samples (k) and eval.kl_samples"))
                                                  # k per prompt, consecutive in the output
    stop_token_ids: tuple[int, ...] = field(default=(), metadata=_set_by("sampling.stop_on_eos"))
    seed: int = field(default=0, metadata=_set_by("optim.seed (a seed per draw)"))
    greedy: bool = field(default=False, metadata=_set_by("nothing: HyPO's KL term needs samples from π_τ"))
                                                  # argmax decoding (records log-probs at τ = 1; needs τ = 1)
    cache: str = "auto"  # "static" (preallocated, compile-friendly), "dynamic", or auto: static on CUDA
    compile_decode: bool = False  # torch.compile the decode step (on CUDA with CUDA graphs, "reduce-overhead")
    gather_zero3: bool = True  # ZeRO-3: gather all weights once per generate() (False: per module, per token)
    shared_prefill: bool = True  # prefill a prompt once for its k samples (False: k copies; the same draws)
    compact_below: float = 0.5  # drop finished rows from the decode batch when fewer than this share is alive
                                # (dynamic cache, eager decode; 0 never). Changes which noise a row draws, not
                                # the distribution
    stop_check_every: int = 0  # decode steps between checks for finished rows (each a host sync on a GPU);
                               # 0: every step on CPU (no sync to save), every 8 on a GPU. The same samples
                               # where no compaction happens (it happens only at checks)

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples (k) must be ≥ 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not 0.0 <= self.compact_below < 1.0:
            raise ValueError(f"compact_below must be in [0, 1), got {self.compact_below}")
        if self.stop_check_every < 0:
            raise ValueError(f"stop_check_every must be ≥ 0 (0: per device), got {self.stop_check_every}")
        if self.cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"cache must be 'auto', 'static' or 'dynamic', got {self.cache!r}")


@dataclass(frozen=True)
class Samples:
    prompt_index: torch.Tensor  # [M] which prompt each sample answers (k consecutive per prompt)
    tokens: torch.Tensor  # [M, T] sampled tokens, pad_id after a row finished
    logps: torch.Tensor  # [M, T] fp32 log-prob of each token when drawn, 0 after finish
    mask: torch.Tensor  # [M, T] bool: generated tokens (the stop token included)

    def responses(self) -> list[list[int]]:
        """Each sample's generated tokens (tokens and mask come to the host once, then are split there)."""
        tokens, mask = self.tokens.cpu(), self.mask.cpu()
        flat = tokens[mask].tolist()  # rows' tokens, in order: the mask is a prefix of each row
        out, start = [], 0
        for n in mask.sum(1).tolist():
            out.append(flat[start:start + n])
            start += n
        return out

    def num_tokens(self) -> int:
        return int(self.mask.sum())


def gathered_parameters(model: torch.nn.Module):
    """Under DeepSpeed ZeRO-3, gather the full weights once for a whole generation phase."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class Sampler:
    """Batched generation from a :class:`Policy` (its HF model, fused head and temperature)."""

    def __init__(self, policy: Policy, config: SamplingConfig, pad_id: int = 0):
        if config.temperature != policy.temperature:
            raise ValueError(f"SamplingConfig.temperature={config.temperature} but the policy samples at "
                             f"τ={policy.temperature}: the Policy owns τ (build it with the config's temperature)")
        if config.greedy and policy.temperature != 1.0:
            raise ValueError(f"greedy decoding records log-probs at τ = 1, but the policy samples at "
                             f"temperature {policy.temperature}")
        self.policy, self.config, self.pad_id = policy, config, pad_id
        self.model, self.head = policy.model, policy.head
        self.decoder = decoder_of(self.model)
        # transformers ≥ 5.2x renames the decoder's ``past_key_values`` argument to ``cache``
        self._cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        self._decode = self.decoder
        if config.compile_decode:
            self._decode = torch.compile(self.decoder, mode="reduce-overhead", dynamic=False)

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        context = getattr(self.model.config, "max_position_embeddings", None)
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty")
            if context is not None and len(prompt) + self.config.max_new_tokens > context:
                raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens={self.config.max_new_tokens} "
                                 f"exceed the model's context of {context}")

    def _left_padded(self, rows, device):
        input_ids, mask = pad_rows(rows, self.pad_id, left=True)
        return input_ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], seed: int | None = None) -> Samples:
        """k samples per prompt; ``seed`` (default: the config's) makes the draw reproducible."""
        self._check_prompts(prompts)
        cfg = self.config
        seed = cfg.seed if seed is None else seed
        device = self.head.weight.device
        was_training = self.model.training
        self.model.eval()
        try:
            with gathered_parameters(self.model) if cfg.gather_zero3 else contextlib.nullcontext():
                tokens, logps, mask = self._generate(prompts, seed, device)
        finally:
            self.model.train(was_training)
        prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(cfg.num_samples)
        return Samples(prompt_index, tokens, logps, mask)

    def _prefill(self, prompts, device):
        """Prefill the prompts; returns ``(cache, hidden [M, D], attention [M, L], positions [M, L])`` for the
        M = prompts·k rows. With ``shared_prefill`` each prompt is prefilled once and its KV cache repeated k
        times (k× fewer prefill FLOPs); otherwise every sample prefills its own copy."""
        cfg, k = self.config, self.config.num_samples
        rows = list(prompts) if cfg.shared_prefill else [p for p in prompts for _ in range(k)]
        input_ids, attention = self._left_padded(rows, device)
        L = input_ids.shape[1]
        positions = (attention.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache()
        out = self.decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                           cache_position=torch.arange(L, device=device), **{self._cache_arg: cache})
        hidden = out.last_hidden_state[:, -1]  # [P or M, D]
        if cfg.shared_prefill and k > 1:  # each prompt's k samples consecutive
            cache.batch_repeat_interleave(k)
            hidden, attention, positions = (t.repeat_interleave(k, 0) for t in (hidden, attention, positions))
        # a static cache attends over its whole preallocated length each step: slower on CPU (measured in
        # benchmarks/bench_generate.py), but it gives the fixed shapes CUDA graphs need
        if cfg.cache == "static" or (cfg.cache == "auto" and device.type == "cuda"):
            cache = _as_static(cache, self.model.config, L + cfg.max_new_tokens)
        return cache, hidden, attention, positions

    def _generate(self, prompts, seed, device):
        cfg = self.config
        cache, hidden, attention, positions = self._prefill(prompts, device)
        (M, L), T = attention.shape, cfg.max_new_tokens
        tokens = torch.full((M, T), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((M, T), dtype=torch.float32, device=device)
        live = torch.zeros((M, T), dtype=torch.bool, device=device)
        mask = torch.zeros((M, L + T), dtype=torch.long, device=device)  # preallocated: no per-step concatenation
        mask[:, :L] = attention
        rows = torch.arange(M, device=device)  # decode-batch row → output row (changes when finished rows leave)
        finished = torch.zeros(M, dtype=torch.bool, device=device)
        next_position = positions[:, -1:] + 1
        cache_positions = torch.arange(L, L + T, device=device)
        stops = torch.tensor(cfg.stop_token_ids, dtype=torch.long, device=device)
        check_every = cfg.stop_check_every or (1 if device.type == "cpu" else 8)  # a host sync on a GPU
        compact = cfg.compact_below > 0 and isinstance(cache, DynamicCache) and self._decode is self.decoder
        used = 0
        for step in range(T):
            token, logp = self.head.sample(hidden, temperature=self.policy.temperature,
                                           seed=derive_seed(seed, "decode", step), greedy=cfg.greedy)
            alive = ~finished
            fed = torch.where(alive, token, self.pad_id)
            tokens[rows, step] = fed
            logps[rows, step] = torch.where(alive, logp, 0.0)
            live[rows, step] = alive
            used = step + 1
            if stops.numel():
                finished = finished | torch.isin(token, stops)
            if step + 1 == T:
                break
            if stops.numel() and used % check_every == 0:
                n_alive = int((~finished).sum())
                if n_alive == 0:
                    break
                if compact and n_alive <= cfg.compact_below * rows.numel():  # stop spending work on finished rows
                    keep = (~finished).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, fed, finished, mask, next_position, alive = (
                        t[keep] for t in (rows, fed, finished, mask, next_position, alive))
            mask[:, L + step] = alive.long()
            out = self._decode(input_ids=fed[:, None], attention_mask=mask[:, :L + step + 1],
                               position_ids=next_position, use_cache=True,
                               cache_position=cache_positions[step:step + 1], **{self._cache_arg: cache})
            hidden = out.last_hidden_state[:, -1]
            next_position = next_position + 1
        return tokens[:, :used], logps[:, :used], live[:, :used]


def _as_static(dynamic: DynamicCache, config, max_len: int) -> StaticCache:
    """The prefilled (and repeated) dynamic cache copied into a static one of ``max_len`` positions."""
    static = StaticCache(config=config, max_cache_len=max_len)
    for src, dst in zip(dynamic.layers, static.layers):
        dst.lazy_initialization(src.keys, src.values)
        length = src.keys.shape[-2]
        dst.keys[:, :, :length] = src.keys
        dst.values[:, :, :length] = src.values
        dst.cumulative_length.fill_(length)
    return static
