"""A non-finite loss skips the optimizer step, with no weight changed, under ZeRO 0–3 in fp32 and bf16."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.train.helpers import subprocess_env

SCRIPT = r"""
import sys, torch
from pathlib import Path
from hypo_fast.train.config import config_from_dict
from hypo_fast.train.trainer import Trainer
from tests.train.helpers import toy_config

def check(stage, dtype, tmp):
    trainer = Trainer(config_from_dict(toy_config(tmp, f"run-{stage}-{dtype}", steps=3,
                                                  deepspeed={"zero_stage": stage}, model={"dtype": dtype})))
    original = trainer.micro_step

    def poisoned(micro):
        out = original(micro)
        if trainer.step == 1:
            out.loss = out.loss * float("nan")
        return out

    trainer.micro_step = poisoned
    trainer.train_step()
    weights = lambda: {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}
    before = weights()
    skipped = trainer.train_step()["skipped_nonfinite"]
    unchanged = all(torch.equal(before[k], v) for k, v in weights().items())
    trainer.train_step()
    moved = not all(torch.equal(before[k], v) for k, v in weights().items())
    print("RESULT", stage, dtype, skipped, unchanged, moved, flush=True)

for stage in map(int, sys.argv[2].split(",")):
    for dtype in ("float32", "bfloat16"):
        check(stage, dtype, Path(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stages", ["0,1,2", "3"])  # ZeRO-3 patches module construction: its own process
def test_nonfinite_loss_skips_the_step_under_every_zero_stage(tmp_path, stages):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), stages], env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    expected = [f"RESULT {s} {d} 1.0 True True" for s in stages.split(",") for d in ("float32", "bfloat16")]
    assert result == expected, (out.stdout + out.stderr)[-3000:]
