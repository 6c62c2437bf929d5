"""hypo_fast tokenizes preference rows into exactly the token ids TRL 1.16's DPOTrainer makes.

TRL's own preprocessing (``DPOTrainer._prepare_dataset`` and ``DataCollatorForPreference``, which only use
the tokenizer) runs on the same rows with the same tokenizer: a byte-level BPE trained here, so merges
cross the prompt/completion boundary, with (a) a chat template that emits BOS, (b) one that ends turns
with EOS, and (c) the plain string format; explicit and implicit prompts; with and without truncation.
"""

from __future__ import annotations

import json
import types

import pytest

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

from hypo_fast.train.data import DataConfig  # noqa: E402
from hypo_fast.train.tokenization import load_pairs  # noqa: E402

CORPUS = ["the cat sat on the mat", "the dog ran to the park", "what is the capital of france? paris",
          "a cat and a dog", "user: hello there", "assistant: hi, how can i help"] * 20
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
EOS_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def bpe_tokenizer(eos: str, template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=260, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = template
    return tok


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


STANDARD = [{"prompt": "the cat s", "chosen": "at on the mat", "rejected": "ank"},  # a merge across the boundary
            {"prompt": "what is the capital of france?", "chosen": " paris", "rejected": " rome</s>"}]
IMPLICIT = [{"chosen": "the dog ran to the park", "rejected": "the dog ran home"},
            {"chosen": "a cat and a dog", "rejected": "a cat and a mouse"}]
CONVERSATIONS = [{"prompt": user("hello there"), "chosen": assistant("hi, how can i help"),
                  "rejected": assistant("go away")},
                 {"prompt": user("what is the capital of france?") + assistant("paris") + user("and spain?"),
                  "chosen": assistant("madrid"), "rejected": assistant("rome")}]
IMPLICIT_CONVERSATIONS = [{"chosen": user("hello there") + assistant("hi"), "rejected": user("hello there") + assistant("no")}]

CASES = {  # name: (eos token, template, rows)
    "plain strings": ("</s>", None, STANDARD),
    "plain strings, implicit prompt": ("</s>", None, IMPLICIT),
    "template emitting BOS": ("</s>", BOS_TEMPLATE, CONVERSATIONS),
    "template ending turns with EOS": ("<|end|>", EOS_TEMPLATE, CONVERSATIONS),
    "template ending turns with EOS, implicit prompt": ("<|end|>", EOS_TEMPLATE, IMPLICIT_CONVERSATIONS),
}


def trl_ids(tok, rows, max_length):
    """TRL's own (prompt, chosen, rejected) ids: its dataset preparation, then its collator's truncation."""
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args,
                                           "train")
    out = []
    for row in prepared:
        if max_length is None:
            out.append((row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]))
            continue
        batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                          truncation_mode="keep_start")([row])
        sequences = []
        for i in range(2):  # chosen row, then rejected row
            keep = batch["attention_mask"][i].bool()
            ids, completion = batch["input_ids"][i][keep].tolist(), batch["completion_mask"][i][keep].bool()
            sequences.append((ids[:int((~completion).sum())], ids[int((~completion).sum()):]))
        assert sequences[0][0] == sequences[1][0]
        out.append((sequences[0][0], sequences[0][1], sequences[1][1]))
    return out


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_token_ids_equal_trls(tmp_path, case, truncate):
    eos, template, rows = CASES[case]
    tok = bpe_tokenizer(eos, template)
    max_length = None
    if truncate:  # cuts the first row's completions; a longer prompt (if any) fills it and the row is dropped
        max_length = len(trl_ids(tok, rows[:1], None)[0][0]) + 3
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = load_pairs(path, tok, DataConfig(max_length=max_length), cache_dir=tmp_path / "cache")
    expected = [e for e in trl_ids(tok, rows, max_length) if max_length is None or len(e[0]) < max_length]
    assert [(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)) for p in pairs] == expected
    assert stats.dropped == len(rows) - len(expected)
    if template is None:  # strings: BOS once (from the tokenizer), EOS once (appended unless present)
        assert all(p.prompt_ids.count(tok.bos_token_id) == 1 for p in pairs)
        assert max_length or all(p.chosen_ids[-1] == tok.eos_token_id and p.chosen_ids.count(tok.eos_token_id) == 1
                                 for p in pairs)
    elif template == BOS_TEMPLATE:
        assert all(p.prompt_ids.count(tok.bos_token_id) == 1 for p in pairs)


def test_eos_ensure_appends_where_the_template_does_not_end_the_turn(tmp_path):
    tok = bpe_tokenizer("</s>", BOS_TEMPLATE)  # turns end with a newline, not EOS
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    trl_pairs, _ = load_pairs(path, tok, DataConfig(max_length=None), cache_dir=tmp_path / "a")
    ensured, _ = load_pairs(path, tok, DataConfig(max_length=None, eos="ensure"), cache_dir=tmp_path / "b")
    for a, b in zip(trl_pairs, ensured):
        assert a.chosen_ids[-1] != tok.eos_token_id and b.chosen_ids == a.chosen_ids + (tok.eos_token_id,)
    eos_tok = bpe_tokenizer("<|end|>", EOS_TEMPLATE)  # turns already end with EOS: nothing is added
    ended, _ = load_pairs(path, eos_tok, DataConfig(max_length=None, eos="ensure"), cache_dir=tmp_path / "c")
    assert all(p.chosen_ids.count(eos_tok.eos_token_id) == 1 for p in ended)


def test_a_second_start_reads_the_tokenized_cache(tmp_path, monkeypatch):
    tok = bpe_tokenizer("</s>", None)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in STANDARD * 50))
    first, _ = load_pairs(path, tok, cache_dir=tmp_path / "cache")
    from hypo_fast.train import tokenization

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")

    monkeypatch.setattr(tokenization.RowTokenizer, "pair", fail)
    second, _ = load_pairs(path, tok, cache_dir=tmp_path / "cache")
    assert second == first
    path.write_text(path.read_text() + json.dumps(STANDARD[0]) + "\n")  # new contents: a new cache entry
    with pytest.raises(AssertionError, match="tokenized again"):
        load_pairs(path, tok, cache_dir=tmp_path / "cache")
