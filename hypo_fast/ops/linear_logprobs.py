"""``linear_logprobs``: its one dispatch module (Triton | native | chunked PyTorch), input checks, autograd."""

from __future__ import annotations

import torch

from hypo_fast.kernels import linear_logprobs as triton_op
from hypo_fast.ops import chunked, native
from hypo_fast.ops.backends import no_autocast, resolve_impl

BACKENDS = {  # impl → (forward, backward), all with the contracts of hypo_fast.kernels' launchers
    "triton": (triton_op.linear_logprobs_fwd, triton_op.linear_logprobs_bwd),
    "native": (native.linear_logprobs_fwd, native.linear_logprobs_bwd),
    "torch": (chunked.chunked_fwd, chunked.chunked_bwd),
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(hidden, weight, targets, bias, temperature, ignore_index, check_targets=True) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] < 1:
        raise ValueError(f"weight must have a hidden size D ≥ 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim must equal weight's D={weight.shape[1]}, got {tuple(hidden.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a [V={weight.shape[0]}] tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                             f"got ({bias.dtype}, {bias.device})")
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not check_targets:
        return
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= weight.shape[0])
    if bool(bad.any()):  # one host sync: a wrong target would otherwise read out of bounds
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets{list(first)} = {int(targets[first])} is outside [0, V={weight.shape[0]}) "
                         f"and is not ignore_index={ignore_index}")


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd over the fused forward/backward pair of the chosen backend, on 2-D inputs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy,
                return_logit_mean, return_top1, impl, fp32_weight_grad, allow_tf32):
        ctx.set_materialize_grads(False)
        fwd, _ = BACKENDS[impl]
        with no_autocast(hidden.device):
            logp, lse, entropy, logit_mean, is_top1 = fwd(
                hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index,
                return_entropy=return_entropy, return_logit_mean=return_logit_mean, return_top1=return_top1,
                allow_tf32=allow_tf32,
            )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.options = (temperature, ignore_index, impl, fp32_weight_grad, allow_tf32)
        ctx.mark_non_differentiable(*(t for t in (logit_mean, is_top1) if t is not None))
        return logp, entropy, logit_mean, is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_logit_mean, _grad_top1):
        if torch.is_grad_enabled():  # create_graph=True: its gradient would be differentiated again
            raise RuntimeError(
                "linear_logprobs has no double backward: its gradient cannot be differentiated again "
                "(autograd.grad(..., create_graph=True), e.g. a gradient penalty on ∂logp/∂hidden). Compute "
                "that term from explicit logits instead: torch.log_softmax(hidden @ weight.T, -1).")
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, impl, fp32_weight_grad, allow_tf32 = ctx.options
        needs = ctx.needs_input_grad[:3]
        if not any(needs) or (grad_logp is None and grad_entropy is None):
            return (None,) * 12
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        _, bwd = BACKENDS[impl]
        with no_autocast(hidden.device):
            d_hidden, d_weight, d_bias = bwd(
                hidden, weight, targets, bias, lse, grad_logp, entropy=entropy, grad_entropy=grad_entropy,
                temperature=temperature, ignore_index=ignore_index, needs_grad=needs,
                fp32_weight_grad=fp32_weight_grad, allow_tf32=allow_tf32,
            )
        return d_hidden, d_weight, d_bias, *(None,) * 9


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_logit_mean: bool = False,
    return_top1: bool = False,
    impl: str = "auto",
    fp32_weight_grad: bool = True,
    allow_tf32: bool = False,
    check_targets: bool = True,
):
    """Per-token log-probabilities of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Equals, without ever materialising the ``[..., V]`` logits::

        torch.log_softmax((hidden @ weight.T + bias).float() / temperature, -1)
             .gather(-1, targets[..., None]).squeeze(-1)   # 0 where targets == ignore_index

    These are the per-token terms of ``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` that the DPO and KL terms
    of HyPO (Song et al., 2024, Eq. 1 and Algorithm 1) sum over response tokens. Memory beyond inputs
    and gradients is ``O(N)`` (Triton) or ``O(N·chunk)`` (PyTorch chunked path).

    Args:
        hidden: ``[..., D]`` final hidden states (fp32, fp16 or bf16), already aligned with ``targets``
            (the caller shifts: row t predicts token t+1).
        weight: ``[V, D]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[...]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it (the distribution is then the tempered policy).
        ignore_index: rows with this target output 0, get no gradient and, where the tile allows,
            cost no vocabulary FLOPs.
        return_entropy: also return the entropy of ``softmax(z)`` per row (differentiable).
        return_logit_mean: also return the mean logit over the vocabulary per row (a metric, no grad).
        return_top1: also return whether the target is the row's most likely token (bool, no grad;
            a tie for the maximum counts as top-1): TRL's ``is_top1``, behind ``mean_token_accuracy``.
        impl: ``"auto"`` (Triton on CUDA; on CPU the native op when built, else chunked PyTorch),
            ``"triton"``, ``"native"`` or ``"torch"``.
        fp32_weight_grad: accumulate the weight gradient in fp32 (default); ``False`` accumulates it
            in the weight dtype where the GPU adds that dtype atomically (fp16 everywhere, bf16 from
            sm_90 on; bf16 on sm_8x and the CPU paths stay fp32), saving ``2·V·D`` bytes at some
            precision cost.
        allow_tf32: fp32 inputs may use TF32 tensor cores in the Triton kernels (default: exact fp32
            dots); no effect on half-precision inputs or the CPU backends.
        check_targets: verify the target range (one host sync); pass False in hot loops whose targets
            are already known valid.

    Returns:
        ``logp`` fp32 ``[...]``; with any of ``return_entropy``, ``return_logit_mean``, ``return_top1``, a
        tuple ``(logp, entropy, logit_mean, is_top1)`` in that order holding only the requested extras.

    Raises:
        ValueError: naming the argument that is malformed (shapes, dtypes, devices, target range).
    """
    check_inputs(hidden, weight, targets, bias, temperature, ignore_index, check_targets)
    impl = resolve_impl(impl, hidden.device)
    batch_shape = targets.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.shape[0] > 0 and hidden_2d.stride(-1) != 1:
        hidden_2d = hidden_2d.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    targets_1d = targets.reshape(-1)

    if targets_1d.numel() == 0:  # nothing to score: keep the graph so grads are zero, not missing
        zero = hidden_2d.sum(-1).float() * 0.0
        logp, entropy = zero, zero.clone() if return_entropy else None
        logit_mean = zero.detach().clone() if return_logit_mean else None
        is_top1 = torch.zeros(zero.shape, dtype=torch.bool, device=zero.device) if return_top1 else None
    else:
        logp, entropy, logit_mean, is_top1 = LinearLogprobsFunction.apply(
            hidden_2d, weight, bias, targets_1d, float(temperature), int(ignore_index),
            return_entropy, return_logit_mean, return_top1, impl, fp32_weight_grad, allow_tf32,
        )
    outputs = [logp.view(batch_shape)]
    for wanted, extra in ((return_entropy, entropy), (return_logit_mean, logit_mean), (return_top1, is_top1)):
        if wanted:
            outputs.append(extra.view(batch_shape))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
