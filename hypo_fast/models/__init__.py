"""Layer 3: Hugging Face models, the fused head, packing, and the policy/reference pair."""

from hypo_fast.models.head import FusedLogprobHead
from hypo_fast.models.loading import add_lora, attention_implementation, decoder_of, load_causal_lm
from hypo_fast.models.packing import StepBatch, TokenBatch, pack_sequences, pack_step, pad_sequences
from hypo_fast.models.policy import AdapterReference, FrozenReference, Policy, final_hidden

__all__ = [
    "FusedLogprobHead", "load_causal_lm", "add_lora", "attention_implementation", "decoder_of",
    "TokenBatch", "pack_sequences", "pad_sequences", "StepBatch", "pack_step",
    "Policy", "AdapterReference", "FrozenReference", "final_hidden",
]
