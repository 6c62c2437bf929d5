"""The 8B memory plan (benchmarks/memory_8b.py) against the peaks measured on this project's CPU machine.

The measurements are committed rows (benchmarks/results/memory_8b.jsonl: one bf16 training step per cell,
phase by phase); these tests re-run the *current* estimator on each measured cell, so a change to the
estimator that moves it off what was measured fails here, without measuring again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import memory_8b  # noqa: E402

CALIBRATED = [c for c in memory_8b.calibrate(memory_8b.measured_rows(memory_8b.RESULTS_DIR)) if c.get("ratio")]


def test_there_are_measured_cells_of_both_modes():
    cells = {(c["mode"], c["malloc"]) for c in CALIBRATED}
    assert ("lora", "mmap") in cells and ("full", "mmap") in cells
    assert max(c["params_b"] for c in CALIBRATED) > 1.0  # the largest scale this machine holds


@pytest.mark.parametrize("cell", [c for c in CALIBRATED if c["malloc"] == "mmap"], ids=lambda c: c["cell"])
def test_estimate_is_within_20_percent_of_every_measured_peak(cell):
    """The issue's bar: each measured configuration predicted within ±20% (glibc's default malloc keeps
    freed memory resident, which the estimate of live tensors leaves out; those rows are reported, not held
    to this)."""
    assert 0.8 <= cell["ratio"] <= 1.2, cell


@pytest.mark.parametrize("name,gpu_gib,stated_gib", [("llama3_8b_lora_hypo.yaml", 24, 19.2),
                                                      ("llama3_8b_full_zero3_offload.yaml", 80, 44.9)])
def test_recipes_state_their_plan_and_fit_their_gpu(tmp_path, name, gpu_gib, stated_gib):
    """Each 8B example config names its predicted peak in its comments: the current estimator gives that
    number for it (a Llama-3-8B config.json stands in for the user's model folder), and the peak with the
    calibration's upper band and the CUDA context fits the GPU the recipe is for."""
    s = memory_8b.LLAMA3_8B
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": s.layers, "hidden_size": s.hidden, "intermediate_size": s.ffn,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab,
        "tie_word_embeddings": s.tied}))
    path = REPO / "hypo_fast" / "examples" / name
    assert f"{stated_gib}" in path.read_text()
    shape, plan = memory_8b.plan_of_config(str(path), [f"model.path={tmp_path}", "data.train_file=pairs.jsonl"], gpus=1)
    est = memory_8b.estimate(shape, plan)
    peak = est["peak"] / memory_8b.GB
    assert peak == pytest.approx(stated_gib, abs=0.05), (name, est["totals"])
    band = memory_8b.plan_bands(CALIBRATED)["lora" if plan.lora else "full"]
    assert peak * band[1] + memory_8b.CUDA_CONTEXT / memory_8b.GB < gpu_gib
