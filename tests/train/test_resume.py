"""A run killed with SIGKILL mid-training and resumed (resume=auto) continues exactly: the same batches,
samples and losses as a run that was never interrupted, and the replayed steps are logged once."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import yaml

from tests.train.helpers import PYTHON, subprocess_env, toy_config


def _last_per_step(path):
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row  # a resumed run logs the replayed steps again: keep the last
    return rows


def _run(config_path, cwd):
    return subprocess.Popen([PYTHON, "-m", "hypo_fast.cli", "train", str(config_path)], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    paths = {}
    for name in ("straight", "killed"):
        cfg = toy_config(tmp_path, name, kl_coef=0.5, steps=6)
        cfg["output"].update(save_every=2, keep_last=2, resume="auto", overwrite=False, report_to=["tensorboard"])
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))

    straight = _run(paths["straight"], tmp_path)
    assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]

    killed = _run(paths["killed"], tmp_path)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if metrics.exists() and len(_last_per_step(metrics)) >= 3:
            break  # checkpoint-2 is on disk and step 4 is under way
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "checkpoint-6").exists()

    resumed = _run(paths["killed"], tmp_path)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from" in output

    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert logged == [1, 2, 3, 4, 5, 6]  # the steps replayed after checkpoint-2 replaced the killed leg's rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "killed" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    a, b = _last_per_step(tmp_path / "straight" / "metrics.jsonl"), _last_per_step(metrics)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for key in ("loss", "loss/dpo", "loss/kl", "kl/online", "rewards/margins"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6 * max(1.0, abs(a[step][key])), (step, key)
