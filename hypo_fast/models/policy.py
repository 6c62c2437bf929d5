"""A policy (HF causal LM + fused head) and its reference, composed rather than subclassed.

The policy owns the sampling temperature τ: the sampler draws from π_τ, and the policy hands τ to
:func:`hypo_fast.segments.score_segments`, the one place a temperature meets a segment (pairs at τ = 1
for the DPO term, online samples at τ for the KL term, policy and reference alike).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from hypo_fast.models.head import FusedLogprobHead
from hypo_fast.models.loading import decoder_of, is_peft, output_embeddings
from hypo_fast.models.packing import StepBatch, TokenBatch
from hypo_fast.segments import Segments, score_segments


def final_hidden(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """``[rows, L, D]`` final hidden states of the decoder body; the HF LM head is never called."""
    return decoder_of(model)(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             attention_mask=batch.attention_mask, use_cache=False).last_hidden_state


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

    def step_logprobs(self, batch: StepBatch, return_metrics: bool = False,
                      ref_online_hidden: torch.Tensor | None = None):
        """``[N]`` log-probs of a step batch, with grad: pairs under π, online samples under π_τ.

        With ``return_metrics`` also their :class:`~hypo_fast.segments.RowMetrics` (for TRL's token metrics).

        With ``ref_online_hidden`` (``[N_on, D_ref]``, from ``reference_online_logprobs(return_hidden=True)``)
        also ``[N_on]`` exact per-token KL(π_τ ‖ π_ref,τ) of the online samples, last in the tuple.
        """
        hidden = final_hidden(self.model, batch.tokens)
        token_kl = None
        if ref_online_hidden is not None:
            ref_head = self._reference_head()
            token_kl = lambda rows, targets, tau: self.head.token_kl(rows, targets, ref_online_hidden,  # noqa: E731
                                                                     ref_head, tau)
        out = score_segments(self.head.score, batch.segments(hidden, self.temperature),
                             metrics=return_metrics, token_kl=token_kl)
        values = (out.logps, out.metrics) if return_metrics else (out.logps,)
        if ref_online_hidden is not None and batch.num_online:
            return *values, out.online_kls
        return values if return_metrics else out.logps

    @torch.no_grad()
    def reference_token_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[N]`` log π_ref at the same positions (τ = 1; one no-grad forward)."""
        return self._reference(batch, online=False)

    @torch.no_grad()
    def reference_online_logprobs(self, batch: StepBatch, return_hidden: bool = False):
        """``[N_on]`` log π_ref,τ of the step batch's online samples (one no-grad forward over them only).

        ``return_hidden`` also returns the reference's final hidden states at those positions ``[N_on, D_ref]``
        (from the same forward), which the exact per-token KL needs.
        """
        return self._reference(batch.online_tokens(), online=True, return_hidden=return_hidden)

    def _reference_head(self) -> FusedLogprobHead:
        if self.reference is None:
            raise ValueError("this policy has no reference (pass a FrozenReference or use LoRA)")
        return self.reference.head

    def _reference(self, batch: TokenBatch, online: bool, return_hidden: bool = False):
        """π_ref's log-probs of ``batch``'s loss positions: as pairs (τ = 1) or as online samples (τ)."""
        ref = self.reference
        head = self._reference_head()
        device = next(ref.model.parameters()).device
        with ref.context():
            batch_on = batch.to(device)
            hidden = final_hidden(ref.model, batch_on)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch_on.loss_positions)  # [N, D_ref]
            pair_rows = 0 if online else rows.shape[0]
            out = score_segments(head.score, Segments(rows, batch_on.targets, pair_rows, self.temperature)).logps
        if not return_hidden:
            return out.to(batch.targets.device)
        return out.to(batch.targets.device), rows.to(batch.targets.device)
