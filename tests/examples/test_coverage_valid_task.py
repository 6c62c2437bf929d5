"""The coverage experiment's second task (hypo_fast/examples/coverage_valid_task.py) and its analysis
(benchmarks/coverage_valid.py): the task is the declared one, no response can be malformed, the exact
evaluation is what it says, early stopping reads only the held-out loss, the verdicts follow the declared
rules; and the quick mode runs end to end (slow)."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from hypo_fast.examples import coverage_task as first
from hypo_fast.examples import coverage_valid_task as vt

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import coverage_valid  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 4, 100])
def test_task_is_the_declared_one(seed):
    task = vt.make_task(seed)
    assert len(task.templates) == 256 == len(set(task.templates))
    assert all(len(t) == 4 and set(t) <= set("abcd") for t in task.templates)
    levels = [0, 1 / 3, 2 / 3, 1]
    assert all(sorted(v) == pytest.approx(levels) for v in task.values)
    best = [v.index(1.0) for v in task.values]
    for j, combo in enumerate(itertools.product(range(4), repeat=4)):
        n_best = sum(i == b for i, b in zip(combo, best))
        assert (j in task.covered) == (n_best <= 1)
        assert task.rewards["consistent"][j] == pytest.approx(sum(task.values[s][i] for s, i in enumerate(combo)) / 4)
    assert len(task.covered) == 189 and math.isclose(sum(task.sft_probs), 1.0)
    assert sum(task.sft_probs[i] for i in task.covered) == pytest.approx(0.95 ** 4 + 4 * 0.05 * 0.95 ** 3)
    consistent, adversarial = task.rewards["consistent"], task.rewards["adversarial"]
    best_covered = max(consistent[i] for i in task.covered)
    assert best_covered == pytest.approx(0.75) and max(consistent) == pytest.approx(1.0)
    assert all(i not in task.covered for i in range(256) if consistent[i] > best_covered + 1e-9)
    assert all(adversarial[i] == consistent[i] for i in task.covered)
    assert all(adversarial[i] == pytest.approx(consistent[i] - 1) for i in task.uncovered)
    assert max(adversarial[i] for i in task.uncovered) <= min(consistent[i] for i in task.covered) + 1e-9
    combos = list(itertools.product(range(4), repeat=4))
    for slot in range(4):  # every letter of every slot occurs in a covered response
        assert {combos[i][slot] for i in task.covered} == {0, 1, 2, 3}
    assert task.reward("consistent", "abce") == task.reward("adversarial", "abc") == vt.MALFORMED_REWARD


def test_collector_keeps_covered_responses_and_labels_by_the_additive_reward():
    task = vt.make_task(3)
    g = torch.Generator().manual_seed(0)
    samples = [[int(v) for v in torch.randint(-1, 256, (8,), generator=g)] for _ in range(60)]
    prompts = [f"p{i}=" for i in range(60)]
    rows, counts = vt.pairs_from_samples(task, prompts, samples)
    assert counts["kept"] == sum(i in task.covered for s in samples for i in s)
    assert rows and counts["pairs"] == len(rows)
    additive = task.rewards["consistent"]
    for r in rows:
        c, j = task.index(r["chosen"]), task.index(r["rejected"])
        assert c in task.covered and j in task.covered and additive[c] > additive[j]
        assert task.rewards["adversarial"][c] > task.rewards["adversarial"][j]  # same labels in both scenarios
    tie = [i for i in task.covered if additive[i] == additive[min(task.covered)] and i != min(task.covered)][0]
    rows, counts = vt.pairs_from_samples(task, ["p="], [[min(task.covered), tie, -1, task.uncovered[0]]])
    assert rows == [] and counts["tied"] == 1 and counts["kept"] == 2


def test_distribution_metrics_are_exact_expectations():
    task = vt.make_task(0)
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 256, generator=g, dtype=torch.float64)
    ref = ref / ref.sum(1, keepdim=True) * 0.999  # 0.001 malformed
    probs = torch.rand(2, 256, generator=g, dtype=torch.float64)
    probs = probs / probs.sum(1, keepdim=True) * 0.9  # 0.1 malformed
    out = vt.distribution_metrics(task, probs, ref)
    covered = torch.tensor([i in task.covered for i in range(256)])
    assert out["mass_covered"] + out["mass_uncovered"] + out["mass_malformed"] == pytest.approx(1.0)
    assert out["mass_uncovered"] == pytest.approx(float(probs[:, ~covered].sum(1).mean()))
    assert out["mass_malformed"] == pytest.approx(0.1)
    r = torch.tensor(task.rewards["adversarial"], dtype=torch.float64)
    assert out["reward_adversarial"] == pytest.approx(float((probs @ r).mean()) - 0.1)
    kl = (probs * (probs / ref).log()).sum(1) + 0.1 * math.log(0.1 / 0.001)
    assert out["kl"] == pytest.approx(float(kl.mean()))
    assert vt.distribution_metrics(task, ref, ref)["kl"] == pytest.approx(0.0, abs=1e-12)


def test_early_stopping_reads_the_held_out_loss_after_step_zero():
    trajectory = [{"step": 0, "heldout_loss": 0.1, "reward_consistent": 9.0},
                  {"step": 5, "heldout_loss": 0.5, "reward_consistent": 0.0},
                  {"step": 10, "heldout_loss": 0.4, "reward_consistent": -1.0},
                  {"step": 15, "heldout_loss": 0.4, "reward_consistent": 5.0}]
    assert vt.early_stopped(trajectory)["step"] == 10  # lowest loss, first on a tie; never the reward


@pytest.fixture(scope="module")
def masked_model(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = first.write_tokenizer(tmp_path_factory.mktemp("tok"))
    kwargs = dict(vt.MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    vt.mask_head(model, tokenizer, vt.ValidSpec())
    return model, tokenizer


def test_masked_head_writes_only_response_letters(masked_model):
    model, tokenizer = masked_model
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "abcd"]
    others = [t for t in range(model.config.vocab_size) if t not in letters]
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = model(input_ids=ids).logits.float().softmax(-1)
    assert float(probs[..., others].sum(-1).max()) < 1e-15
    assert float(probs[..., letters].sum(-1).min()) == pytest.approx(1.0)
    # and training cannot unmask them: the masked logits' gradient vanishes
    target = torch.tensor([letters[0]] * 12)
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0], target)
    loss.backward()
    assert float(model.lm_head.bias.grad[others].abs().max()) < 1e-15
    model.zero_grad(set_to_none=True)


# ---- analysis ----------------------------------------------------------------------------------------

def _row(seed, order, policy, method, beta, kl_coef, uncovered, consistent, adversarial, steps=80):
    return {"kind": "policy", "seed": seed, "order": order, "policy": policy, "method": method, "beta": beta,
            "kl_coef": kl_coef, "reward_consistent": consistent, "reward_adversarial": adversarial, "kl": uncovered,
            "mass_covered": 1 - uncovered, "mass_uncovered": uncovered, "mass_malformed": 0.0, "steps": steps}


def _rows(dpo_uncovered):
    rows = []
    for seed in range(3):
        rows.append(_row(seed, None, "reference", "reference", None, None, 0.02, 0.4, 0.38))
        for order in (0, 1):
            rows.append(_row(seed, order, "DPO β=0.1", "DPO", 0.1, 0.0, dpo_uncovered[seed] + 0.01 * order,
                             0.8 + 0.01 * seed, 0.2 - 0.02 * order))
            rows.append(_row(seed, order, "DPO β=0.1 early-stopped", "DPO-ES", 0.1, 0.0, 0.05, 0.6, 0.5 + 0.01 * seed,
                             steps=40))
            rows.append(_row(seed, order, "HyPO β=0.1 λ=0.1", "HyPO", 0.1, 0.1, 0.03, 0.5 + 0.01 * order,
                             0.45 + 0.01 * seed))
    return rows


def test_analysis_follows_the_declared_rules():
    analysis = coverage_valid.analyse(_rows([0.30, 0.35, 0.28]))
    table = analysis["table"]
    assert table["DPO β=0.1"]["mass_uncovered"]["per_seed"][0] == pytest.approx(0.305)  # mean of the two orders
    assert table["DPO β=0.1"]["reward_adversarial"]["order_spread"] == pytest.approx((0.02, 0.02))
    assert table["DPO β=0.1 early-stopped"]["steps"] == {0: 40, 1: 40, 2: 40}
    check = analysis["check"]["DPO β=0.1"]
    assert check["pass"] and check["mass_uncovered"][0] == pytest.approx((0.285 + 0.335 + 0.265) / 3)
    verdicts = {p["prediction"]: p["verdict"] for p in analysis["predictions"]}
    # HyPO − DPO: consistent ≈ −0.3 (P1 confirmed), adversarial ≈ +0.26 (P2 confirmed); against the
    # early-stopped DPO: consistent −0.095 (P3 confirmed), adversarial −0.05 exactly (P4 FAILED)
    assert verdicts == {"P1": "confirmed", "P2": "confirmed", "P3": "confirmed", "P4": "FAILED"}
    assert coverage_valid.p_verdict("P1", -0.1, 0.1) == "not contradicted"
    assert coverage_valid.p_verdict("P2", -0.1, 0.1) == "not confirmed"
    assert coverage_valid.p_verdict("P1", 0.1, 0.2) == "FAILED"
    text = coverage_valid.report(analysis, [0, 1, 2], (0, 1))
    assert "→ PASS" in text and "premise check (malformed mass below 0.01 for every policy): holds" in text

    noisy = coverage_valid.analyse(_rows([0.22, -0.08, 0.07]))  # raised on average, but the interval holds 0
    assert noisy["check"]["DPO β=0.1"]["mass_uncovered"][0] > 0 and not noisy["check"]["DPO β=0.1"]["pass"]
    failed = coverage_valid.analyse(_rows([0.01, 0.02, 0.015]))
    assert not failed["check"]["DPO β=0.1"]["pass"]
    text = coverage_valid.report(failed, [0, 1, 2], (0, 1))
    assert "FAIL: the task failed to exercise extrapolation" in text and "not a test of the theory" in text


@pytest.mark.slow
def test_quick_mode_runs_end_to_end(tmp_path):
    """``coverage.py --task valid --quick`` (≈ 2 minutes on 2 shared CPU cores)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("coverage_experiment", REPO / "benchmarks" / "coverage.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    out = experiment.main(["--task", "valid", "--quick", "--results-dir", str(tmp_path / "res"),
                           "--work", str(tmp_path / "work")])
    rows = out["rows"]
    assert [(r["seed"], r["policy"]) for r in rows] == [
        (s, p) for s in (0, 1) for p in ("reference", "DPO β=0.1", "DPO β=0.1 early-stopped", "HyPO β=0.1 λ=0.1")]
    for r in rows:
        assert r["mass_covered"] + r["mass_uncovered"] + r["mass_malformed"] == pytest.approx(1.0)
        assert r["mass_malformed"] < 1e-6 and r["sft_tv"] < 0.1
    assert all(len(r["trajectory"]) == 17 for r in rows if r["method"] == "DPO")  # steps 0, 5, …, 80
    for text in ("manipulation check", "premise check", "scenario consistent", "scenario adversarial", "P1", "P4"):
        assert text in out["report"]
    assert (tmp_path / "res" / "coverage_valid_report_quick.txt").exists()
    assert Path(out["plot"]).stat().st_size > 10_000
    again = experiment.main(["--task", "valid", "--quick", "--reanalyse", "--results-dir", str(tmp_path / "res")])
    assert again["report"] == out["report"]  # the stored rows give back the same report
