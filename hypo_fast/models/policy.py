"""A policy (HF causal LM + fused head) and its reference, composed rather than subclassed."""

from __future__ import annotations

import contextlib
import copy

import torch

from hypo_fast.models.head import FusedLogprobHead
from hypo_fast.models.loading import decoder_of, is_peft, output_embeddings
from hypo_fast.models.packing import TokenBatch


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
    """Holds the trainable model, its fused head and its reference; scores token batches."""

    def __init__(self, model: torch.nn.Module, reference: AdapterReference | FrozenReference | None = None,
                 impl: str = "auto"):
        self.model = model
        self.head = FusedLogprobHead.from_linear(output_embeddings(model), impl)
        if reference is None and is_peft(model):
            reference = AdapterReference(model, self.head)
        self.reference = reference

    def token_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[N]`` log π(target | prefix) at the batch's loss positions, with grad."""
        return self.head(final_hidden(self.model, batch), batch.targets, batch.loss_positions)

    @torch.no_grad()
    def reference_token_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """``[N]`` log π_ref at the same positions (one no-grad forward)."""
        if self.reference is None:
            raise ValueError("this policy has no reference (pass a FrozenReference or use LoRA)")
        ref = self.reference
        device = next(ref.model.parameters()).device
        with ref.context():
            batch_on = batch.to(device)
            hidden = final_hidden(ref.model, batch_on)
            out = ref.head(hidden, batch_on.targets, batch_on.loss_positions)
        return out.to(batch.targets.device)
