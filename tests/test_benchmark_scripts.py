"""Benchmark plumbing a TRL user relies on: where rows go, what every row records, the step benchmark's
shapes and its reading of how TRL computes log-probs. (The benchmarks themselves are scripts, not tests.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_step  # noqa: E402
import benchlib  # noqa: E402


def test_rows_go_outside_the_source_tree_unless_recorded(tmp_path):
    parser = benchlib.bench_arguments("doc", ["a"])
    assert parser.parse_args([]).results_dir is None
    assert Path(parser.parse_args(["--record"]).results_dir) == REPO / "benchmarks" / "results"
    assert parser.parse_args(["--results-dir", str(tmp_path)]).results_dir == str(tmp_path)
    assert benchlib.default_results_dir() == REPO / "runs" / "benchmarks"
    assert "/runs/" in (REPO / ".gitignore").read_text()  # the default is ignored by git
    path = benchlib.append_rows("probe", [{"a": 1}], tmp_path)
    assert path == tmp_path / "probe.jsonl" and json.loads(path.read_text()) == {"a": 1}


def test_every_row_records_the_versions():
    env = benchlib.environment("cpu")
    for key in ("torch", "transformers", "trl", "deepspeed", "commit", "machine"):
        assert key in env
    import transformers

    assert env["transformers"] == transformers.__version__


def _args(*argv):
    parser = benchlib.bench_arguments("doc", bench_step.METHODS)
    for name in ("--layers", "--hidden", "--vocab", "--prompt-len", "--response-len", "--pairs"):
        parser.add_argument(name, type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    return parser.parse_args(list(argv))


def test_step_shapes_from_the_command_line():
    assert bench_step.cases(_args()) == bench_step.CASES["cpu"]
    assert bench_step.cases(_args("--quick")) == [bench_step.QUICK_CASE]
    (pairs, prompt, response, V, D, layers), = bench_step.cases(_args("--vocab", "50304", "--hidden", "512",
                                                                      "--layers", "4", "--pairs", "3"))
    assert (pairs, V, D, layers) == (3, 50304, 512, 4) and (prompt, response) == bench_step.CASES["cpu"][0][1:3]


def test_trl_lm_head_is_read_from_the_patched_forward():
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    from hypo_fast.examples.toy import tiny_llama

    model = tiny_llama(vocab_size=64, hidden_size=32, layers=1)
    assert bench_step.trl_lm_head(model, "cpu").startswith("HF logits")
    add_fused_lm_head(model)
    head = bench_step.trl_lm_head(model, "cpu")
    assert head.startswith("TRL fused LM head") and "vocab chunk 32768" in head and head.endswith("torch)")
    ids = torch.randint(0, 64, (2, 6))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)  # what the name says is what runs
    assert out.log_probs.shape == (2, 5)


def test_checkpointing_flag_is_read_from_the_model():
    from hypo_fast.examples.toy import tiny_llama

    model = tiny_llama(vocab_size=64, hidden_size=32, layers=1)
    assert not bench_step._checkpointing(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert bench_step._checkpointing(model)


def test_trl_runs_with_hypo_fasts_checkpointing_setting():
    """TRL 1.16's DPOConfig turns gradient checkpointing on by default; the benchmark turns it off (as
    hypo_fast runs) unless asked, and names TRL's own fused LM head in the row."""
    pytest.importorskip("trl")
    case = {"bench": "step", "pairs": 1, "prompt_chars": 8, "response_chars": 7, "V": 64, "D": 32, "layers": 1,
            "dtype": "float32", "device": "cpu", "steps": 2, "warmup": 1, "grad_ckpt": 0}
    result = bench_step.worker("trl", case, 1)
    assert result["grad_ckpt_used"] is False
    assert result["lm_head"].startswith("TRL fused LM head")
    assert result["step_s"] > 0


def test_the_benchmarks_page_shows_both_coverage_experiments(tmp_path, monkeypatch):
    """docs/benchmarks.md (report.py) renders the committed runs: the first experiment's manipulation check
    split into valid uncovered and malformed mass, and the second task's own report."""
    import report

    monkeypatch.setattr(report, "DOCS", tmp_path)  # the plots are copied here
    results = REPO / "benchmarks" / "results"
    first = "\n".join(report.coverage_section(results / "coverage.jsonl"))
    assert first.count("of which valid uncovered templates") == first.count("of which malformed strings") == 2
    assert "+0.597 ± 0.145" in first  # DPO β=0.1's malformed mass, as coverage_report.txt states it
    second = "\n".join(report.coverage_valid_section(results / "coverage_valid.jsonl"))
    assert "every response valid" in second and "manipulation check" in second
    assert "P2 adversarial" in second and (tmp_path / "coverage_valid_frontier.png").exists()
