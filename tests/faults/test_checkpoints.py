"""Checkpoints carry a manifest written last; resume verifies it and falls back to the newest intact one;
re-saving never deletes the last good checkpoint before the new one is complete."""

from __future__ import annotations

import logging

import pytest

from hypo_fast.train import checkpoint
from hypo_fast.train.checkpoint import CheckpointError
from tests.faults.helpers import config, damage, losses, metric_steps, train, train_then_damage_every_checkpoint


@pytest.mark.parametrize("how", ["truncated model.safetensors", "truncated DeepSpeed state",
                                 "missing trainer_state.json", "flipped bytes, same size", "no manifest"])
def test_resume_skips_a_damaged_checkpoint_and_names_it(tmp_path, caplog, how):
    cfg = config(tmp_path, steps=4)
    train(cfg)
    reference = losses(tmp_path / "run")
    damage(tmp_path / "run" / "checkpoint-4", how)
    with caplog.at_level(logging.WARNING, logger="hypo_fast"):
        train({**cfg, "optim": {**cfg["optim"], "max_steps": 5}})
    assert any("checkpoint-4" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    # continued from checkpoint-2: steps 3 and 4 replayed exactly, once each in the log
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    resumed = losses(tmp_path / "run")
    for step in (3, 4):
        assert abs(resumed[step] - reference[step]) < 1e-6


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    cfg = config(tmp_path, steps=4)
    folder = train_then_damage_every_checkpoint(cfg)
    damaged = {**cfg, "output": {**cfg["output"], "resume": str(folder / "checkpoint-4")}}
    with pytest.raises(CheckpointError, match="checkpoint-4: model.safetensors has .* bytes, the manifest says"):
        train(damaged)


def test_resaving_a_step_keeps_the_old_copy_until_the_new_one_is_complete(tmp_path, monkeypatch):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    folder = tmp_path / "run" / "checkpoint-2"
    checkpoint.verify(folder)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    from hypo_fast.train.trainer import Trainer
    from hypo_fast.train.config import config_from_dict

    trainer = Trainer(config_from_dict(cfg))  # the complete run, resumed at step 2
    monkeypatch.setattr(checkpoint, "write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()  # re-saving step 2 fails before the new copy is in place
    checkpoint.verify(folder)  # the old checkpoint-2 is still whole
