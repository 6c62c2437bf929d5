"""Data loading: TRL's standard and conversational formats from local files, truncation, bad rows."""

from __future__ import annotations

import json

import pytest

from hypo_fast.examples.toy import char_tokenizer
from hypo_fast.train.data import DataError, Stream
from hypo_fast.train.data import DataConfig as Settings
from hypo_fast.train.tokenization import load_pairs, load_prompts

ALPHABET = "abcdefghu|:"


@pytest.fixture(scope="module")
def tokenizer():
    tok = char_tokenizer(ALPHABET)
    tok.chat_template = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}" \
                        "{% if add_generation_prompt %}a:{% endif %}"
    return tok


ROWS = [{"prompt": "abc", "chosen": "dd", "rejected": "eee"}, {"prompt": "ha", "chosen": "g", "rejected": "fa"}]


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        ds.to_parquet(str(path)) if kind == "parquet" else ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind,name", [("jsonl", "d.jsonl"), ("json", "d.json"), ("parquet", "d.parquet"),
                                       ("saved", "saved_dataset")])
def test_standard_format_from_every_file_kind(tmp_path, tokenizer, kind, name):
    path = _write(tmp_path / name, ROWS, kind)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    pairs, stats = load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16))
    assert stats.rows == 2 and len(pairs) == 2
    first = pairs[0]
    assert tokenizer.decode(first.prompt_ids, skip_special_tokens=True) == "abc"
    assert first.prompt_ids[0] == tokenizer.bos_token_id
    assert first.chosen_ids[-1] == tokenizer.eos_token_id  # responses end with EOS
    assert tokenizer.decode(first.rejected_ids, skip_special_tokens=True) == "eee"
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p in before}
    assert before == after  # inputs are only read


def test_conversational_format_uses_the_chat_template(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "abc"}],
             "chosen": [{"role": "assistant", "content": "dd"}],
             "rejected": [{"role": "assistant", "content": "e"}]}]
    pairs, _ = load_pairs(_write(tmp_path / "c.jsonl", rows, "jsonl"), tokenizer,
                          Settings(max_prompt_length=16, max_length=32))
    assert tokenizer.decode(pairs[0].prompt_ids, skip_special_tokens=True) == "u:abc|a:"
    assert tokenizer.decode(pairs[0].chosen_ids, skip_special_tokens=True) == "dd|"


def test_truncation_is_counted(tmp_path, tokenizer):
    rows = [{"prompt": "abcdefgh", "chosen": "aaaaaaaa", "rejected": "b"}]
    pairs, stats = load_pairs(_write(tmp_path / "t.jsonl", rows, "jsonl"), tokenizer,
                              Settings(max_prompt_length=4, max_length=7))
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 1
    assert tokenizer.decode(pairs[0].prompt_ids, skip_special_tokens=True) == "fgh"  # the prompt's end is kept
    assert len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) == 7


@pytest.mark.parametrize("row,match", [
    ({"prompt": "abc", "chosen": "d"}, "missing field 'rejected'"),
    ({"prompt": "abc", "chosen": "", "rejected": "e"}, "'chosen' is empty"),
    ({"prompt": "abc", "chosen": 3, "rejected": "e"}, "strings or all be message lists"),
    (["abc"], "must be an object"),
])
def test_malformed_rows_name_file_and_row(tmp_path, tokenizer, row, match):
    path = _write(tmp_path / "bad.jsonl", [ROWS[0], row, ROWS[1]], "jsonl")
    with pytest.raises(DataError, match=rf"bad.jsonl: line 2: .*{match}"):
        load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16))
    pairs, stats = load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16, skip_bad_rows=True))
    assert len(pairs) == 2 and stats.bad_rows == 1


def test_broken_json_line_and_missing_file(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl: line 2"):
        load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16))
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl", tokenizer, Settings(max_prompt_length=8, max_length=16))


def test_prompt_only_set(tmp_path, tokenizer):
    prompts, _ = load_prompts(_write(tmp_path / "p.jsonl", [{"prompt": "abc"}, {"prompt": "h"}], "jsonl"),
                              tokenizer, Settings(max_prompt_length=8))
    assert [p.text for p in prompts] == ["abc", "h"]


def test_stream_is_reproducible_sharded_and_resumable():
    full = Stream(10, seed=3)
    order = [full.take(2) for _ in range(8)]  # crosses an epoch boundary
    assert sorted(sum(order[:5], [])) == list(range(10))
    ranks = [Stream(10, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(4):
        assert ranks[0].take(2) + ranks[1].take(2) == order[2 * step] + order[2 * step + 1]
    resumed = Stream(10, seed=3)
    resumed.load_state({"epoch": 0, "position": 6})
    assert resumed.take(2) == order[3] and resumed.take(2) == order[4]
