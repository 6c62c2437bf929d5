"""Layer 3: Hugging Face models, the fused head, packing, and the policy/reference pair."""

from hypo_fast.models.head import FusedLogprobHead
from hypo_fast.models.loading import add_lora, attention_implementation, decoder_of, load_causal_lm
from hypo_fast.models.packing import TokenBatch, pack_sequences, pad_sequences
from hypo_fast.models.policy import AdapterReference, FrozenReference, Policy, final_hidden

__all__ = [
    "FusedLogprobHead", "load_causal_lm", "add_lora", "attention_implementation", "decoder_of",
    "TokenBatch", "pack_sequences", "pad_sequences",
    "Policy", "AdapterReference", "FrozenReference", "final_hidden",
]
