"""linear_token_kl against a float64 oracle, for every impl (Triton interpreted on CPU, compiled on CUDA;
the chunked PyTorch path): values, gradients with grad_output ≠ 1, ragged shapes, ignored rows, temperature,
half precision no worse than naive, bad input."""

from __future__ import annotations

import pytest
import torch

from hypo_fast.ops import chunked, linear_token_kl
from hypo_fast.ops.backends import resolve_impl
from hypo_fast.reference import linear_token_kl_reference
from tests.oracle import assert_no_worse_than_naive, run_with_grads

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"

# (N, V, D, D_ref): N = 1 and odd N; V = 1 and V not a multiple of any tile; D ≠ D_ref, not powers of two.
# Interpreted Triton is slow (two logits tiles per program), so its shapes stay small.
SHAPES = {
    "triton": [(1, 1, 16, 16), (1, 7, 5, 9), (5, 1, 33, 33), (37, 101, 24, 20), (45, 150, 20, 20)],
    "torch": [(1, 1, 16, 16), (1, 7, 5, 9), (5, 1, 33, 33), (333, 3001, 96, 80), (1024, 2050, 40, 40)],
}
DEVICE = {"triton": TRITON_DEVICE, "torch": "cpu"}
IMPLS = list(SHAPES)
IMPL_SHAPES = [(impl, shape) for impl, shapes in SHAPES.items() for shape in shapes]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Force many vocabulary chunks in the PyTorch path even at test sizes."""
    monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", 64 * 1024)
    monkeypatch.setattr(chunked, "MIN_CHUNK", 64)


def make_inputs(N, V, D, D_ref, dtype, device, *, bias=False, ignore_frac=0.3, logit_scale=3.0, drift=0.5,
                batch=None):
    """Policy and reference heads that differ by ``drift`` (relative), so the KL is neither 0 nor huge."""
    shape = (N,) if batch is None else batch
    f64 = dict(device=device, dtype=torch.float64)
    hidden = torch.randn(*shape, D, **f64)
    weight = torch.randn(V, D, **f64) * (logit_scale / D**0.5)
    ref_hidden = torch.randn(*shape, D_ref, **f64)
    ref_weight = torch.randn(V, D_ref, **f64) * (logit_scale / D_ref**0.5)
    if D == D_ref:  # a reference near the policy, as in training
        ref_hidden = hidden + drift * ref_hidden
        ref_weight = weight + drift * ref_weight
    b = torch.randn(V, **f64) if bias else None
    rb = torch.randn(V, **f64) if bias else None
    targets = torch.randint(0, V, shape, device=device)
    targets[torch.rand(shape, device=device) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), cast(ref_hidden), cast(ref_weight), cast(rb), targets


def compare_with_oracle(impl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, *, temperature=1.0,
                        logprobs=True, tolerance=None):
    """Values and grads (random grad_outputs for KL and logp) of ours vs naive-in-dtype vs float64 oracle."""
    dtype = hidden.dtype
    grads_out = [torch.randn(targets.shape, device=hidden.device, dtype=torch.float64) for _ in range(2)]
    if not logprobs:
        grads_out = grads_out[:1]

    def ours(h, w, b):
        out = linear_token_kl(h, w, ref_hidden, ref_weight, targets, bias=b, ref_bias=ref_bias,
                              temperature=temperature, return_logprobs=logprobs, impl=impl)
        return out if logprobs else (out,)

    def naive(h, w, b, ref=(ref_hidden, ref_weight, ref_bias)):
        kl, logp, ref_logp = linear_token_kl_reference(h, w, ref[0], ref[1], targets, b, ref[2], temperature)
        return (kl, logp, ref_logp) if logprobs else (kl,)

    def oracle(h, w, b):
        ref = [None if t is None else t.double() for t in (ref_hidden, ref_weight, ref_bias)]
        return naive(h, w, b, ref)

    tensors = (hidden, weight, bias)
    out, grads = run_with_grads(ours, tensors, grads_out)
    naive_out, naive_grads = run_with_grads(naive, tensors, grads_out)
    oracle_out, oracle_grads = run_with_grads(oracle, [None if t is None else t.double() for t in tensors], grads_out)
    assert all(o.dtype == torch.float32 for o in out), "outputs must be fp32"
    for name, a, n, o in zip(("kl", "logp", "ref_logp"), out, naive_out, oracle_out):
        assert_no_worse_than_naive(name, a, n, o, dtype, tolerance)
    for name, a, n, o in zip(("d_hidden", "d_weight", "d_bias"), grads, naive_grads, oracle_grads):
        if o is not None:
            assert a is not None and a.dtype == dtype, f"{name}: missing or wrong dtype"
            assert_no_worse_than_naive(name, a, n, o, dtype, tolerance)
    ignored = targets == -100
    assert all((o[ignored] == 0).all() for o in out) and (grads[0][ignored] == 0).all()
    positive = oracle_out[0] > 1e-6  # the heads differ: not a 0 = 0 comparison
    assert (out[0][positive] > 0).all() and (positive.any() or weight.shape[0] == 1 or ignored.all())


@pytest.mark.parametrize("impl,shape", IMPL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_oracle(impl, shape, bias, seed):
    compare_with_oracle(impl, *make_inputs(*shape, torch.float32, DEVICE[impl], bias=bias))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature(impl, temperature, seed):
    compare_with_oracle(impl, *make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], bias=True),
                        temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_naive(impl, dtype, seed):
    compare_with_oracle(impl, *make_inputs(*SHAPES[impl][4], dtype, DEVICE[impl], bias=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_gradient_alone(impl, seed):
    """Only the KL has an upstream gradient (what the exact_token estimator's analytic term needs)."""
    compare_with_oracle(impl, *make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl]), logprobs=False,
                        temperature=0.8)


@pytest.mark.parametrize("impl", IMPLS)
def test_very_large_logits_stay_finite(impl, seed):
    inputs = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], logit_scale=3e3)
    hidden, weight = inputs[:2]
    # the saved fp32 lse carries eps·|z| absolute error, which p = exp(z − lse) turns into relative error
    max_logit = (hidden.double() @ weight.double().T).abs().max().item()
    compare_with_oracle(impl, *inputs, tolerance=2 * torch.finfo(torch.float32).eps * max_logit)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_heads_give_exactly_zero(impl, seed):
    """Both heads folded by the same arithmetic: KL and its gradient are exactly 0, not rounding noise."""
    hidden, weight, bias, *_, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl], bias=True)
    (kl,), (d_hidden, d_weight, d_bias) = run_with_grads(
        lambda h, w, b: linear_token_kl(h, w, hidden, weight, targets, bias=b, ref_bias=bias, impl=impl),
        (hidden, weight, bias), [torch.randn(targets.shape, dtype=torch.float64, device=hidden.device)])
    for t in (kl, d_hidden, d_weight, d_bias):
        assert (t == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored(impl, seed):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets = make_inputs(
        *SHAPES[impl][3], torch.float32, DEVICE[impl], bias=True)
    targets.fill_(-100)
    outputs, grads = run_with_grads(
        lambda h, w, b: linear_token_kl(h, w, ref_hidden, ref_weight, targets, bias=b, ref_bias=ref_bias,
                                        return_logprobs=True, impl=impl),
        (hidden, weight, bias), [torch.randn(targets.shape, dtype=torch.float64, device=hidden.device)] * 2)
    for t in (*outputs, *grads):
        assert (t == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_without_targets_every_row_counts(impl, seed):
    hidden, weight, _, ref_hidden, ref_weight, _, targets = make_inputs(*SHAPES[impl][3], torch.float32, DEVICE[impl])
    kl = linear_token_kl(hidden, weight, ref_hidden, ref_weight, impl=impl, temperature=1.3)
    oracle, _, _ = linear_token_kl_reference(hidden.double(), weight.double(), ref_hidden.double(),
                                             ref_weight.double(), temperature=1.3)
    torch.testing.assert_close(kl.double(), oracle, atol=2e-5, rtol=2e-5)
    masked = linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, impl=impl, temperature=1.3)
    scored = targets != -100
    torch.testing.assert_close(masked[scored], kl[scored])
    assert (masked[~scored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_batch_dims_and_custom_ignore_index(impl, seed):
    hidden, weight, _, ref_hidden, ref_weight, _, targets = make_inputs(
        3, 67, 24, 24, torch.float32, DEVICE[impl], batch=(2, 3, 5))
    targets[targets == -100] = 7  # a valid id: nothing is ignored under the default
    targets[0, 1] = -1
    kl, logp, ref_logp = linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, ignore_index=-1,
                                         return_logprobs=True, impl=impl)
    assert kl.shape == logp.shape == ref_logp.shape == (2, 3, 5)
    flat = linear_token_kl(hidden.reshape(-1, 24), weight, ref_hidden.reshape(-1, 24), ref_weight,
                           targets.reshape(-1), ignore_index=-1, impl=impl)
    torch.testing.assert_close(kl.reshape(-1), flat)
    oracle = linear_token_kl_reference(hidden.double(), weight.double(), ref_hidden.double(), ref_weight.double(),
                                       targets, ignore_index=-1)
    for ours, expected in zip((kl, logp, ref_logp), oracle):
        torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    assert (kl[0, 1] == 0).all()


def test_impls_agree_and_auto_dispatch(seed):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets = make_inputs(
        37, 101, 48, 48, torch.float32, TRITON_DEVICE, bias=True)
    a = linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, bias=bias, ref_bias=ref_bias, impl="triton")
    b = linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, bias=bias, ref_bias=ref_bias, impl="torch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert resolve_impl("auto", torch.device("cpu"), has_native=False) == "torch"  # no native op for this one
    assert resolve_impl("auto", torch.device("cuda"), has_native=False) == "triton"


def test_no_rows(seed):
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(11, 16, requires_grad=True)
    kl, logp, ref_logp = linear_token_kl(hidden, weight, torch.randn(0, 8), torch.randn(11, 8),
                                         torch.zeros(0, dtype=torch.long), return_logprobs=True)
    assert kl.shape == logp.shape == ref_logp.shape == (0,)
    (kl.sum() + logp.sum()).backward()
    assert hidden.grad.shape == (0, 16)


def test_reference_side_gets_no_gradient(seed):
    hidden, weight, _, ref_hidden, ref_weight, _, targets = make_inputs(5, 30, 8, 8, torch.float32, "cpu")
    ref_weight.requires_grad_()
    kl = linear_token_kl(hidden.requires_grad_(), weight, ref_hidden, ref_weight, targets)
    kl.sum().backward()
    assert ref_weight.grad is None and hidden.grad is not None


# ---- bad input -------------------------------------------------------------------------------------

def _ok():
    return dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), ref_hidden=torch.randn(4, 6),
                ref_weight=torch.randn(10, 6), targets=torch.randint(0, 10, (4,)))


@pytest.mark.parametrize("change,match", [
    ({"hidden": torch.randn(4, 7)}, "hidden"),
    ({"weight": torch.randn(10, 8).half()}, "weight"),
    ({"ref_hidden": torch.randn(3, 6)}, "ref_hidden"),
    ({"ref_hidden": torch.randn(4, 5)}, "ref_hidden"),
    ({"ref_hidden": torch.randn(4, 6).half()}, "ref_hidden"),
    ({"ref_weight": torch.randn(9, 6)}, "ref_weight"),
    ({"ref_weight": torch.randn(10, 6).double()}, "ref_weight"),
    ({"ref_weight": torch.randn(10, 6, device="meta")}, "ref_weight"),
    ({"ref_weight": "W"}, "ref_weight"),
    ({"targets": torch.randint(0, 10, (3,))}, "targets"),
    ({"targets": torch.full((4,), 10), "return_logprobs": True}, "targets"),
    ({"targets": None, "return_logprobs": True}, "return_logprobs needs targets"),
    ({"bias": torch.zeros(9)}, "bias"),
    ({"ref_bias": torch.zeros(9)}, "ref_bias"),
    ({"ref_bias": torch.zeros(10).half()}, "ref_bias"),
    ({"temperature": -1.0}, "temperature"),
    ({"impl": "native"}, "no native CPU op"),
    ({"impl": "cuda"}, "impl"),
])
def test_bad_input_names_the_argument(change, match):
    kwargs = {**_ok(), **change}
    with pytest.raises(ValueError, match=match):
        linear_token_kl(**kwargs)
