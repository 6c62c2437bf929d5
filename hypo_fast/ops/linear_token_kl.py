"""``linear_token_kl``: its one dispatch module (Triton | chunked PyTorch), input checks, autograd.

Not from the paper: the exact per-position KL between the policy's and the reference's next-token
distributions, which the ``exact_token`` estimator of HyPO's online term needs (see
:func:`hypo_fast.losses.exact_token_kl_loss`).
"""

from __future__ import annotations

import torch

from hypo_fast.kernels import linear_token_kl as triton_op
from hypo_fast.ops import chunked
from hypo_fast.ops.backends import no_autocast, resolve_impl
from hypo_fast.ops.linear_logprobs import check_inputs as check_head

BACKENDS = {  # impl → (forward, backward), with the contracts of hypo_fast.kernels.linear_token_kl
    "triton": (triton_op.linear_token_kl_fwd, triton_op.linear_token_kl_bwd),
    "torch": (chunked.chunked_token_kl_fwd, chunked.chunked_token_kl_bwd),
}


def check_inputs(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, temperature, ignore_index,
                 check_targets) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor or None, got {type(targets).__name__}")
    rows = hidden.shape[:-1] if hidden.dim() else ()
    probe = targets if targets is not None else torch.zeros(rows, dtype=torch.long, device=hidden.device)
    check_head(hidden, weight, probe, bias, temperature, ignore_index, check_targets and targets is not None)
    if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must be [V={weight.shape[0]}, D_ref], got shape {tuple(ref_weight.shape)}")
    if ref_weight.shape[1] < 1 or ref_hidden.dim() < 1 or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(f"ref_hidden's last dim must equal ref_weight's D_ref={ref_weight.shape[1]}, "
                         f"got {tuple(ref_hidden.shape)}")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden rows {tuple(ref_hidden.shape[:-1])} must equal hidden's "
                         f"{tuple(hidden.shape[:-1])} (the same positions under both models)")
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match hidden dtype {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if ref_bias is not None:
        if not isinstance(ref_bias, torch.Tensor) or ref_bias.shape != (weight.shape[0],):
            got = tuple(ref_bias.shape) if isinstance(ref_bias, torch.Tensor) else type(ref_bias).__name__
            raise ValueError(f"ref_bias must be a [V={weight.shape[0]}] tensor, got {got}")
        if ref_bias.dtype != hidden.dtype or ref_bias.device != hidden.device:
            raise ValueError(f"ref_bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                             f"got ({ref_bias.dtype}, {ref_bias.device})")


class LinearTokenKLFunction(torch.autograd.Function):
    """Autograd over the fused forward/backward pair of the chosen backend, on 2-D inputs; the reference
    side (``ref_hidden``, ``ref_weight``, ``ref_bias``) is a constant."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, temperature, ignore_index,
                return_logprobs, impl, fp32_weight_grad, allow_tf32):
        ctx.set_materialize_grads(False)
        fwd, _ = BACKENDS[impl]
        with no_autocast(hidden.device):
            kl, lse, mu, logp, ref_logp = fwd(
                hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, temperature=temperature,
                ignore_index=ignore_index, return_logprobs=return_logprobs, allow_tf32=allow_tf32)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, mu)
        ctx.options = (temperature, ignore_index, impl, fp32_weight_grad, allow_tf32)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, grad_kl, grad_logp, _grad_ref_logp):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_token_kl has no double backward: its gradient cannot be differentiated "
                               "again (autograd.grad(..., create_graph=True)); use linear_token_kl_reference "
                               "from hypo_fast.reference for that")
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, mu = ctx.saved_tensors
        temperature, ignore_index, impl, fp32_weight_grad, allow_tf32 = ctx.options
        needs = ctx.needs_input_grad[:3]
        if not any(needs) or (grad_kl is None and grad_logp is None):
            return (None,) * 13
        if grad_kl is None:
            grad_kl = torch.zeros_like(lse)
        _, bwd = BACKENDS[impl]
        with no_autocast(hidden.device):
            d_hidden, d_weight, d_bias = bwd(
                hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, lse, mu, grad_kl, grad_logp,
                temperature=temperature, ignore_index=ignore_index, needs_grad=needs,
                fp32_weight_grad=fp32_weight_grad, allow_tf32=allow_tf32)
        return (d_hidden, d_weight, d_bias) + (None,) * 10


def linear_token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_logprobs: bool = False,
    impl: str = "auto",
    fp32_weight_grad: bool = True,
    allow_tf32: bool = False,
    check_targets: bool = True,
):
    """Exact per-position ``KL(π_τ ‖ π_ref,τ)`` over the whole vocabulary, from both models' hidden states.

    Equals, without ever materialising either model's ``[..., V]`` logits::

        log_p = torch.log_softmax((hidden @ weight.T + bias).float() / temperature, -1)
        log_q = torch.log_softmax((ref_hidden @ ref_weight.T + ref_bias).float() / temperature, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)          # 0 where targets == ignore_index

    These are the per-position terms ``KL_t = Σ_v π(v|y_<t)·(log π(v|y_<t) − log π_ref(v|y_<t))`` whose sum
    over a sampled response has the sequence KL of HyPO's online term (Song et al., 2024, §5) as its
    expectation; not from the paper (see :func:`hypo_fast.losses.exact_token_kl_loss`). One streaming pass
    per row keeps the running max and sum-exp of both heads and ``Σ_v e^(z_v − m)·(z_v − r_v)``; the
    backward recomputes both logits tiles and uses ``∂KL/∂z_v = p_v·(z_v − r_v − Σ_u p_u (z_u − r_u))``.
    Memory beyond inputs and gradients is ``O(N)`` (Triton) or ``O(N·chunk)`` (chunked PyTorch path).

    Args:
        hidden: ``[..., D]`` policy hidden states (fp32, fp16 or bf16), with grad.
        weight: ``[V, D]`` policy LM-head weight, same dtype and device, with grad.
        ref_hidden: ``[..., D_ref]`` the reference's hidden states at the same positions (no grad).
        ref_weight: ``[V, D_ref]`` the reference LM-head weight (no grad); same dtype as ``hidden``.
        targets: optional ``[...]`` token ids: rows equal to ``ignore_index`` get 0, no gradient and, where
            the tile allows, no vocabulary FLOPs; ``None`` scores every row. With ``return_logprobs`` the
            ids must lie in ``[0, V)`` (or be ``ignore_index``).
        bias, ref_bias: optional ``[V]`` LM-head biases.
        temperature: both heads' logits are divided by it (the KL of the tempered distributions).
        return_logprobs: also return ``log π_τ(target)`` (differentiable) and ``log π_ref,τ(target)`` (no
            grad) from the same pass; needs ``targets``.
        impl: ``"auto"`` (Triton on CUDA, the chunked PyTorch path on CPU: this op has no native CPU op),
            ``"triton"`` or ``"torch"``.
        fp32_weight_grad, allow_tf32, check_targets: as in :func:`hypo_fast.linear_logprobs`.

    Returns:
        ``kl`` fp32 ``[...]``; with ``return_logprobs``, ``(kl, logp, ref_logp)``.

    Raises:
        ValueError: naming the argument that is malformed (shapes, dtypes, devices, target range).
    """
    if return_logprobs and targets is None:
        raise ValueError("return_logprobs needs targets (the tokens whose log-probs to return)")
    check_inputs(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, temperature, ignore_index,
                 check_targets and return_logprobs)
    impl = resolve_impl(impl, hidden.device, has_native=False)
    batch_shape = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    ref_2d = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    if hidden_2d.shape[0] > 0 and hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    if ref_2d.shape[0] > 0 and ref_2d.stride(-1) != 1:
        ref_2d = ref_2d.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    ref_weight = ref_weight.detach() if ref_weight.stride(-1) == 1 else ref_weight.detach().contiguous()
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    ref_bias = None if ref_bias is None else ref_bias.detach().contiguous()
    if targets is None:  # every row counts: ids 0 against an ignore_index no id equals
        targets_1d, ignore_index = torch.zeros(hidden_2d.shape[0], dtype=torch.long, device=hidden.device), -1
    else:
        targets_1d = targets.reshape(-1)

    if targets_1d.numel() == 0:  # nothing to score: keep the graph so grads are zero, not missing
        kl = hidden_2d.sum(-1).float() * 0.0
        logp, ref_logp = (kl.clone(), kl.detach().clone()) if return_logprobs else (None, None)
    else:
        kl, logp, ref_logp = LinearTokenKLFunction.apply(
            hidden_2d, weight, bias, ref_2d, ref_weight, ref_bias, targets_1d, float(temperature), int(ignore_index),
            return_logprobs, impl, fp32_weight_grad, allow_tf32)
    if not return_logprobs:
        return kl.view(batch_shape)
    return kl.view(batch_shape), logp.view(batch_shape), ref_logp.view(batch_shape)
