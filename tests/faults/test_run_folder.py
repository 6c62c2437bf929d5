"""A run folder records what made it; a start that would mix runs refuses, and says what differs."""

from __future__ import annotations

import json

import pytest
import yaml

from hypo_fast.train.run_folder import RunFolderError
from tests.faults.helpers import config, metric_steps, train


def test_a_finished_run_is_not_mixed_with_a_new_one(tmp_path):
    cfg = config(tmp_path)
    train(cfg)
    folder = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds a run .*checkpoints up to step 4.*overwrite"):
        train({**cfg, "output": {**cfg["output"], "resume": "never"}})
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing touched


def test_changed_settings_are_listed_and_nothing_is_relabelled(tmp_path):
    cfg = config(tmp_path)
    train(cfg)
    changed = {**cfg, "algorithm": {**cfg["algorithm"], "beta": 0.2}, "optim": {**cfg["optim"], "lr": 2e-3}}
    with pytest.raises(RunFolderError, match=r"algorithm.beta: 0.1 → 0.2\n  optim.lr: 0.001 → 0.002"):
        train(changed)
    for path in (tmp_path / "run" / "config.yaml", tmp_path / "run" / "checkpoint-4" / "config.yaml"):
        assert yaml.safe_load(path.read_text())["algorithm"]["beta"] == 0.1


def test_replaced_data_is_refused_on_resume(tmp_path):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:5]))  # a smaller file, same path
    with pytest.raises(RunFolderError, match=r"data \(train\): the contents changed"):
        train({**cfg, "optim": {**cfg["optim"], "max_steps": 4}})


def test_overwrite_starts_over_and_keeps_the_new_runs_checkpoints(tmp_path):
    cfg = config(tmp_path, steps=6)
    train(cfg)
    fresh = {**cfg, "optim": {**cfg["optim"], "max_steps": 2, "lr": 2e-3},
             "output": {**cfg["output"], "overwrite": True}}
    train(fresh)
    folder = tmp_path / "run"
    assert metric_steps(folder) == [1, 2]  # only the new run's rows
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2"]
    record = json.loads((folder / "run.json").read_text())
    assert record["config"]["optim"]["lr"] == 2e-3 and len(record["legs"]) == 1


def test_a_longer_run_continues_without_duplicate_rows(tmp_path):
    cfg = config(tmp_path, steps=4)
    train(cfg)
    train({**cfg, "optim": {**cfg["optim"], "max_steps": 6}})  # max_steps may change between legs
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    legs = json.loads((tmp_path / "run" / "run.json").read_text())["legs"]
    assert [leg["from_step"] for leg in legs] == [-1, 4]


def test_a_complete_run_is_not_trained_again(tmp_path, capsys):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    assert train(cfg) == []
    assert "is complete (step 2 of 2); nothing to do" in capsys.readouterr().out
    assert metric_steps(tmp_path / "run") == [1, 2]


def test_an_explicit_checkpoint_continues_with_new_settings_and_records_them(tmp_path):
    cfg = config(tmp_path, steps=4)
    train(cfg)
    folder = tmp_path / "run"
    changed = {**cfg, "algorithm": {**cfg["algorithm"], "beta": 0.2},
               "optim": {**cfg["optim"], "max_steps": 5},
               "output": {**cfg["output"], "resume": str(folder / "checkpoint-2")}}
    train(changed)
    assert metric_steps(folder) == [1, 2, 3, 4, 5]  # steps 3 and 4 of the first leg were replaced
    legs = json.loads((folder / "run.json").read_text())["legs"]
    assert legs[-1]["from_step"] == 2 and "algorithm.beta: 0.1 → 0.2" in legs[-1]["changes"]


def test_a_run_that_never_saved_starts_again_even_from_an_earlier_releases_record(tmp_path):
    """A fresh leg that crashed before its first checkpoint starts over at step 0, whichever release wrote its
    record (earlier ones wrote a fresh leg's from_step as 0, this one as −1)."""
    from hypo_fast.train.run_folder import RUN_RECORD, decide

    out = tmp_path / "run"
    out.mkdir()
    for from_step in (0, -1):
        leg = {"started": "2026-11-30T12:00:00", "from_step": from_step, "from_checkpoint": None, "changes": []}
        (out / RUN_RECORD).write_text(json.dumps({"config": {"a": 1}, "data": {"train": "x"}, "legs": [leg]}))
        start = decide(out, {"a": 1}, {"train": "x"}, "auto", False)
        assert start.resume_from is None and not start.overwrite
