"""Token ids equal TRL 1.16's ``DPOTrainer`` preprocessing on four tokenizer families built here (nothing is
downloaded): Llama-3 (byte-level BPE, BOS from the template), ChatML/Qwen-3 (tools, thinking switched per row),
Gemma (Unigram with a metaspace, BOS from the template) and Mistral (metaspace BPE, ``[INST]`` turns, EOS
from the template). TRL's own functions (``DPOTrainer._prepare_dataset``) run on the same rows."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("trl")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hypo_fast.train.data import DataConfig  # noqa: E402
from hypo_fast.train.tokenization import load_pairs  # noqa: E402
from tests.train.test_tokenization_trl import trl_ids  # noqa: E402

CORPUS = ["the answer is b because it is the only even number", "the dog ran to the park and then home",
          "what is the capital of france? paris is", "call the weather tool for paris", "a cat sat on the mat",
          "think step by step before you answer", "hello there, how can i help you today"] * 30

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN3 = (  # Qwen-3's shape: tools in a system turn; the last assistant turn carries a (possibly empty) think block
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}"
    "{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' + m.content"
    " + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def _fast(core, specials, template, **tokens):
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **tokens,
                                  additional_special_tokens=[s for s in specials if s not in tokens.values()])
    tok.chat_template = template
    return tok


def _byte_level_bpe(specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained on the corpus (the Llama-3 and Qwen families' kind of tokenizer)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return core


def llama3():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    core = _byte_level_bpe(specials)
    core.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                        special_tokens=[("<|begin_of_text|>", 0)])
    return _fast(core, specials, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                 pad_token="<|end_of_text|>")


def qwen3():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    return _fast(_byte_level_bpe(specials), specials, QWEN3, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def gemma():
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    core = Tokenizer(models.Unigram())
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    core.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return _fast(core, specials, GEMMA, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def mistral():
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=250, special_tokens=specials))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _fast(core, specials, MISTRAL, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


FAMILIES = {"llama3": llama3, "qwen3": qwen3, "gemma": gemma, "mistral": mistral}


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}
ROWS = {
    "strings, a merge across the boundary": [
        {"prompt": "the answer is b bec", "chosen": "ause it is even", "rejected": "ause it is odd"},
        {"prompt": "what is the capital of france?", "chosen": " paris", "rejected": " rome"}],
    "implicit prompt, chosen a prefix of rejected": [  # TRL keeps the space in the prompt here ("z" is not in
        {"chosen": "the answer is z", "rejected": "the answer is z because it is even"},  # CORPUS: no "␣z" token)
        {"chosen": "the answer is b", "rejected": "the answer is b because it is even"},
        {"chosen": "the dog ran to the park", "rejected": "the dog ran to the park and then home"}],
    "implicit prompt, differing after a space": [
        {"chosen": "the dog ran to the park", "rejected": "the dog ran home"},
        {"chosen": "a cat sat on the mat", "rejected": "a cat ran"}],
    "conversations": [
        {"prompt": user("hello there"), "chosen": assistant("how can i help you today"), "rejected": assistant("no")},
        {"prompt": user("what is the capital of france?") + assistant("paris") + user("and then?"),
         "chosen": assistant("the park"), "rejected": assistant("home")}],
    "implicit conversations": [
        {"chosen": user("hello there") + assistant("how can i help"), "rejected": user("hello there") + assistant("no")}],
    "thinking off per row": [  # Qwen-3's enable_thinking: the empty think block belongs to TRL's prompt
        {"prompt": user("what is the capital of france?"), "chosen": assistant("paris"), "rejected": assistant("rome"),
         "chat_template_kwargs": {"enable_thinking": False}},
        {"prompt": user("think step by step"), "chosen": assistant("the answer is b"), "rejected": assistant("no"),
         "chat_template_kwargs": {"enable_thinking": False}}],
    "tools per row": [
        {"prompt": user("call the weather tool for paris"), "chosen": assistant("it is sunny"),
         "rejected": assistant("no"), "tools": json.dumps([WEATHER_TOOL])},
        {"prompt": user("hello there"), "chosen": assistant("how can i help"), "rejected": assistant("no"),
         "tools": json.dumps([])}],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


def _ours(tmp_path, tok, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = load_pairs(path, tok, DataConfig(max_length=None), cache_dir=tmp_path / "cache")
    return [(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)) for p in pairs]


@pytest.mark.parametrize("case", sorted(ROWS))
def test_token_ids_equal_trls(tmp_path, family, case):
    name, tok = family
    rows = ROWS[case]
    assert _ours(tmp_path, tok, rows) == trl_ids(tok, rows, None)


def test_the_per_row_settings_change_the_ids():
    """The thinking and tools rows are not trivially equal: without their settings the ids differ."""
    tok = qwen3()
    for case in ("thinking off per row", "tools per row"):
        rows = ROWS[case]
        plain = [{k: v for k, v in r.items() if k not in ("tools", "chat_template_kwargs")} for r in rows]
        assert trl_ids(tok, rows, None) != trl_ids(tok, plain, None)


def test_a_prompt_end_merged_into_the_completion_is_warned_about(tmp_path, caplog):
    tok = llama3()
    rows = ROWS["strings, a merge across the boundary"]
    with caplog.at_level(logging.WARNING, logger="hypo_fast"):
        ours = _ours(tmp_path, tok, rows)
    assert ours == trl_ids(tok, rows, None)
    warned = [r.getMessage() for r in caplog.records if "is not a prefix of the tokenized prompt" in r.getMessage()]
    assert len(warned) == 1 and "in 1 of 2 rows" in warned[0] and "first: 'c'" in warned[0]
