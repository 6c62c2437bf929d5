"""The example configs a user starts from load and validate (with their placeholders filled in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypo_fast.train.config import load_config

EXAMPLES = sorted((Path(__file__).parents[2] / "hypo_fast" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path):
    cfg = load_config(path, ["model.path=/models/local", "data.train_file=pairs.jsonl"])
    assert cfg.model.path == "/models/local"
