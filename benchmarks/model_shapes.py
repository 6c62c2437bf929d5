"""Llama-shaped model shapes: parameter counts and a transformers config, for the memory plan
(``memory_8b.py``) and its measured cells (``memory_cells.py``). Pure Python, no imports beyond the
standard library, so both scripts and the tests read the one table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        D, hd = self.hidden, self.head_dim
        return D * self.heads * hd * 2 + 2 * D * self.kv_heads * hd + 3 * D * self.ffn + 2 * D

    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int) -> int:
        D, hd = self.hidden, self.head_dim
        per_layer = r * ((D + self.heads * hd) * 2 + (D + self.kv_heads * hd) * 2 + (D + self.ffn) * 3)
        return self.layers * per_layer

    def hf_config(self, max_positions: int) -> dict:
        return {"model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
                "intermediate_size": self.ffn, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "max_position_embeddings": max_positions,
                "tie_word_embeddings": self.tied}


LLAMA3_8B = Shape("llama3-8b", 32, 4096, 14336, 32, 8, 128256)
# calibration shapes: Llama-3's vocabulary and untied head, GQA; llama-1.5b is Llama-3.2-1B's body, untied;
# llama32k-0.16b puts most of its parameters in the layers (a 32k vocabulary)
SHAPES = {s.name: s for s in [
    LLAMA3_8B,
    Shape("llama-0.15b", 4, 512, 2048, 8, 4, 128256),
    Shape("llama-0.35b", 8, 1024, 4096, 16, 8, 128256),
    Shape("llama-0.5b", 16, 1024, 4096, 16, 8, 128256),
    Shape("llama-1.5b", 16, 2048, 8192, 32, 8, 128256),
    Shape("llama32k-0.16b", 8, 1024, 2816, 16, 8, 32000),
    Shape("tiny", 2, 256, 1024, 4, 2, 32000),
]}
