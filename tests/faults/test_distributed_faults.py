"""A frozen (not dead) rank ends a two-rank run within distributed.timeout_minutes, with an error that
names the timed-out collective, instead of blocking its peer for the default half hour."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

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
