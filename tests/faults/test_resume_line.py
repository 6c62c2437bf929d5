"""``resume: auto`` follows the run's line and never throws work away: every checkpoint damaged is a refusal
that touches nothing; an explicit resume from an older step abandons the newer branch (neither resumed from
nor pruned), and the checkpoint just written is never pruned; an explicit checkpoint starts a new folder; a
moved folder resumes; a damaged run.json or a cut-short metrics row is handled in one line."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from hypo_fast.train.checkpoint import CheckpointError
from hypo_fast.train.run_folder import RunFolderError
from tests.faults.helpers import config, losses, metric_steps, train, train_then_damage_every_checkpoint


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _with(cfg, **sections):
    return {**cfg, **{name: {**cfg[name], **values} for name, values in sections.items()}}


def test_every_checkpoint_damaged_is_refused_and_nothing_is_touched(tmp_path):
    cfg = config(tmp_path, steps=4)
    folder = train_then_damage_every_checkpoint(cfg)
    before = _snapshot(folder)
    for max_steps in (4, 2, 6):  # fewer steps used to start over and prune each new checkpoint at once
        with pytest.raises(RunFolderError, match=r"every checkpoint of the run is damaged \(.*checkpoint-4: "
                                                 r"model.safetensors has .*checkpoint-2.*Nothing was changed.*"
                                                 r"output.overwrite=true"):
            train(_with(cfg, optim={"max_steps": max_steps}))
        assert _snapshot(folder) == before


def test_auto_follows_the_latest_leg_and_pruning_keeps_what_it_just_wrote(tmp_path):
    cfg = config(tmp_path, steps=6)  # checkpoints 4 and 6 (keep_last 2)
    train(cfg)
    folder = tmp_path / "run"
    # go back to step 4 with one checkpoint kept: the new checkpoint-5 must survive its own pruning
    train(_with(cfg, optim={"max_steps": 5}, output={"resume": str(folder / "checkpoint-4"), "keep_last": 1}))
    assert (folder / "checkpoint-5" / "manifest.json").exists()
    assert (folder / "checkpoint-6").exists()  # the abandoned branch is left alone, not deleted
    assert not (folder / "checkpoint-4").exists()  # the line's older checkpoint was pruned
    new_line = losses(folder)[5]
    train(_with(cfg, optim={"max_steps": 7}, output={"keep_last": 1}))  # auto: continues the new line at 5
    legs = json.loads((folder / "run.json").read_text())["legs"]
    assert [leg["from_step"] for leg in legs] == [-1, 4, 5]
    assert metric_steps(folder) == [1, 2, 3, 4, 5, 6, 7] and losses(folder)[5] == new_line


def test_an_explicit_checkpoint_starts_a_new_folder_from_it(tmp_path):
    cfg = config(tmp_path, steps=4)
    train(cfg)
    train(_with(cfg, optim={"max_steps": 6}))  # the same run continued in place: the reference losses
    reference = losses(tmp_path / "run")
    other = tmp_path / "other"
    branch = _with(cfg, optim={"max_steps": 6}, output={"dir": str(other), "resume": str(tmp_path / "run" / "checkpoint-4")})
    train(branch)
    assert metric_steps(other) == [5, 6]
    for step in (5, 6):
        assert abs(losses(other)[step] - reference[step]) < 1e-6
    train(_with(branch, optim={"max_steps": 7}, output={"resume": "auto"}))  # and auto continues it there
    assert metric_steps(other) == [5, 6, 7]


def test_a_moved_run_folder_resumes(tmp_path):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    train(_with(cfg, optim={"max_steps": 4}, output={"dir": str(tmp_path / "moved")}))
    assert metric_steps(tmp_path / "moved") == [1, 2, 3, 4]


def test_a_damaged_run_record_is_one_line_and_an_explicit_resume_starts_a_new_one(tmp_path):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    folder = tmp_path / "run"
    (folder / "run.json").write_text('{"config": {"optim"')  # cut short
    before = _snapshot(folder)
    with pytest.raises(RunFolderError, match=r"run.json is damaged .*Nothing was changed.*output.resume=<checkpoint"):
        train(_with(cfg, optim={"max_steps": 4}))
    assert _snapshot(folder) == before
    train(_with(cfg, optim={"max_steps": 4}, output={"resume": str(folder / "checkpoint-2")}))
    assert metric_steps(folder) == [1, 2, 3, 4]
    assert len(list(folder.glob("run.json.damaged-*"))) == 1  # kept aside, not deleted


def test_a_cut_short_metrics_row_is_dropped_and_the_run_resumes(tmp_path, caplog):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 0.6')  # a kill mid-write
    with caplog.at_level(logging.WARNING, logger="hypo_fast"):
        train(_with(cfg, optim={"max_steps": 4}))
    assert any("is not a whole row (a write cut short); dropped" in r.getMessage() for r in caplog.records)
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4]


def test_a_missing_checkpoint_path_is_named(tmp_path):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    with pytest.raises(RunFolderError, match=r"output.resume: .*checkpoint-8: no such checkpoint folder"):
        train(_with(cfg, output={"resume": str(tmp_path / "run" / "checkpoint-8")}))
    with pytest.raises(CheckpointError):  # a folder that is not a checkpoint: the manifest check names it
        train(_with(cfg, output={"resume": str(tmp_path / "run")}))


def test_a_leg_that_crashed_before_saving_resumes_from_the_checkpoint_it_started_from(tmp_path, monkeypatch):
    from hypo_fast.train.trainer import Trainer

    cfg = config(tmp_path, steps=4)
    train(cfg)
    other = tmp_path / "other"
    branch = _with(cfg, optim={"max_steps": 6}, output={"dir": str(other), "resume": str(tmp_path / "run" / "checkpoint-4")})
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", lambda self: (_ for _ in ()).throw(RuntimeError("crash (simulated)")))
        with pytest.raises(RuntimeError, match="crash"):
            train(branch)
    assert not list(other.glob("checkpoint-*"))
    auto = _with(branch, output={"resume": "auto"})
    shutil.move(tmp_path / "run", tmp_path / "away")  # the checkpoint it started from is gone: refused
    with pytest.raises(RunFolderError, match=r"last leg continued from .*checkpoint-4 \(step 4\), which is gone"):
        train(auto)
    shutil.move(tmp_path / "away", tmp_path / "run")
    train(auto)  # back in place: auto starts from it again, not from step 0
    assert metric_steps(other) == [5, 6]
