"""A tiny Llama-style model and a toy preference batch, built locally (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

IGNORE = -100


def tiny_llama(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def toy_pairs(n_pairs: int, vocab_size: int = 256, prompt_len: int = 6, response_len: int = 10, seed: int = 0):
    """Rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` sharing prompts.

    Returns ``input_ids [2B, T]``, ``attention_mask [2B, T]`` and ``labels [2B, T]`` (``IGNORE`` on prompt
    tokens and padding; rejected responses are one token shorter, so the batch is ragged).
    """
    g = torch.Generator().manual_seed(seed)
    T = prompt_len + response_len
    prompts = torch.randint(0, vocab_size, (n_pairs, prompt_len), generator=g)
    chosen = torch.randint(0, vocab_size // 2, (n_pairs, response_len), generator=g)  # a learnable preference
    rejected = torch.randint(vocab_size // 2, vocab_size, (n_pairs, response_len), generator=g)
    input_ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    attention_mask = torch.ones(2 * n_pairs, T, dtype=torch.long)
    attention_mask[n_pairs:, -1] = 0  # rejected rows: last position is padding
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :prompt_len] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shifted_hidden_and_targets(model, input_ids, attention_mask, labels):
    """Final hidden states of the decoder (the HF LM head is never called), aligned with next-token targets."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [R, T, D]
    return hidden[:, :-1], labels[:, 1:]  # row t predicts token t+1


def char_tokenizer(alphabet: str):
    """A real Hugging Face fast tokenizer over single characters (built locally; saved with checkpoints)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
