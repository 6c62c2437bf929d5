"""A local folder of data files is read as ``datasets.load_dataset(folder)`` reads it: what a TRL user's
``dataset_name: data`` means when ``data/`` holds ``train.jsonl`` and ``test.jsonl``."""

from __future__ import annotations

import json

import pytest

from hypo_fast.train.config import config_from_dict
from hypo_fast.train.data import DataError, Source

TRAIN = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
TEST = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(2)]


def _write(path, rows):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.mark.parametrize("layout", [("train.jsonl", "test.jsonl"), ("train.json", "test.json"),
                                    ("train.csv", "test.csv"), ("data/train-00000-of-00001.parquet",
                                                                "data/test-00000-of-00001.parquet")])
def test_splits_come_from_the_file_names(tmp_path, layout):
    _write(tmp_path / "data" / layout[0], TRAIN)
    _write(tmp_path / "data" / layout[1], TEST)
    train = Source(tmp_path / "data", "train").dataset()
    test = Source(tmp_path / "data", "test").dataset()
    assert [r["prompt"] for r in train] == [r["prompt"] for r in TRAIN]
    assert [r["prompt"] for r in test] == ["q0", "q1"]
    assert [r["prompt"] for r in Source(tmp_path / "data").dataset()] == [r["prompt"] for r in TRAIN]  # default


def test_a_split_the_folder_lacks_fails_naming_the_ones_it_has(tmp_path):
    _write(tmp_path / "data" / "train.jsonl", TRAIN)
    _write(tmp_path / "data" / "test.jsonl", TEST)
    with pytest.raises(DataError, match=r"the folder's splits are \['test', 'train'\].*no split 'validation'"):
        Source(tmp_path / "data", "validation").dataset()


def test_data_files_name_the_splits(tmp_path):
    _write(tmp_path / "data" / "prefs_a.jsonl", TRAIN)
    _write(tmp_path / "data" / "heldout.jsonl", TEST)
    files = {"train": "prefs_a.jsonl", "dev": "heldout.jsonl"}
    assert len(Source(tmp_path / "data", "dev", data_files=files).dataset()) == 2
    assert len(Source(tmp_path / "data", "train", data_files=files).dataset()) == 5
    cfg = config_from_dict({"model_name_or_path": "/m", "dataset_name": str(tmp_path / "data"), "data_files": files})
    assert cfg.data.data_files == files  # flat beside TRL's names too


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a dataset saved with datasets' save_to_disk, nor a folder of data"):
        Source(tmp_path / "data").dataset()


def test_a_single_csv_file_is_read(tmp_path):
    _write(tmp_path / "pairs.csv", TRAIN)
    assert len(Source(tmp_path / "pairs.csv").dataset()) == 5


def test_a_trl_config_naming_a_folder_trains_on_its_splits(tmp_path):
    """dataset_name: data with train.jsonl and test.jsonl, evaluated on test as TRL does."""
    from hypo_fast.examples.toy import char_tokenizer
    from hypo_fast.train.build import load_datasets

    _write(tmp_path / "data" / "train.jsonl", TRAIN)
    _write(tmp_path / "data" / "test.jsonl", TEST)
    cfg = config_from_dict({"model_name_or_path": "/m", "dataset_name": str(tmp_path / "data"),
                            "dataset_test_split": "test", "eval_strategy": "steps",
                            "output_dir": str(tmp_path / "out")})
    loaded = load_datasets(cfg, char_tokenizer("abdeglnopqr0123456789 "), report=False)
    assert (len(loaded.train_pairs), len(loaded.eval_pairs)) == (5, 2)
