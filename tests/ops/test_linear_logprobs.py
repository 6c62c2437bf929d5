"""linear_logprobs against a float64 oracle, for every impl (Triton interpreted on CPU, compiled on CUDA;
the native CPU op; the chunked PyTorch path)."""

from __future__ import annotations

import pytest
import torch

from hypo_fast import linear_logprobs
from hypo_fast.ops import chunked, native
from hypo_fast.ops.backends import resolve_impl
from hypo_fast.reference import linear_logprobs_reference
from tests.oracle import assert_no_worse_than_naive, impl_param, run_with_grads

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"

# (N, V, D): N = 1 and odd N; V = 1 and V not a multiple of any tile; D not a power of two.
# Interpreted Triton is slow, so its shapes stay small; the chunked path gets bigger ones.
SHAPES = {
    "triton": [(1, 1, 16), (1, 7, 5), (5, 1, 33), (37, 101, 48), (70, 257, 20)],
    "torch": [(1, 1, 16), (1, 7, 5), (5, 1, 33), (333, 3001, 96), (1024, 2050, 40)],
}
SHAPES["native"] = SHAPES["torch"]
DEVICE = {"triton": TRITON_DEVICE, "native": "cpu", "torch": "cpu"}
IMPLS = [impl_param(impl) for impl in SHAPES]
IMPL_SHAPES = [impl_param(impl, shape) for impl, shapes in SHAPES.items() for shape in shapes]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force many vocabulary chunks in the PyTorch path and the native op even at test sizes."""
    monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", 64 * 1024)
    monkeypatch.setattr(chunked, "MIN_CHUNK", 64)


def make_inputs(N, V, D, dtype, device, *, bias=False, ignore_frac=0.3, logit_scale=3.0, batch=None):
    shape = (N,) if batch is None else batch
    hidden = torch.randn(*shape, D, device=device, dtype=torch.float64)
    weight = torch.randn(V, D, device=device, dtype=torch.float64) * (logit_scale / D**0.5)
    b = torch.randn(V, device=device, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, shape, device=device)
    targets[torch.rand(shape, device=device) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets


def compare_with_oracle(impl, hidden, weight, bias, targets, *, temperature=1.0, entropy=True, tolerance=None):
    """Values and grads (random grad_outputs) of ours vs naive-in-dtype vs float64 oracle."""
    dtype = hidden.dtype
    grads_out = [torch.randn(targets.shape, device=hidden.device, dtype=torch.float64) for _ in range(2)]
    if not entropy:
        grads_out = grads_out[:1]

    def ours(h, w, b):
        return linear_logprobs(h, w, targets, bias=b, temperature=temperature, return_entropy=entropy,
                               impl=impl)

    def naive(h, w, b):
        logp, ent = linear_logprobs_reference(h, w, targets, b, temperature)
        return (logp, ent) if entropy else logp

    tensors = (hidden, weight, bias)
    out, grads = run_with_grads(ours, tensors, grads_out)
    naive_out, naive_grads = run_with_grads(naive, tensors, grads_out)
    oracle_out, oracle_grads = run_with_grads(naive, [None if t is None else t.double() for t in tensors],
                                              grads_out)
    assert all(o.dtype == torch.float32 for o in out), "outputs must be fp32"
    for name, a, n, o in zip(("logp", "entropy"), out, naive_out, oracle_out):
        assert_no_worse_than_naive(name, a, n, o, dtype, tolerance)
    for name, a, n, o in zip(("d_hidden", "d_weight", "d_bias"), grads, naive_grads, oracle_grads):
        if o is not None:
            assert a is not None and a.dtype == dtype, f"{name}: missing or wrong dtype"
            assert_no_worse_than_naive(name, a, n, o, dtype, tolerance)
    ignored = targets == -100
    assert (out[0][ignored] == 0).all() and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("impl,shape", IMPL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_oracle(impl, shape, bias, seed):
    compare_with_oracle(impl, *make_inputs(*shape, torch.float32, DEVICE[impl], bias=bias))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature(impl, temperature, seed):
    shape = SHAPES[impl][3]
    compare_with_oracle(impl, *make_inputs(*shape, torch.float32, DEVICE[impl], bias=True),
                        temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_naive(impl, dtype, seed):
    shape = SHAPES[impl][3]
    compare_with_oracle(impl, *make_inputs(*shape, dtype, DEVICE[impl], bias=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_very_large_logits_stay_finite(impl, seed):
    hidden, weight, bias, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], logit_scale=3e3)
    # the saved fp32 lse carries eps·|z| absolute error, which p = exp(z − lse) turns into relative error
    max_logit = (hidden.double() @ weight.double().T).abs().max().item()
    compare_with_oracle(impl, hidden, weight, bias, targets,
                        tolerance=2 * torch.finfo(torch.float32).eps * max_logit)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored(impl, seed):
    hidden, weight, bias, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], bias=True)
    targets.fill_(-100)
    (logp, ent), (d_hidden, d_weight, d_bias) = run_with_grads(
        lambda h, w, b: linear_logprobs(h, w, targets, bias=b, return_entropy=True, impl=impl),
        (hidden, weight, bias), [torch.randn(targets.shape, dtype=torch.float64, device=hidden.device)] * 2)
    for t in (logp, ent, d_hidden, d_weight, d_bias):
        assert (t == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_batch_dims_and_custom_ignore_index(impl, seed):
    hidden, weight, bias, targets = make_inputs(3, 67, 24, torch.float32, DEVICE[impl], batch=(2, 3, 5))
    targets[targets == -100] = 7  # a valid id: nothing is ignored under the default
    targets[0, 1] = -1
    logp = linear_logprobs(hidden, weight, targets, ignore_index=-1, impl=impl)
    assert logp.shape == (2, 3, 5)
    flat = linear_logprobs(hidden.reshape(-1, 24), weight, targets.reshape(-1), ignore_index=-1, impl=impl)
    torch.testing.assert_close(logp.reshape(-1), flat)
    oracle, _ = linear_logprobs_reference(hidden.double(), weight.double(), targets, ignore_index=-1)
    torch.testing.assert_close(logp.double(), oracle, atol=1e-5, rtol=1e-5)
    assert (logp[0, 1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_logit_mean_and_output_order(impl, seed):
    hidden, weight, bias, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], bias=True)
    logp, ent, mean = linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.8,
                                      return_entropy=True, return_logit_mean=True, impl=impl)
    logits = (hidden.double() @ weight.double().T + bias.double()) / 0.8
    valid = targets != -100
    torch.testing.assert_close(mean[valid].double(), logits.mean(-1)[valid], atol=1e-4, rtol=1e-4)
    assert (mean[~valid] == 0).all()
    logp_only, mean_only = linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.8,
                                           return_logit_mean=True, impl=impl)
    torch.testing.assert_close(logp_only, logp)
    torch.testing.assert_close(mean_only, mean)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top1_is_the_argmax(impl, temperature, seed):
    """``is_top1`` (TRL's, behind ``mean_token_accuracy``) over many vocabulary chunks / splits: half the
    targets are the float64 argmax; rows whose top two logits are within fp32 rounding are not judged."""
    hidden, weight, bias, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], bias=True)
    logits = (hidden.double() @ weight.double().T + bias.double()) / temperature  # [N, V]
    take_argmax = torch.rand(targets.shape, device=targets.device) < 0.5
    targets = torch.where(take_argmax & (targets != -100), logits.argmax(-1), targets)
    logp, ent, mean, top1 = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                            return_entropy=True, return_logit_mean=True, return_top1=True, impl=impl)
    top2 = logits.topk(min(2, logits.shape[-1]), -1).values
    decidable = (top2[:, 0] - top2[:, -1] > 1e-4) | (logits.shape[-1] == 1)
    expected = (logits.argmax(-1) == targets) & (targets != -100)
    assert top1.dtype == torch.bool and not top1.requires_grad
    assert (top1[decidable] == expected[decidable]).all()
    assert expected[decidable].any() and not expected[decidable].all()  # both outcomes are exercised
    logp_only, top1_only = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           return_top1=True, impl=impl)
    torch.testing.assert_close(logp_only, logp)
    assert torch.equal(top1_only, top1)


@pytest.mark.parametrize("impl", IMPLS)
def test_only_entropy_has_a_gradient(impl, seed):
    hidden, weight, _, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl])
    g = torch.randn(targets.shape, dtype=torch.float64, device=hidden.device)
    _, grads = run_with_grads(lambda h, w: linear_logprobs(h, w, targets, return_entropy=True, impl=impl)[1],
                              (hidden, weight), [g])
    _, oracle = run_with_grads(lambda h, w: linear_logprobs_reference(h, w, targets)[1],
                               (hidden.double(), weight.double()), [g])
    for a, o in zip(grads, oracle):
        torch.testing.assert_close(a.double(), o, atol=1e-4, rtol=1e-4)


def test_impls_agree_and_auto_dispatch(seed):
    hidden, weight, bias, targets = make_inputs(37, 101, 48, torch.float32, TRITON_DEVICE, bias=True)
    a = linear_logprobs(hidden, weight, targets, bias=bias, impl="triton")
    b = linear_logprobs(hidden, weight, targets, bias=bias, impl="torch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert resolve_impl("auto", torch.device("cpu")) == ("native" if native.available() else "torch")
    assert resolve_impl("auto", torch.device("cuda")) == "triton"


def test_no_rows(seed):
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    logp, ent, top1 = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True,
                                      return_top1=True)
    assert logp.shape == ent.shape == top1.shape == (0,) and top1.dtype == torch.bool
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (0, 16)


# ---- bad input -------------------------------------------------------------------------------------

def _ok():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("mutate,match", [
    (lambda h, w, t, kw: (h[:, :7], w, t, kw), "hidden"),
    (lambda h, w, t, kw: (h, w[None], t, kw), "weight"),
    (lambda h, w, t, kw: (h, w, t.clone().fill_(10), kw), "targets"),
    (lambda h, w, t, kw: (h, w, t.clone().fill_(-2), kw), "targets"),
    (lambda h, w, t, kw: (h, w, t[:3], kw), "targets"),
    (lambda h, w, t, kw: (h, w, t.float(), kw), "targets"),
    (lambda h, w, t, kw: (h.long(), w, t, kw), "hidden"),
    (lambda h, w, t, kw: (h.double(), w.double(), t, kw), "hidden"),
    (lambda h, w, t, kw: (h, w.half(), t, kw), "weight"),
    (lambda h, w, t, kw: (h, w.to("meta"), t, kw), "weight"),
    (lambda h, w, t, kw: (h, w, t, {"bias": torch.zeros(9)}), "bias"),
    (lambda h, w, t, kw: (h, w, t, {"bias": torch.zeros(10).half()}), "bias"),
    (lambda h, w, t, kw: (h, w, t, {"temperature": 0.0}), "temperature"),
    (lambda h, w, t, kw: (h, w, t, {"impl": "cuda"}), "impl"),
])
def test_bad_input_names_the_argument(mutate, match):
    hidden, weight, targets, kwargs = mutate(*_ok(), {})
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, targets, **kwargs)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton'"):
        linear_logprobs(*_ok(), impl="triton")
