"""Two gloo ranks on CPU under ZeRO-2 and ZeRO-3 train like one process on the same global batch."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.train.helpers import PYTHON, subprocess_env, toy_config

pytest.importorskip("deepspeed")


# DeepSpeed keeps parameters under 1e5 elements whole on every rank; the toy model's are all smaller
PARTITION_EVERYTHING = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    """Two ranks on this machine: DeepSpeed's own launcher, as the README documents it (it passes
    --local_rank first), or torchrun."""
    if kind == "deepspeed":
        return [str(Path(PYTHON).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port()),
                "--module", "hypo_fast.cli"]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
            "-m", "hypo_fast.cli"]


def _one_process_and_two_ranks(tmp_path, launcher: str, *, steps: int, zero_stage: int, kl_coef: float = 0.0,
                               lora: dict | None = None) -> tuple[dict, dict]:
    """The same global batch of 4 pairs per step, as one process (2 micro-batches of 2 pairs) and as two ranks
    (2 pairs each); returns each run's logged steps (``{step: row}``)."""
    runs = {"single": ([PYTHON, "-m", "hypo_fast.cli"], 2), "ranks": (_launcher(launcher), 1)}
    for name, (command, accumulation) in runs.items():
        zero = {"zero_stage": zero_stage, "config": PARTITION_EVERYTHING if zero_stage == 3 else None}
        cfg = toy_config(tmp_path, name, kl_coef=kl_coef, steps=steps, deepspeed=zero,
                         optim={"pairs_per_micro_batch": 2, "gradient_accumulation_steps": accumulation})
        if lora is not None:
            cfg["model"]["lora"] = lora
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = subprocess.run([*command, "train", str(path)], cwd=tmp_path, env=subprocess_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    single, ranks = _losses(tmp_path / "single"), _losses(tmp_path / "ranks")
    assert sorted(single) == sorted(ranks) == list(range(1, steps + 1))
    return single, ranks


def _assert_same(single: dict, ranks: dict, keys: tuple[str, ...]) -> None:
    for step in single:
        for key in keys:
            assert abs(single[step][key] - ranks[step][key]) <= 1e-5 * max(1.0, abs(single[step][key])), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_process(tmp_path, stage):
    shm_before = _shm_buffers()
    single, ranks = _one_process_and_two_ranks(tmp_path, "deepspeed", steps=3, zero_stage=stage)
    _assert_same(single, ranks, ("loss", "rewards/margins", "logps/chosen"))
    assert (tmp_path / "ranks" / "checkpoint-3" / "model.safetensors").exists()
    # DeepSpeed's CPU shared-memory all-reduce segments (67 MB of RAM each) do not outlive the runs
    assert _shm_buffers() <= shm_before


@pytest.mark.slow
def test_two_ranks_hypo_under_zero3_match_one_process(tmp_path):
    """Sampling (weights gathered once per generation), the online reference forward and the offline
    reference cache are all collective under ZeRO-3. A draw is seeded by its place in the global batch,
    so two ranks sample, score and step exactly as one process with two micro-batches does."""
    single, ranks = _one_process_and_two_ranks(tmp_path, "torchrun", steps=3, zero_stage=3, kl_coef=0.5)
    assert all(r["generation/tokens_per_s"] > 0 for r in ranks.values())
    assert abs(ranks[3]["loss/kl"]) > 1e-3  # the policy has left the reference: the online term is live
    _assert_same(single, ranks, ("loss", "loss/dpo", "loss/kl", "kl/online", "advantages/std", "rewards/margins"))


@pytest.mark.slow
def test_two_ranks_lora_with_modules_to_save_under_zero3_save_the_gathered_adapter(tmp_path):
    """LoRA with ``modules_to_save`` (TRL's ``lora_modules_to_save``) under ZeRO-3: the adapter file holds the
    full, trained copies of the saved modules (gathered from both ranks, not empty partitions), equal to those
    of one process on the same global batch, and the token metrics agree too."""
    from safetensors.torch import load_file

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"]}
    single, ranks = _one_process_and_two_ranks(tmp_path, "torchrun", steps=2, zero_stage=3, lora=lora)
    _assert_same(single, ranks, ("loss", "entropy", "mean_token_accuracy", "logits/chosen"))
    saved = {name: load_file(tmp_path / name / "checkpoint-2" / "adapter_model.safetensors")
             for name in ("single", "ranks")}
    embeds = [k for k in saved["ranks"] if "embed_tokens" in k]
    assert embeds and sorted(saved["ranks"]) == sorted(saved["single"])
    for key, tensor in saved["ranks"].items():
        assert tensor.numel() > 0, key  # a partition placeholder would be empty
        assert abs(tensor - saved["single"][key]).max() <= 1e-5, key
    model = yaml.safe_load((tmp_path / "ranks.yaml").read_text())["model"]["config"]
    assert saved["ranks"][embeds[0]].shape == (model["vocab_size"], model["hidden_size"])
