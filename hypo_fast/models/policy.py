"""A policy (HF causal LM + fused head) and its reference, composed rather than subclassed.

The policy owns the sampling temperature τ: the sampler draws from π_τ, and :func:`step_token_logprobs`
is the one place a temperature meets a segment (pairs at τ = 1 for the DPO term, online samples at τ for
the KL term, policy and reference alike; see :mod:`hypo_fast.objective`).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from hypo_fast.models.head import FusedLogprobHead
from hypo_fast.models.loading import decoder_of, is_peft, output_embeddings
from hypo_fast.models.packing import StepBatch, TokenBatch


def final_hidden(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """``[rows, L, D]`` final hidden states of the decoder body; the HF LM head is never called."""
    return decoder_of(model)(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             attention_mask=batch.attention_mask, use_cache=False).last_hidden_state


def step_token_logprobs(head: FusedLogprobHead, hidden: torch.Tensor, batch: StepBatch, temperature: float,
                        return_logit_mean: bool = False, ref_online: tuple | None = None):
    """``[N]`` log-probs at a step batch's loss positions: the pairs' under π (τ = 1), the online
    samples' under π_τ. With ``return_logit_mean``, also ``[N]`` mean logits (a metric).

    With ``ref_online = (ref_rows [N_on, D_ref], ref_head)`` (the ``exact_token`` estimator), the online rows
    go through the fused KL op instead (log-prob and exact KL_t against the reference in one pass; their
    logit means are 0, the metric reads the pairs' only) and ``[N_on]`` token KLs come last in the tuple.
    """
    tokens = batch.tokens
    if ref_online is not None and batch.num_online:
        n = batch.offline_positions
        offline = head(hidden, tokens.targets[:n], tokens.loss_positions[:n], return_logit_mean=return_logit_mean)
        kls, online = head.token_kl(hidden, tokens.targets[n:], tokens.loss_positions[n:], *ref_online,
                                    temperature=temperature)
        if not return_logit_mean:
            return torch.cat([offline, online]), kls
        return torch.cat([offline[0], online]), torch.cat([offline[1], torch.zeros_like(online)]), kls
    if temperature == 1.0 or batch.num_online == 0:
        return head(hidden, tokens.targets, tokens.loss_positions, return_logit_mean=return_logit_mean)
    n = batch.offline_positions
    offline = head(hidden, tokens.targets[:n], tokens.loss_positions[:n], return_logit_mean=return_logit_mean)
    online = head(hidden, tokens.targets[n:], tokens.loss_positions[n:], temperature=temperature,
                  return_logit_mean=return_logit_mean)
    if not return_logit_mean:
        return torch.cat([offline, online])
    return torch.cat([offline[0], online[0]]), torch.cat([offline[1], online[1]])


class AdapterReference:
    """LoRA: the reference is the policy's own base weights with the adapters disabled (no second copy)."""

    def __init__(self, peft_model: torch.nn.Module, head: FusedLogprobHead):
        self.model, self.head = peft_model, head

    def context(self):
        return self.model.disable_adapter()


class FrozenReference:
    """Full fine-tuning: a frozen copy of the starting weights, optionally kept on another device (CPU)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None, impl: str = "auto"):
        self.model = model.requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)
        self.head = FusedLogprobHead.from_linear(output_embeddings(self.model), impl)

    @classmethod
    def copy_of(cls, policy_model: torch.nn.Module, device=None, impl: str = "auto") -> "FrozenReference":
        return cls(copy.deepcopy(policy_model), device, impl)

    def context(self):
        return contextlib.nullcontext()


class Policy:
    """Holds the trainable model, its fused head, its reference and the sampling temperature τ."""

    def __init__(self, model: torch.nn.Module, reference: AdapterReference | FrozenReference | None = None, *,
                 temperature: float = 1.0, impl: str = "auto"):
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        self.model = model
        self.head = FusedLogprobHead.from_linear(output_embeddings(model), impl)
        if reference is None and is_peft(model):
            reference = AdapterReference(model, self.head)
        self.reference = reference
        self.temperature = float(temperature)  # of π_τ, the distribution the sampler draws from

    def token_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[N]`` log π(target | prefix) at the batch's loss positions (τ = 1), with grad."""
        return self.head(final_hidden(self.model, batch), batch.targets, batch.loss_positions)

    def step_logprobs(self, batch: StepBatch, return_logit_mean: bool = False,
                      ref_online_hidden: torch.Tensor | None = None):
        """``[N]`` log-probs of a step batch, with grad: pairs under π, online samples under π_τ.

        With ``ref_online_hidden`` (``[N_on, D_ref]``, from ``reference_online_logprobs(return_hidden=True)``)
        also ``[N_on]`` exact per-token KL(π_τ ‖ π_ref,τ) of the online samples, last in the tuple.
        """
        ref_online = None if ref_online_hidden is None else (ref_online_hidden, self._reference_head())
        return step_token_logprobs(self.head, final_hidden(self.model, batch.tokens), batch, self.temperature,
                                   return_logit_mean, ref_online)

    @torch.no_grad()
    def reference_token_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[N]`` log π_ref at the same positions (τ = 1; one no-grad forward)."""
        return self._reference(batch, 1.0)

    @torch.no_grad()
    def reference_online_logprobs(self, batch: StepBatch, return_hidden: bool = False):
        """``[N_on]`` log π_ref,τ of the step batch's online samples (one no-grad forward over them only).

        ``return_hidden`` also returns the reference's final hidden states at those positions ``[N_on, D_ref]``
        (from the same forward), which the exact per-token KL needs.
        """
        return self._reference(batch.online_tokens(), self.temperature, return_hidden)

    def _reference_head(self) -> FusedLogprobHead:
        if self.reference is None:
            raise ValueError("this policy has no reference (pass a FrozenReference or use LoRA)")
        return self.reference.head

    def _reference(self, batch: TokenBatch, temperature: float, return_hidden: bool = False):
        ref = self.reference
        head = self._reference_head()
        device = next(ref.model.parameters()).device
        with ref.context():
            batch_on = batch.to(device)
            hidden = final_hidden(ref.model, batch_on)
            out = head(hidden, batch_on.targets, batch_on.loss_positions, temperature=temperature)
        if not return_hidden:
            return out.to(batch.targets.device)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch_on.loss_positions)
        return out.to(batch.targets.device), rows.to(batch.targets.device)
