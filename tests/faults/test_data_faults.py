"""Bad data files and rows: named by file and line (or row); with skip_bad_rows each kind is skipped,
counted and named."""

from __future__ import annotations

import json
import logging

import pytest

from hypo_fast.examples.toy import char_tokenizer
from hypo_fast.train.data import DataError
from hypo_fast.train.data import DataConfig as Settings
from hypo_fast.train.tokenization import load_pairs

GOOD = {"prompt": "abc", "chosen": "dd", "rejected": "eee"}


@pytest.fixture(scope="module")
def tokenizer():
    tok = char_tokenizer("abcdefgh")
    # a template that, like many real ones, checks the roles it is given
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}{% endfor %}")
    return tok


def _line(row) -> bytes:
    return (json.dumps(row) + "\n").encode()


BAD_LINES = {
    "not UTF-8": b'{"prompt": "ab\xff", "chosen": "d", "rejected": "e"}\n',
    "not JSON": b'{"prompt": "ab", "chosen": \n',
    "a bad role": _line({"prompt": [{"role": "wizard", "content": "ab"}],
                         "chosen": [{"role": "assistant", "content": "d"}],
                         "rejected": [{"role": "assistant", "content": "e"}]}),
}
MESSAGES = {"not UTF-8": "line 2: not valid UTF-8", "not JSON": "line 2: not valid JSON",
            "a bad role": "line 2: the chat template rejected the row .*unknown role wizard"}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_a_bad_line_is_named_or_skipped_and_counted(tmp_path, tokenizer, caplog, kind):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_line(GOOD) + BAD_LINES[kind] + _line(GOOD))
    with pytest.raises(DataError, match=MESSAGES[kind]):
        load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16))
    with caplog.at_level(logging.WARNING):
        pairs, stats = load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16, skip_bad_rows=True))
    assert len(pairs) == 2 and stats.bad_rows == 1 and stats.rows == 3
    assert any("pairs.jsonl: line 2" in r.getMessage() for r in caplog.records)


def test_every_kind_skipped_in_one_file(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_line(GOOD) + b"".join(BAD_LINES.values()) + _line(GOOD))
    pairs, stats = load_pairs(path, tokenizer, Settings(max_prompt_length=8, max_length=16, skip_bad_rows=True))
    assert len(pairs) == 2 and stats.bad_rows == 3


def test_unreadable_files_are_named(tmp_path, tokenizer):
    parquet = tmp_path / "pairs.parquet"
    parquet.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match="pairs.parquet: cannot be read as a dataset"):
        load_pairs(parquet, tokenizer, Settings(max_prompt_length=8, max_length=16))
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="plain: a folder, but not a dataset saved with datasets' save_to_disk"):
        load_pairs(folder, tokenizer, Settings(max_prompt_length=8, max_length=16))
    broken = tmp_path / "pairs.json"
    broken.write_bytes(b'[{"prompt": "\xff"}]')
    with pytest.raises(DataError, match="pairs.json: not valid UTF-8 JSON"):
        load_pairs(broken, tokenizer, Settings(max_prompt_length=8, max_length=16))
