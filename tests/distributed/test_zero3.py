"""A real 2-rank DeepSpeed ZeRO-3 run on CPU (gloo): the fused head gathers the partitioned LM-head
weight through its own module hooks, the sampler gathers once per generation, and the head's gradient is
reduce-scattered into the right update."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from hypo_fast.examples.toy import tiny_llama  # noqa: E402
from hypo_fast.models import Policy, pack_sequences  # noqa: E402
from hypo_fast.sampling import Sampler, SamplingConfig  # noqa: E402

WORKER = Path(__file__).with_name("zero3_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    policy = Policy(tiny_llama(seed=0))  # the same model, one process, no DeepSpeed
    batch = pack_sequences([([1, 2, 3], [4, 5, 6]), ([9, 8], [7, 6, 5, 4])])
    logps = policy.token_logprobs(batch)
    (-logps.sum()).backward()
    expected_head = policy.head.weight.detach() - 0.1 * policy.head.weight.grad
    greedy = Sampler(policy, SamplingConfig(max_new_tokens=6, num_samples=1, greedy=True))
    expected_tokens = greedy.generate([[1, 2, 3], [9, 8]]).tokens
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["partitioned"], "the LM-head weight was not partitioned: not a ZeRO-3 run"
        torch.testing.assert_close(result["logps"], logps.detach(), atol=1e-5, rtol=1e-5)
        assert torch.equal(result["tokens"], expected_tokens)
        torch.testing.assert_close(result["head_after"], expected_head, atol=1e-5, rtol=1e-5)
