"""The native CPU ops as a build product: built where a toolchain exists, one op each to torch.compile,
independent of the thread count, and optional (clear errors and a clean fallback without them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from hypo_fast import linear_logprobs
from hypo_fast.ops import native
from hypo_fast.ops.backends import resolve_impl
from hypo_fast.ops.sample_head import sample_tokens

needs_native = pytest.mark.skipif(not native.available(), reason="hypo_fast._C not built")


def test_built_wherever_the_toolchain_exists():
    """`pip install` must build hypo_fast._C on a machine with cmake and a C++ compiler (CI is one)."""
    toolchain = shutil.which("cmake") and shutil.which(os.environ.get("CXX", "c++"))
    if not toolchain or os.environ.get("HYPO_FAST_NATIVE") == "0":
        pytest.skip("no toolchain, or the build was switched off")
    assert native.available(), f"native ops unavailable although cmake and c++ exist: {native.status()}"
    assert torch.ops.hypo_fast.built_with() == torch.__version__.split("+")[0]


@needs_native
def test_torch_compile_sees_single_ops(seed):
    """fullgraph compile of forward + backward: the graph holds the native ops, the results match eager."""
    hidden = torch.randn(29, 24, requires_grad=True)
    weight = torch.randn(300, 24, requires_grad=True)
    targets = torch.randint(0, 300, (29,))
    targets[::4] = -100
    seen = []

    def recording_backend(graph_module, example_inputs):
        for module in graph_module.modules():  # autograd.Function's forward/backward are subgraphs
            if isinstance(module, torch.fx.GraphModule):
                seen.extend(str(node.target) for node in module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def step(h, w):
        logp, ent = linear_logprobs(h, w, targets, return_entropy=True, impl="native", check_targets=False)
        return (logp * torch.linspace(-1, 2, 29)).sum() + ent.sum()

    compiled = torch.compile(step, backend=recording_backend, fullgraph=True)
    loss = compiled(hidden, weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    eager = step(hidden, weight)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    for op in ("hypo_fast.linear_logprobs_fwd", "hypo_fast.linear_logprobs_bwd"):
        assert any(op in target for target in seen), seen
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@needs_native
def test_results_do_not_depend_on_the_thread_count(seed):
    hidden, weight = torch.randn(300, 40), torch.randn(5000, 40) * 0.3
    targets = torch.randint(0, 5000, (300,))
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            logp = linear_logprobs(hidden, weight, targets, impl="native")
            draw = sample_tokens(hidden, weight, seed=3, return_entropy=True, impl="native")
            outputs.append((logp, *draw))
    finally:
        torch.set_num_threads(threads)
    (logp1, tok1, lp1, ent1), (logp2, tok2, lp2, ent2) = outputs
    assert torch.equal(tok1, tok2)  # the draw is keyed by (seed, row, tile), never by thread
    for a, b in ((logp1, logp2), (lp1, lp2), (ent1, ent2)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_without_the_library_auto_falls_back_and_native_is_refused(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="impl='native'"):
        linear_logprobs(hidden, weight, targets, impl="native")
    with pytest.raises(ValueError, match="impl='native'"):
        sample_tokens(hidden, weight, impl="native")


def test_switched_off_by_environment():
    code = "from hypo_fast.ops import native; print(native.available())"
    env = {**os.environ, "HYPO_FAST_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_native
def test_direct_op_calls_check_shapes():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.hypo_fast.linear_logprobs_fwd(hidden, weight[:, :7], targets, None, 1.0, -100, False, False, False, 1024, 64)
    with pytest.raises(RuntimeError, match="targets"):
        torch.ops.hypo_fast.linear_logprobs_fwd(hidden, weight, targets[:3], None, 1.0, -100, False, False, False, 1024, 64)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.hypo_fast.sample_head(hidden, weight, torch.zeros(9), 1.0, 0, False, False, 2048)
