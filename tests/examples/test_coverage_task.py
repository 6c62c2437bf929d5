"""The coverage task (hypo_fast/examples/coverage_task.py), the experiment's analysis (benchmarks/coverage.py)
and the embedded demo: the task is what the design declares, the collector keeps what it should, the
evaluation's masses agree with the exact ones, the statistics are the declared ones."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from hypo_fast.examples import coverage_task as ct

# loaded by path under its own name: `import coverage` could find coverage.py (the test-coverage tool)
_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coverage.py"
_spec = importlib.util.spec_from_file_location("coverage_experiment", _SCRIPT)
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_task_is_the_declared_one(seed):
    task = ct.make_task(seed)
    assert len(task.templates) == 27 == len(set(task.templates)) and len(task.covered) == 6
    assert all(len(t) == 6 for t in task.templates)
    combos = list(itertools.product(range(3), repeat=3))
    for slot in range(3):  # every word of every slot occurs in a covered template
        assert {combos[i][slot] for i in task.covered} == {0, 1, 2}
    assert math.isclose(sum(task.sft_probs), 1.0)
    assert math.isclose(sum(task.sft_probs[i] for i in task.covered), 0.9)
    worse, better = task.rewards["worse"], task.rewards["better"]
    covered = [worse[i] for i in task.covered]
    assert sorted(covered) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(better[i] == worse[i] for i in task.covered)
    assert max(worse[i] for i in task.uncovered) < min(covered)  # worse than every covered one
    assert min(better[i] for i in task.uncovered) > max(covered)  # better than the best covered one
    assert task.reward("worse", "zzz") == task.reward("better", "") == ct.OFF_TEMPLATE_REWARD
    other = ct.make_task(seed + 100)
    assert other.templates != task.templates  # a seed re-draws the words


def test_classify_reads_token_ids_not_decoded_text(tmp_path):
    task = ct.make_task(0)
    tokenizer = ct.write_tokenizer(tmp_path / "tok")
    template = task.templates[3]
    ids = ct.encode(tokenizer, "", template)[1]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 7
    stray = ids[:2] + [tokenizer.bos_token_id] + ids[2:]  # decodes to the template with special tokens skipped
    assert tokenizer.decode(stray, skip_special_tokens=True) == template
    assert ct.classify(task, tokenizer, [ids, ids[:-1], stray, ids + [ids[0]]]) == [3, -1, -1, -1]
    prompt, response = ct.encode(tokenizer, "abc=", template)
    assert prompt[0] == tokenizer.bos_token_id and len(prompt) == 5 and response == ids


def test_partial_collector_keeps_covered_templates_and_labels_by_gold():
    task = ct.make_task(3)
    covered, uncovered = sorted(task.covered), task.uncovered
    prompts = [f"p{i}=" for i in range(40)]
    g = torch.Generator().manual_seed(0)
    samples = [[int(v) for v in torch.randint(-1, 27, (8,), generator=g)] for _ in prompts]
    rows, counts = ct.pairs_from_samples(task, prompts, samples, "partial")
    assert counts["kept"] == sum(i in task.covered for s in samples for i in s)
    assert rows and counts["pairs"] == len(rows) and counts["templates_in_pairs"] <= 6
    for r in rows:
        c, j = task.template_index(r["chosen"]), task.template_index(r["rejected"])
        assert c in task.covered and j in task.covered and c != j
        assert task.rewards["worse"][c] > task.rewards["worse"][j]
    same, _ = ct.pairs_from_samples(task, prompts, samples, "partial", "better")
    assert same == rows  # partial pairs compare covered templates only: one training set serves both scenarios
    assert covered and uncovered


@pytest.mark.parametrize("scenario", ct.SCENARIOS)
def test_global_control_covers_everything_and_labels_by_the_scenario(scenario):
    task = ct.make_task(4)
    prompts = [f"p{i}=" for i in range(200)]
    covered = sorted(task.covered)
    samples = [[covered[(i + j) % 6] for j in range(8)] for i in range(len(prompts))]
    rows, counts = ct.pairs_from_samples(task, prompts, samples, "global", scenario)
    assert counts["templates_in_pairs"] == 27
    assert 0.4 < counts["replaced"] / counts["kept"] < 0.6
    mixed = [r for r in rows if (task.template_index(r["chosen"]) in task.covered)
             != (task.template_index(r["rejected"]) in task.covered)]
    assert mixed
    for r in mixed:  # a covered-vs-uncovered pair: the scenario decides which one is preferred
        chosen_covered = task.template_index(r["chosen"]) in task.covered
        assert chosen_covered == (scenario == "worse")
    with pytest.raises(ValueError, match="condition"):
        ct.pairs_from_samples(task, prompts, samples, "everything")


def test_clustered_standard_error():
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 10.0, 12.0])
    clusters = torch.tensor([0, 0, 1, 1, 2, 2])
    mean, se = ct.clustered(values, clusters)
    means = torch.tensor([2.0, 2.0, 11.0])
    assert mean == pytest.approx(30 / 6)
    assert se == pytest.approx(float(means.std(unbiased=True)) / math.sqrt(3))
    # correlated samples within prompts: the clustered SE is larger than the naive one
    naive = float(values.std(unbiased=True)) / math.sqrt(6)
    assert se > naive


@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory):
    """A whole seed at test size: a short SFT, two training steps, DPO and HyPO, a small evaluation."""
    spec = ct.TaskSpec(sft_steps=120, sft_sequences=1500, train_prompts=32, eval_prompts=64, eval_samples=8)
    root = tmp_path_factory.mktemp("coverage")
    torch.set_num_threads(1)
    rows = ct.run_seed(5, [ct.Cell(0.1), ct.Cell(0.1, 0.1)], root, spec, ct.TrainSpec(steps=2),
                       datasets=(("partial", "worse"), ("global", "better")), say=lambda *_: None)
    return rows, spec, root


@pytest.mark.slow
def test_run_seed_rows(tiny_seed):
    rows, spec, root = tiny_seed
    assert [(r["data"], r["policy"]) for r in rows] == [
        ("reference", "reference"), ("partial", "DPO β=0.1"), ("partial", "HyPO β=0.1 λ=0.1"),
        ("global-better", "DPO β=0.1"), ("global-better", "HyPO β=0.1 λ=0.1")]
    reference = rows[0]
    assert reference["kl"] == 0.0 and reference["samples"] == 64 * 8 >= 512
    for r in rows:
        masses = r["mass_covered"] + r["mass_uncovered"] + r["mass_off"]
        assert masses == pytest.approx(1.0)
        assert r["mass_not_covered"] == pytest.approx(r["mass_uncovered"] + r["mass_off"])
    trained = rows[1:]
    assert all(r["pairs_pairs"] > 0 and r["train_dpo_loss"] is not None for r in trained)
    assert rows[3]["pairs_templates_in_pairs"] == 27 and rows[1]["pairs_templates_in_pairs"] <= 6
    assert rows[2]["train_online_kl"] is not None and rows[1]["train_online_kl"] is None  # HyPO samples, DPO never
    assert not list(root.glob("seed5/*/checkpoint-*"))  # weights dropped after evaluation


def test_sampled_masses_agree_with_exact_template_probabilities(tiny_seed):
    """The sampled class shares are unbiased estimates of the teacher-forced template masses."""
    rows, _, _ = tiny_seed
    for r in rows:
        for name in ("covered", "uncovered", "off"):
            sampled, se, exact = r[f"mass_{name}"], r[f"mass_{name}_se"], r[f"exact_mass_{name}"]
            assert abs(sampled - exact) < 4 * max(se, 0.01), (r["policy"], name, sampled, exact)
        for scenario in ct.SCENARIOS:
            sampled, se = r[f"reward_{scenario}"], r[f"reward_{scenario}_se"]
            assert abs(sampled - r[f"exact_reward_{scenario}"]) < 4 * max(se, 0.01)


def test_reference_learns_its_template_distribution(tiny_seed):
    rows, _, _ = tiny_seed
    reference = rows[0]
    probs = reference["exact_template_probs"]
    task = ct.make_task(5)
    tv = 0.5 * sum(abs(p - q) for p, q in zip(probs, task.sft_probs)) + 0.5 * reference["exact_mass_off"]
    assert tv < 0.35  # 120 SFT steps at test size; the experiment's 300 reach ≈ 0.05
    assert reference["exact_mass_covered"] > 0.6


def _rows(values: dict[str, list[float]], key="mass_not_covered", data="partial") -> list[dict]:
    rows = []
    for policy, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            rows.append({"seed": seed, "policy": policy, "data": "reference" if policy == "reference" else data,
                         "reward_worse": v, "reward_better": -v, "kl": v, "mass_not_covered": v,
                         "mass_uncovered": v, "mass_off": 0.0})
    return rows


def test_analysis_manipulation_check_and_paired_differences():
    cells = [ct.Cell(0.1), ct.Cell(0.1, 0.1)]
    reference = [0.10, 0.12, 0.11]
    moved = {"reference": reference, "DPO β=0.1": [0.30, 0.35, 0.28], "HyPO β=0.1 λ=0.1": [0.15, 0.10, 0.12]}
    analysis = experiment.analyse(_rows(moved), cells)
    check = analysis["check"]["DPO β=0.1"]
    mean, se, low, high = check["diff"]
    diffs = [0.20, 0.23, 0.17]
    assert mean == pytest.approx(sum(diffs) / 3) and check["pass"]
    assert se == pytest.approx(float(torch.tensor(diffs).std()) / math.sqrt(3))
    assert low == pytest.approx(mean - 4.303 * se)  # t(0.975, 2 df)
    vs = analysis["settings"][("partial", "worse")]["HyPO β=0.1 λ=0.1"]["reward_worse"]["vs_dpo"]
    assert vs[0] == pytest.approx(sum([0.15 - 0.30, 0.10 - 0.35, 0.12 - 0.28]) / 3)  # paired per seed
    h1 = next(h for h in analysis["hypotheses"] if h["hypothesis"] == "H1")
    assert h1["verdict"] == "DPO higher" and h1["check_passed"]
    h2 = next(h for h in analysis["hypotheses"] if h["hypothesis"] == "H2")
    assert h2["verdict"] == "HyPO higher"  # reward_better = −v in these rows
    # the check's two parts, apart (issue 27): here all of it is valid uncovered templates, none malformed
    assert check["mass_uncovered"][0] == pytest.approx(mean) and check["mass_off"][:2] == (0.0, 0.0)
    text = experiment.report(analysis, [0, 1, 2])
    assert "of which valid uncovered templates  +0.200" in text and "of which malformed (off-template)   +0.000" in text

    still = {"reference": reference, "DPO β=0.1": [0.09, 0.13, 0.10], "HyPO β=0.1 λ=0.1": [0.1, 0.1, 0.1]}
    analysis = experiment.analyse(_rows(still), cells)
    assert not analysis["check"]["DPO β=0.1"]["pass"]
    text = experiment.report(analysis, [0, 1, 2])
    assert "FAIL: the task does not exercise partial coverage" in text
    assert "not a test of the claim" in text


def test_h3_is_the_change_of_the_paired_difference():
    cells = [ct.Cell(0.1), ct.Cell(0.1, 0.1)]
    partial = _rows({"reference": [0.1] * 3, "DPO β=0.1": [0.2, 0.2, 0.2], "HyPO β=0.1 λ=0.1": [0.5, 0.6, 0.7]})
    control = _rows({"DPO β=0.1": [0.6, 0.6, 0.6], "HyPO β=0.1 λ=0.1": [0.6, 0.65, 0.7]}, data="global-worse")
    analysis = experiment.analyse(partial + control, cells)
    h3 = next(h for h in analysis["hypotheses"] if h["hypothesis"] == "H3")
    # Δ_partial = 0.3, 0.4, 0.5; Δ_global = 0, 0.05, 0.1 → differences −0.3, −0.35, −0.4
    assert h3["delta"][0] == pytest.approx(-0.35) and h3["verdict"] == "advantage shrinks"


@pytest.mark.slow
def test_demo_runs_at_test_size(tmp_path, capsys):
    from hypo_fast import demo

    out = demo.main(["--out", str(tmp_path), "--steps", "2", "--sft-steps", "120", "--eval-prompts", "16"])
    printed = capsys.readouterr().out
    for text in ("partial coverage, uncovered templates worse", "global coverage (control), uncovered better",
                 "manipulation check", "uncovered mass", "reference", "DPO β=0.1", "HyPO β=0.1 λ=0.1"):
        assert text in printed
    assert Path(out["plot"]).stat().st_size > 10_000
    assert len(out["rows"]) == 1 + 3 * 2


def test_reanalyse_rewrites_the_report_from_stored_rows(tmp_path):
    """``coverage.py --reanalyse``: the latest full run's rows give the report, with the check's split."""
    import json

    moved = {"reference": [0.10, 0.12, 0.11], "DPO β=0.1": [0.30, 0.35, 0.28], "HyPO β=0.1 λ=0.1": [0.15, 0.10, 0.12]}
    rows = [{**r, "kind": "policy", "date": "2026-01-02", "quick": False} for r in _rows(moved)]
    older = [{**r, "date": "2026-01-01", "mass_uncovered": 0.9} for r in rows]
    quick = [{**r, "date": "2026-01-03", "quick": True} for r in rows]
    (tmp_path / "coverage.jsonl").write_text("".join(json.dumps(r) + "\n" for r in older + rows + quick))
    out = experiment.main(["--reanalyse", "--results-dir", str(tmp_path)])
    assert out["report"] == experiment.report(experiment.analyse(rows, [ct.Cell(0.1), ct.Cell(0.1, 0.1)]), [0, 1, 2])
    assert "of which valid uncovered templates  +0.200" in out["report"]
    assert (tmp_path / "coverage_report.txt").read_text() == out["report"] + "\n"


@pytest.mark.slow
def test_quick_mode_runs_end_to_end(tmp_path):
    """``coverage.py --quick`` on one of its two seeds (the same code path; ≈ 1 minute on 2 shared cores)."""
    out = experiment.main(["--quick", "--seeds", "0", "--results-dir", str(tmp_path / "res"),
                           "--work", str(tmp_path / "work")])
    policies = [(r["data"], r["policy"]) for r in out["rows"]]
    assert policies[0] == ("reference", "reference") and len(policies) == 1 + 3 * 2
    assert set(out["analysis"]["check"]) == {"DPO β=0.1"}
    assert "mass_uncovered" in out["analysis"]["check"]["DPO β=0.1"]
    assert (tmp_path / "res" / "coverage_report_quick.txt").exists() and Path(out["plot"]).exists()
