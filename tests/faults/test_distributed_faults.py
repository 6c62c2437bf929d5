"""A frozen (not dead) rank ends a two-rank run within distributed.timeout_minutes, with an error that
names the timed-out collective, instead of blocking its peer for the default half hour."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.faults.helpers import config
from tests.train.helpers import PYTHON, subprocess_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(marker: str) -> dict[int, dict[str, str]]:
    """pid → environment of every process carrying the marker (the launcher and its workers)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("HYPO_FAST_TEST_MARKER") == marker:
            found[int(proc.name)] = env
    return found


@pytest.mark.slow  # two ranks
def test_a_frozen_rank_ends_the_run_within_the_timeout(tmp_path):
    cfg = config(tmp_path, steps=500, optim={"pairs_per_micro_batch": 2}, distributed={"timeout_minutes": 0.1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    marker = uuid.uuid4().hex
    env = {**subprocess_env(), "HYPO_FAST_TEST_MARKER": marker}
    run = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(_free_port()), "-m", "hypo_fast.cli", "train", str(path)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before a rank could be frozen"
        frozen = [pid for pid, e in _processes_with(marker).items() if e.get("RANK") == "1" and "LOCAL_RANK" in e]
        assert len(frozen) == 1
        os.kill(frozen[0], signal.SIGSTOP)
        stopped_at = time.time()
        output, finished, fd = "", False, run.stdout.fileno()
        while time.time() < stopped_at + 120 and not finished:  # never block on a silent pipe
            ready, _, _ = select.select([fd], [], [], 1.0)
            chunk = os.read(fd, 1 << 16).decode(errors="replace") if ready else ""
            output += chunk
            finished = "collective timed out" in output or (ready and not chunk)
        elapsed = time.time() - stopped_at
    finally:
        for pid in _processes_with(marker):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        run.communicate(timeout=60)
    assert finished and "a collective timed out after distributed.timeout_minutes=0.1 during " in output, output[-3000:]
    assert elapsed < 60, elapsed  # the 6-second timeout, not the default 30 minutes


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launchers_process_group_stops_every_rank_with_a_checkpoint(tmp_path):
    """What docs/faults.md tells: signal the launcher's process group (what scancel and Ctrl-C do). DeepSpeed's
    ``launch`` passes SIGTERM on to the ranks, which finish the step, save and exit (``kill`` of the
    ``deepspeed`` process alone leaves them running: its runner does not forward signals on one node)."""
    cfg = config(tmp_path, steps=500, output={"save_every": 0})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    marker = uuid.uuid4().hex
    env = {**subprocess_env(), "HYPO_FAST_TEST_MARKER": marker, "DS_ACCELERATOR": "cpu"}
    launcher = Path(PYTHON).parent / "deepspeed"
    run = subprocess.Popen([PYTHON, str(launcher), "--num_accelerators", "2", "--master_port", str(_free_port()),
                            "--module", "hypo_fast.cli", "train", str(path)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.1)
        assert run.poll() is None, "the run ended before the signal"
        os.killpg(run.pid, signal.SIGTERM)
        output = run.communicate(timeout=120)[0]
        deadline = time.time() + 60
        while time.time() < deadline and _processes_with(marker):
            time.sleep(0.5)
        left = _processes_with(marker)
    finally:
        for pid in _processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, "ranks still running after the launcher's group got SIGTERM"
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved to", output)
    assert stopped, output[-3000:]
    assert (tmp_path / "run" / f"checkpoint-{stopped.group(1)}" / "manifest.json").exists()
