"""DPO and HyPO losses straight from hidden states and the LM-head weight, never building logits.

``FusedLinearDPOLoss`` is call-compatible with Liger-Kernel's ``LigerFusedLinearDPOLoss``; both modules
score every token through :func:`hypo_fast.linear_logprobs` (memory ``O(N + V·D)`` beyond inputs and
gradients) and hand sequence log-probs to the pure functions of :mod:`hypo_fast.losses`.

Under DeepSpeed ZeRO-3 the LM-head weight is partitioned: call these modules inside a module forward
whose parameters include the head (the ZeRO hooks gather it), or within
``deepspeed.zero.GatheredParameters([lm_head.weight], modifier_rank=None)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from hypo_fast.losses import sequence_logps
from hypo_fast.objective import DPOAux, HyPOObjective, OnlineLogps, OptionError, PreferenceAux, StepLogps
from hypo_fast.ops import linear_logprobs, linear_token_kl
from hypo_fast.segments import RowMetrics, Segments, score_segments

_DEFAULT = HyPOObjective  # keyword defaults below are read from the objective's fields: one default each


def _check_pairs(_input: torch.Tensor, target: torch.Tensor) -> int:
    if _input.dim() != 3:
        raise ValueError(f"_input must be [2B, T, D] (chosen rows, then rejected), got {tuple(_input.shape)}")
    if target.shape != _input.shape[:2]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal _input.shape[:2] {tuple(_input.shape[:2])}")
    if _input.shape[0] % 2:
        raise ValueError(f"_input batch must be even (B chosen rows then B rejected), got {_input.shape[0]}")
    return _input.shape[0] // 2


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


class ScoredPairs(NamedTuple):
    chosen: torch.Tensor  # [B] policy sequence log-probs (with grad): sums, or means with average_log_prob
    rejected: torch.Tensor  # [B]
    ref_chosen: torch.Tensor  # [B]
    ref_rejected: torch.Tensor  # [B]
    chosen_logits_mean: torch.Tensor  # scalar
    rejected_logits_mean: torch.Tensor  # scalar
    chosen_nll: torch.Tensor  # scalar mean NLL of chosen tokens (with grad)
    online_logps: torch.Tensor | None  # [M, T'] policy token log-probs of online samples at τ (with grad)
    chosen_tokens: torch.Tensor  # [B] scored tokens per sequence (1 each with average_log_prob: already means)
    rejected_tokens: torch.Tensor  # [B]
    online_kls: torch.Tensor | None = None  # [M, T'] exact KL_t of the online samples at τ (exact_token), with grad
    entropy: torch.Tensor | None = None  # scalar: mean entropy over the scored chosen and rejected tokens
    mean_token_accuracy: torch.Tensor | None = None  # scalar: scored chosen tokens that are the top-1

    def step_logps(self, online: OnlineLogps | None = None) -> StepLogps:
        return StepLogps(self.chosen, self.rejected, self.ref_chosen, self.ref_rejected, online,
                         self.chosen_logits_mean, self.rejected_logits_mean, self.chosen_tokens, self.rejected_tokens,
                         self.entropy, self.mean_token_accuracy)


class OnlineInputs(NamedTuple):
    """The online samples' tensors of a :class:`FusedLinearHyPOLoss` call (k per prompt, consecutive)."""

    input: torch.Tensor  # [M, T', D] policy hidden states
    target: torch.Tensor  # [M, T'] sampled tokens, ignore_index elsewhere
    ref_input: torch.Tensor | None  # [M, T', D] reference hidden states (a live reference, or exact_token)
    ref_logps: torch.Tensor | None  # [M, T'] precomputed log π_ref,τ


class PairScorer:
    """Scores offline pairs (τ = 1) and optional online samples (at the sampling temperature τ) from padded
    ``[rows, T, D]`` hidden states: one :func:`score_segments` call for the policy, at most one no-grad call
    for the reference. Shared by both modules."""

    def __init__(self, ignore_index: int, average_log_prob: bool, use_ref_model: bool, impl: str,
                 temperature: float = 1.0):
        self.ignore_index, self.average_log_prob = ignore_index, average_log_prob
        self.use_ref_model, self.impl, self.temperature = use_ref_model, impl, temperature

    def _segments(self, pairs: tuple | None, online: tuple | None) -> Segments:
        """``(hidden [R, T, D], target [R, T])`` blocks → flat rows, the pairs' first (either may be None)."""
        blocks = [b for b in (pairs, online) if b is not None]
        D = blocks[0][0].shape[-1]
        rows = [h.reshape(-1, D) for h, _ in blocks]
        targets = [t.reshape(-1) for _, t in blocks]
        if len(blocks) == 1:
            return Segments(rows[0], targets[0], 0 if pairs is None else targets[0].numel(), self.temperature)
        return Segments(tuple(rows), torch.cat(targets), targets[0].numel(), self.temperature)  # rows joined if one call

    def _score(self, weight, bias):
        def score(rows, targets, tau, metrics):
            out = linear_logprobs(rows, weight, targets, bias=bias, ignore_index=self.ignore_index,
                                  return_entropy=metrics, return_logit_mean=metrics, return_top1=metrics,
                                  temperature=tau, impl=self.impl)
            return RowMetrics.of_linear_logprobs(*out) if metrics else out
        return score

    def _token_kl(self, weight, bias, ref_weight, ref_bias, ref_online_input):
        """The samples through the fused KL op: exact KL_t, log π_τ and log π_ref,τ from one pass."""
        ref_rows = ref_online_input.detach().reshape(-1, ref_online_input.shape[-1])  # [M·T', D_ref]
        ref_bias = None if ref_bias is None else ref_bias.detach()
        return lambda rows, targets, tau: linear_token_kl(
            rows, weight, ref_rows, ref_weight.detach(), targets, bias=bias, ref_bias=ref_bias, temperature=tau,
            ignore_index=self.ignore_index, return_logprobs=True, impl="auto" if self.impl == "native" else self.impl)

    def score(self, lin_weight, _input, target, *, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
              ref_chosen=None, ref_rejected=None, online: OnlineInputs | None = None, exact: bool = False):
        """Policy and reference log-probs of the pairs and the samples. ``exact``: score the samples with the
        fused exact-KL op (needs ``online.ref_input``).

        Returns ``(ScoredPairs, online_ref_logps [M, T'] | None)``.
        """
        n_pairs = _check_pairs(_input, target)
        mask = target != self.ignore_index
        ref_weight = lin_weight if ref_weight is None else ref_weight
        token_kl = self._token_kl(lin_weight, bias, ref_weight, ref_bias, online.ref_input) if online and exact else None
        segments = self._segments((_input, target), None if online is None else (online.input, online.target))
        scored = score_segments(self._score(lin_weight, bias), segments, metrics=True, token_kl=token_kl)
        pair_logps, sample_logps = segments.split(scored.logps)
        token_logps = pair_logps.view(target.shape)  # [2B, T]
        online_logps = None if online is None else sample_logps.view(online.target.shape)  # [M, T']
        logit_means, entropy, is_top1 = (segments.split(v)[0].view(target.shape)  # [2B, T] each
                                         for v in scored.metrics)
        seq = sequence_logps(token_logps, mask, average=self.average_log_prob)

        # reference: precomputed, or live (no grad), or zero
        live_pairs = None
        if ref_chosen is None and ref_rejected is None and self.use_ref_model:
            if ref_input is None or ref_input.shape[:2] != target.shape:
                raise ValueError("use_ref_model=True needs ref_input shaped like _input "
                                 "(or ref_chosen_logps and ref_rejected_logps)")
            if ref_input.shape[-1] != ref_weight.shape[-1]:
                raise ValueError(f"ref_input's hidden size {ref_input.shape[-1]} must equal ref_weight's "
                                 f"D={ref_weight.shape[-1]}")
            live_pairs = (ref_input.detach(), target)
        online_ref = None if online is None else online.ref_logps
        if online_ref is None and scored.online_ref_logps is not None:
            online_ref = scored.online_ref_logps.view(online.target.shape)
        live_online = (online.ref_input.detach(), online.target) if online is not None and online_ref is None else None
        ref_pair_logps = None
        if live_pairs or live_online:
            with torch.no_grad():
                ref_segments = self._segments(live_pairs, live_online)
                ref_bias = None if ref_bias is None else ref_bias.detach()
                ref_logps = score_segments(self._score(ref_weight.detach(), ref_bias), ref_segments).logps
                ref_pairs, ref_samples = ref_segments.split(ref_logps)
                ref_pair_logps = ref_pairs.view(target.shape) if live_pairs else None
                if live_online:
                    online_ref = ref_samples.view(online.target.shape)
        ref_chosen, ref_rejected = self._pair_reference(n_pairs, seq, mask, ref_pair_logps, ref_chosen, ref_rejected)

        counts = torch.ones_like(seq) if self.average_log_prob else mask.sum(-1).to(seq.dtype)
        online_kls = None if scored.online_kls is None else scored.online_kls.view(online.target.shape)
        scored_pairs = ScoredPairs(
            seq[:n_pairs], seq[n_pairs:], ref_chosen, ref_rejected,
            _masked_mean(logit_means[:n_pairs], mask[:n_pairs]), _masked_mean(logit_means[n_pairs:], mask[n_pairs:]),
            -_masked_mean(token_logps[:n_pairs], mask[:n_pairs]), online_logps, counts[:n_pairs], counts[n_pairs:],
            online_kls, _masked_mean(entropy, mask), _masked_mean(is_top1[:n_pairs].float(), mask[:n_pairs]))
        return scored_pairs, online_ref

    def _pair_reference(self, n_pairs, seq, mask, ref_token_logps, ref_chosen, ref_rejected):
        if (ref_chosen is None) != (ref_rejected is None):
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
        if ref_chosen is not None:
            for name, t in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
                if t.shape != (n_pairs,):
                    raise ValueError(f"{name} must be [B={n_pairs}], got {tuple(t.shape)}")
            return ref_chosen.detach().to(seq.dtype), ref_rejected.detach().to(seq.dtype)
        if not self.use_ref_model:
            return torch.zeros_like(seq[:n_pairs]), torch.zeros_like(seq[n_pairs:])
        ref_seq = sequence_logps(ref_token_logps, mask, average=self.average_log_prob)
        return ref_seq[:n_pairs], ref_seq[n_pairs:]


def liger_logits_means(_input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger's ``chosen_logits_mean``/``rejected_logits_mean``: the logits summed over every position of the
    rows (prompt and padding included) and the vocabulary, divided by ``B·T·V``. Logits are linear in the
    hidden states, so this is ``mean_rows,positions(h) · mean_v(W) + mean_v(b)``: no ``[N, V]`` logits."""
    w_mean = weight.detach().float().mean(0)  # [D]
    per_row = _input.detach().float().mean(1) @ w_mean  # [2B]
    if bias is not None:
        per_row = per_row + bias.detach().float().mean()
    return per_row[:n_pairs].mean(), per_row[n_pairs:].mean()


def _liger_wording(err: OptionError, loss_type) -> str:
    """The phrase Liger 0.8.5 raises for the same bad option (its tests match on it)."""
    if err.option == "loss_type":
        return f"Unsupported loss_type: {loss_type!r}"
    if err.option == "label_smoothing":
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        if "exo_pair" in names and "> 0" in err.detail:
            return "label_smoothing must be > 0 for loss_type='exo_pair'"
        return f"label_smoothing must lie in [0.0, 0.5) for loss_type={names[0] if len(names) == 1 else names!r}"
    return err.option


class LigerDPOAux(DPOAux):
    """:class:`DPOAux` with Liger's own logits means in elements 2 and 3 (what Liger's tuple holds), while
    :meth:`metrics` reports TRL's ``logits/*`` (the mean over the vocabulary and the *scored* tokens), and
    TRL's ``entropy`` and ``mean_token_accuracy``, from the objective's aux kept beside the tuple."""

    def metrics(self, prefix: str = "") -> dict[str, float]:
        trl = self.__dict__.get("trl_aux")  # PreferenceAux
        if trl is None:
            return DPOAux.metrics(self, prefix)
        return PreferenceAux(*self[:2], *trl[2:4], *self[4:], entropy=trl.entropy,
                             mean_token_accuracy=trl.mean_token_accuracy).metrics(prefix)


class FusedLinearDPOLoss(torch.nn.Module):
    """DPO from hidden states: a drop-in for Liger's ``LigerFusedLinearDPOLoss`` without ``[N, V]`` logits.

    Swapping from Liger 0.8.5 is one import line: the constructor takes Liger's arguments in Liger's
    positional order, then hypo_fast's extras keyword-only; ``forward`` takes Liger's call
    ``(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``, plus the
    keywords ``ref_chosen_logps``/``ref_rejected_logps`` (``[B]`` precomputed reference log-probs, which
    Liger's path cannot take), and returns ``(loss, DPOAux)``: Liger's seven aux elements in its order.

    ``_input`` is ``[2B, T, D]``: B chosen rows, then their B rejected rows; ``target`` ``[2B, T]`` is
    already aligned with ``_input`` (row t predicts token t+1 of the text) and ``ignore_index`` marks
    non-response tokens. The reference comes from the precomputed log-probs, else from ``ref_input`` with
    ``ref_weight`` (default: the policy head) when ``use_ref_model``, else it is 0 (reference-free).
    Loss = ``Σ_k w_k · mean_pairs ℓ_k`` (+ ``alpha`` · mean NLL of the chosen tokens with
    ``compute_nll_loss``).

    Args (Liger's, in its order):
        ignore_index: target value of unscored positions.
        beta: β.
        alpha: weight of the chosen NLL when ``compute_nll_loss``.
        compute_nll_loss: add ``alpha`` · NLL (RPO; the same as adding ``"sft"`` with weight ``alpha``).
        compiled: accepted for Liger compatibility (a bool). Liger compiles its per-chunk step with
            ``torch.compile``; hypo_fast's log-prob kernel is already fused, so the value changes nothing.
        use_ref_model: score the reference from ``ref_input``; ``False`` is reference-free (log π_ref = 0).
        average_log_prob: Liger's meaning: every sequence log-prob (policy and reference) is the mean over
            its scored tokens instead of the sum, for every loss type; length-normalising types then see
            each sequence as one unit (no second division). Rewards are β·(mean log-ratio) then, as in Liger.
        chunk_size: accepted for Liger compatibility (an int ≥ 1). Liger processes that many pairs per
            chunk to bound its ``[chunk, T, V]`` logits; hypo_fast never builds logits (its memory is
            ``O(N + V·D)`` beyond inputs and gradients), so the value changes nothing.
        loss_type: any of :data:`hypo_fast.dpo_losses.LOSS_TYPES` (a superset of Liger's ten, which lacks
            ``ipo``, ``aot``, ``aot_unpaired``, ``sft``, ``sigmoid_norm`` and ``cdpo``), or a list of them.
        label_smoothing: ε of ``robust``, ``exo_pair`` (> 0), ``cdpo``, ``aot``, ``aot_unpaired``; unused by
            ``sigmoid`` (as in Liger and TRL 1.16). Must be in [0, 0.5) for every type (Liger checks that for
            ``robust`` only).
        discopop_tau: τ of ``discopop``.

    Keyword-only extras:
        loss_weights: one weight per ``loss_type`` entry (TRL's ``loss_weights``; default 1.0 each).
        impl: ``"auto" | "triton" | "torch"``, the log-prob kernel.

    Aux as Liger's: ``chosen_logits_mean``/``rejected_logits_mean`` (elements 2, 3) are Liger's, the sum of
    the logits over every position of the rows (prompt and padding included) and the vocabulary, divided by
    ``B·T·V`` (computed without logits: see :func:`liger_logits_means`); ``aux.metrics()`` reports TRL's
    ``logits/chosen``/``logits/rejected`` instead: the mean over the vocabulary and the scored tokens only.
    """

    def __init__(self, ignore_index: int = -100, beta: float = _DEFAULT.beta, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1,
                 loss_type: str | Sequence[str] = _DEFAULT.loss_type, label_smoothing: float = _DEFAULT.label_smoothing,
                 discopop_tau: float = _DEFAULT.discopop_tau, *,
                 loss_weights: Sequence[float] | None = None, impl: str = "auto"):
        super().__init__()
        if not isinstance(compiled, bool):
            raise ValueError(f"compiled must be True or False, got {compiled!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer ≥ 1 (pairs per Liger chunk), got {chunk_size!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        try:
            self.objective = HyPOObjective(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                                           label_smoothing=label_smoothing, discopop_tau=discopop_tau, kl_coef=0.0)
        except OptionError as err:  # Liger's wording first, so code matching Liger's messages still matches
            raise OptionError(err.option, f"{_liger_wording(err, loss_type)}; {err.detail}") from err
        self.alpha, self.compute_nll_loss = alpha, compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size  # recorded only (see the docstring)
        self.scorer = PairScorer(ignore_index, average_log_prob, use_ref_model, impl)

    # Liger's attribute names, read-only here: the objective is validated once and frozen
    ignore_index = property(lambda self: self.scorer.ignore_index)
    use_ref_model = property(lambda self: self.scorer.use_ref_model)
    average_log_prob = property(lambda self: self.scorer.average_log_prob)
    beta = property(lambda self: self.objective.beta)
    loss_type = property(lambda self: self.objective.loss_type)
    loss_weights = property(lambda self: self.objective.loss_weights)
    label_smoothing = property(lambda self: self.objective.label_smoothing)
    discopop_tau = property(lambda self: self.objective.discopop_tau)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                ref_chosen_logps=None, ref_rejected_logps=None) -> tuple[torch.Tensor, DPOAux]:
        s, _ = self.scorer.score(lin_weight, _input, target, bias=bias, ref_input=ref_input, ref_weight=ref_weight,
                                 ref_bias=ref_bias, ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps)
        nll = s.chosen_nll if self.compute_nll_loss else None
        loss, aux = self.objective(s.step_logps(), nll)
        liger_means = liger_logits_means(_input, lin_weight, bias, s.chosen.shape[0])
        out = LigerDPOAux(*aux[:2], *liger_means, *aux[4:len(DPOAux._fields)])
        out.trl_aux = aux
        return (loss if nll is None else loss + self.alpha * nll), out


class FusedLinearHyPOLoss(torch.nn.Module):
    """HyPO from hidden states: the DPO term on offline pairs plus λ·ℓ_kl on the policy's own samples.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
    online_input=None, online_target=None, ref_online_input=None, online_ref_logps=None,
    ref_chosen_logps=None, ref_rejected_logps=None) -> (loss, PreferenceAux)``

    The offline arguments are as in :class:`FusedLinearDPOLoss`. ``online_input`` ``[M, T', D]`` holds the
    hidden states of M = prompts·k samples (a prompt's k samples consecutive) and ``online_target``
    ``[M, T']`` the sampled tokens (``ignore_index`` elsewhere). Their reference log-probs come from
    ``online_ref_logps`` (token-level ``[M, T']``, at ``temperature``) or from ``ref_online_input``
    (+ ``ref_weight``). ``temperature`` is the τ the samples were drawn at: online samples are scored
    under π_τ and π_ref,τ (the objective is then KL(π_τ ‖ π_ref,τ); see :mod:`hypo_fast.objective`), pairs
    at τ = 1. ``kl_coef = 0`` skips the online term (plain DPO). The DPO term takes the same ``loss_type``
    (a name or a list, with keyword-only ``loss_weights`` and ``discopop_tau``) and ``average_log_prob`` as
    :class:`FusedLinearDPOLoss`.

    ``kl_loss="exact_token"`` (not from the paper; :func:`hypo_fast.losses.exact_token_kl_loss`) needs
    ``ref_online_input``: the samples are then scored by the fused exact-KL op (policy log-probs, the exact
    per-token KL against ``ref_weight``/``ref_bias`` applied to ``ref_online_input``, and the reference
    log-probs, all from one pass), and ``aux.metrics()`` adds ``kl/online_exact``.
    """

    def __init__(self, beta: float = _DEFAULT.beta, kl_coef: float = _DEFAULT.kl_coef,
                 num_samples: int = _DEFAULT.num_samples, ignore_index: int = -100,
                 loss_type: str | Sequence[str] = _DEFAULT.loss_type, label_smoothing: float = _DEFAULT.label_smoothing,
                 average_log_prob: bool = False, use_ref_model: bool = True, kl_loss: str = _DEFAULT.kl_loss,
                 temperature: float = 1.0, impl: str = "auto", *, loss_weights: Sequence[float] | None = None,
                 discopop_tau: float = _DEFAULT.discopop_tau):
        super().__init__()
        self.objective = HyPOObjective(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                                       label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                                       kl_coef=kl_coef, num_samples=num_samples, kl_loss=kl_loss)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.ignore_index = ignore_index
        self.scorer = PairScorer(ignore_index, average_log_prob, use_ref_model, impl, float(temperature))

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                online_input=None, online_target=None, ref_online_input=None, online_ref_logps=None,
                ref_chosen_logps=None, ref_rejected_logps=None):
        online = None
        given = OnlineInputs(online_input, online_target, ref_online_input, online_ref_logps)
        if any(t is not None for t in given):
            self._check_online(*given, need_reference=self.objective.samples_online)
            if self.objective.samples_online:  # λ = 0 is DPO: the samples are not scored at all
                online = given
        exact = self.objective.kl_loss == "exact_token"
        s, online_ref = self.scorer.score(lin_weight, _input, target, bias=bias, ref_input=ref_input,
                                          ref_weight=ref_weight, ref_bias=ref_bias, ref_chosen=ref_chosen_logps,
                                          ref_rejected=ref_rejected_logps, online=online, exact=exact)
        online_logps = None
        if online is not None:
            online_logps = OnlineLogps(s.online_logps, online_ref, online_target != self.ignore_index,
                                       token_kls=s.online_kls)
        return self.objective(s.step_logps(online_logps), s.chosen_nll)

    def _check_online(self, online_input, online_target, ref_online_input, online_ref_logps, need_reference):
        if online_input is None or online_target is None:
            raise ValueError("online samples need both online_input [M, T, D] and online_target [M, T] "
                             f"(got online_input={'None' if online_input is None else 'a tensor'}, "
                             f"online_target={'None' if online_target is None else 'a tensor'})")
        if online_input.dim() != 3 or online_target.shape != online_input.shape[:2]:
            raise ValueError(f"online_input must be [M, T, D] with online_target [M, T], got "
                             f"{tuple(online_input.shape)} and {tuple(online_target.shape)}")
        k = self.objective.num_samples
        if online_input.shape[0] % k:
            raise ValueError(f"num_samples={k} must divide the number of online samples M={online_input.shape[0]}")
        if need_reference and online_ref_logps is None and ref_online_input is None:
            raise ValueError("online samples need online_ref_logps or ref_online_input")
        if need_reference and self.objective.kl_loss == "exact_token" and ref_online_input is None:
            raise ValueError("kl_loss='exact_token' needs ref_online_input [M, T', D] (the reference's hidden states "
                             "of the samples; online_ref_logps alone cannot give the exact per-token KL)")
        if online_ref_logps is not None and online_ref_logps.shape != online_target.shape:
            raise ValueError(f"online_ref_logps must be token-level {tuple(online_target.shape)}, "
                             f"got {tuple(online_ref_logps.shape)}")
        if ref_online_input is not None and ref_online_input.shape != online_input.shape:
            raise ValueError(f"ref_online_input shape {tuple(ref_online_input.shape)} must equal online_input's")
