"""A stop (SIGTERM/SIGINT, simulated in process) tells a command that really resumes and never writes the
same checkpoint twice; a run folder that cannot be written mid-run (full disk, file too large, read-only)
ends in one line with the last checkpoint whole; a damaged reference cache is scored again."""

from __future__ import annotations

import errno
import json
import logging
import re

import pytest
import torch
import yaml

from hypo_fast.cli import main
from hypo_fast.train import checkpoint
from hypo_fast.train.metrics_log import MetricsLog
from hypo_fast.train.signals import StopRequests
from tests.faults.helpers import config, metric_steps, train


def _stop_after(monkeypatch, step: int) -> None:
    """As if SIGTERM arrived during step ``step`` (the loop asks once per step, after any scheduled save)."""
    asked = []

    def requested(self, device):
        asked.append(1)
        if len(asked) >= step:
            self.received = "SIGTERM"
        return self.received is not None

    monkeypatch.setattr(StopRequests, "requested", requested)


def _saved_steps(monkeypatch) -> list[int]:
    saved, original = [], checkpoint.save_checkpoint

    def counting(out_dir, step, *args, **kwargs):
        saved.append(step)
        return original(out_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", counting)
    return saved


def test_a_stop_at_a_scheduled_save_writes_the_checkpoint_once(tmp_path, monkeypatch, capsys):
    cfg = config(tmp_path, steps=6)  # saves every 2 steps
    _stop_after(monkeypatch, 2)
    saved = _saved_steps(monkeypatch)
    train(cfg)
    assert saved == [2]
    assert re.search(r"stopped by SIGTERM after step 2; checkpoint saved to .*checkpoint-2;", capsys.readouterr().out)


def _cli(tmp_path, cfg, *overrides) -> int:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), *overrides])
    return code


@pytest.mark.parametrize("output", [{"overwrite": True}, {"overwrite": True, "resume": "never"}, "explicit"])
def test_the_stop_line_gives_a_command_that_resumes(tmp_path, monkeypatch, capsys, output):
    cfg = config(tmp_path, steps=4)
    if output == "explicit":  # a leg started from a named checkpoint: the same command would go back to it
        train({**cfg, "optim": {**cfg["optim"], "max_steps": 2}})
        output = {"resume": str(tmp_path / "run" / "checkpoint-2")}
    cfg["output"].update(output)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _stop_after(patch, 1)
        assert _cli(tmp_path, cfg) == 0
    stopped = capsys.readouterr().out
    line = re.search(r"stopped by SIGTERM after step (\d+);.*; to resume, run the same command with (.*) added", stopped)
    assert line, stopped
    stopped_at = int(line.group(1))
    assert _cli(tmp_path, cfg, *line.group(2).split()) == 0, capsys.readouterr().err[-2000:]
    folder = tmp_path / "run"
    assert json.loads((folder / "run.json").read_text())["legs"][-1]["from_step"] == stopped_at
    assert metric_steps(folder) == [1, 2, 3, 4]


def _fail_writes(monkeypatch, tmp_path, code: int, where: str, at_step: int) -> None:
    out = tmp_path / "run"
    strerror = {errno.ENOSPC: "No space left on device", errno.EFBIG: "File too large",
                errno.EACCES: "Permission denied"}[code]
    if where == "checkpoint":
        original = checkpoint.write_manifest

        def failing(folder, step):
            if step == at_step:
                raise OSError(code, strerror, str(folder / "model.safetensors"))
            return original(folder, step)

        monkeypatch.setattr(checkpoint, "write_manifest", failing)
    else:
        original = MetricsLog.log

        def failing(self, step, metrics, advance=True):
            if step == at_step:
                raise OSError(code, strerror, str(out / "metrics.jsonl"))
            return original(self, step, metrics, advance)

        monkeypatch.setattr(MetricsLog, "log", failing)


@pytest.mark.parametrize("code, where", [(errno.ENOSPC, "checkpoint"), (errno.EFBIG, "metrics"),
                                         (errno.EACCES, "metrics")])
def test_an_unwritable_run_folder_ends_in_one_line_and_resumes(tmp_path, monkeypatch, capsys, code, where):
    cfg = config(tmp_path, steps=4)
    with monkeypatch.context() as patch:
        _fail_writes(patch, tmp_path, code, where, at_step=4 if where == "checkpoint" else 3)
        assert _cli(tmp_path, cfg) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"hypo-fast: error: cannot write .*run/(.*model.safetensors|metrics.jsonl) at step \d "
                    rf"\({re.escape(__import__('os').strerror(code))}\); the run stopped and its last checkpoint, "
                    r".*checkpoint-2, is whole\. .*run the same command to resume$", last), last
    checkpoint.verify(tmp_path / "run" / "checkpoint-2")
    assert _cli(tmp_path, cfg) == 0
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4]


def test_a_damaged_reference_cache_is_scored_again(tmp_path, caplog):
    cfg = config(tmp_path, steps=2)
    train(cfg)
    (cache,) = (tmp_path / "run" / "ref_cache").glob("train-*.pt")
    whole = torch.load(cache)
    cache.write_bytes(cache.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="hypo_fast"):
        train({**cfg, "optim": {**cfg["optim"], "max_steps": 4}})
    assert any("a damaged reference cache file" in r.getMessage() and cache.name in r.getMessage()
               for r in caplog.records)
    assert torch.equal(torch.load(cache), whole)
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4]


@pytest.mark.parametrize("code,strerror,line", [
    (errno.ENOSPC, "No space left on device", r"cannot write .*ref_cache/train-.* \(No space left on device\); "
                                              r"checkpoints already saved are whole: free space"),
    (errno.EACCES, "Permission denied", r"cannot access .*ref_cache/train-.* \(Permission denied\); checkpoints "
                                        r"already saved are whole: give this user access"),
])
def test_a_write_error_at_start_up_is_one_line(tmp_path, monkeypatch, capsys, code, strerror, line):
    from hypo_fast.train import reference_cache

    def refused(obj, path, *args, **kwargs):
        raise OSError(code, strerror, str(path))

    monkeypatch.setattr(reference_cache.torch, "save", refused)  # the reference cache is written at start-up
    assert _cli(tmp_path, config(tmp_path, steps=2)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.match("hypo-fast: error: " + line, err.strip().splitlines()[-1]), err[-2000:]
