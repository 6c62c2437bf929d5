"""SIGTERM (what schedulers send) and SIGINT (Ctrl-C) finish the current step, save, and exit 0 with a
line saying where; running the same command again continues exactly, with no step logged twice."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.helpers import cli, config, losses, metric_steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    straight = config(tmp_path, "straight", steps=6, kl_coef=0.5, output={"save_every": 0})
    assert cli(tmp_path, straight, name="straight.yaml").returncode == 0
    return losses(tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_continues_exactly(tmp_path, sig, uninterrupted):
    cfg = config(tmp_path, "stopped", steps=6, kl_coef=0.5, output={"save_every": 0, "report_to": ["tensorboard"]})
    run = cli(tmp_path, cfg, name="stopped.yaml", wait=False)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None and not (metrics.exists() and len(metric_steps(metrics.parent)) >= 2):
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the signal"
    run.send_signal(sig)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 0, output[-3000:]
    stopped_at = max(metric_steps(metrics.parent))
    assert stopped_at < 6
    assert f"stopped by {sig.name} after step {stopped_at}; checkpoint saved to" in output
    assert (tmp_path / "stopped" / f"checkpoint-{stopped_at}" / "manifest.json").exists()

    resumed = cli(tmp_path, cfg, name="stopped.yaml")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert metric_steps(metrics.parent) == [1, 2, 3, 4, 5, 6]  # no step logged twice
    a, b = uninterrupted, losses(metrics.parent)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "stopped" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
