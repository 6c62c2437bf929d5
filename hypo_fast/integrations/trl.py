"""hypo_fast inside TRL: ``HyPOTrainer`` is TRL's ``DPOTrainer`` with hypo_fast's loss.

* ``kl_coef = 0`` (the default) is the fused-loss path for plain TRL DPO: the same trainer, data pipeline,
  logging and callbacks, with the loss computed by :class:`hypo_fast.HyPOObjective` from hidden states
  through hypo_fast's fused head (no ``[tokens × vocab]`` logits).
* ``kl_coef > 0`` adds HyPO's online term: each training micro-batch's prompts get ``num_samples``
  completions from hypo_fast's sampler (log-probs recorded as drawn), and one forward scores pairs and
  samples together; the reference scores the samples with adapters disabled (PEFT) or with ``ref_model``.

::

    from hypo_fast.integrations.trl import HyPOConfig, HyPOTrainer

    args = HyPOConfig(output_dir="out", beta=0.1, kl_coef=0.05, num_samples=2, max_new_tokens=128)
    trainer = HyPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Everything a forward computes with gradients runs *inside* the wrapped model's forward (DDP's and
DeepSpeed's hooks fire, so gradients are reduced) under the accelerator's autocast (``bf16=True`` runs the
decoder in bf16), and the LM head is called as a module (so ZeRO-3 gathers its weight).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from hypo_fast.fused_losses import FusedLinearHyPOLoss
from hypo_fast.models import Policy
from hypo_fast.models.loading import decoder_of, output_embeddings
from hypo_fast.models.packing import pad_rows
from hypo_fast.objective import HyPOObjective
from hypo_fast.ops import linear_logprobs
from hypo_fast.sampling import Sampler, SamplingConfig
from hypo_fast.segments import Segments, score_segments
from hypo_fast.seeds import derive_seed

IGNORE = -100


@dataclass
class HyPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus HyPO's online term (names as in ``hypo-fast train``)."""

    kl_coef: float = field(default=HyPOObjective.kl_coef, metadata={"help": "λ; 0 is DPO (no sampling)"})
    num_samples: int = field(default=HyPOObjective.num_samples, metadata={"help": "k completions per prompt"})
    kl_loss: str = field(default=HyPOObjective.kl_loss, metadata={"help": "rloo (the paper) | k3"})
    temperature: float = field(default=1.0, metadata={"help": "τ: the KL term is KL(π_τ ‖ π_ref,τ)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest online completion"})


class HyPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` whose loss is hypo_fast's HyPO objective (DPO alone when ``kl_coef = 0``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        loss_type = a.loss_type[0] if isinstance(a.loss_type, (list, tuple)) and len(a.loss_type) == 1 else a.loss_type
        kl_coef = getattr(a, "kl_coef", 0.0)
        self.hypo_loss = FusedLinearHyPOLoss(beta=a.beta, kl_coef=kl_coef, num_samples=getattr(a, "num_samples", 2),
                                             loss_type=loss_type, loss_weights=a.loss_weights,
                                             discopop_tau=a.discopop_tau, label_smoothing=a.label_smoothing,
                                             kl_loss=getattr(a, "kl_loss", "rloo"),
                                             temperature=getattr(a, "temperature", 1.0))
        self.objective = self.hypo_loss.objective
        if self.objective.kl_loss == "exact_token" and self.objective.samples_online:
            raise ValueError("kl_loss='exact_token' needs the reference's hidden states of the samples, which this "
                             "integration does not compute yet: use hypo-fast train or FusedLinearHyPOLoss")
        self._draws = 0  # online draws so far on this rank (part of each draw's seed)
        if self.objective.samples_online and self.ref_model is None and not self._is_peft():
            raise ValueError("HyPO's online term needs a reference model during training: pass ref_model=, train "
                             "with PEFT, or set precompute_ref_log_probs=False")

    # ---- the loss ----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        pairs = ids.shape[0] // 2
        online = self._sample(ids, attention, completion) if mode == "train" and self.objective.samples_online else None
        if online is not None:  # one forward over pairs and samples: right-pad both to one width
            ids, attention, completion = _stack([(ids, attention, completion), online], self.pad_token_id)
        targets = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE)  # row t predicts token t+1
        ref = self._reference(inputs, ids, attention, targets, pairs, online is not None)
        loss, aux = self._inside_forward(model, self._fused_loss, ids, attention, targets, pairs, ref)
        self._record(mode, aux, inputs["attention_mask"])
        if not return_outputs:
            return loss
        with torch.no_grad():  # TRL's contract: model outputs with logits (for compute_metrics)
            return loss, model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    def _fused_loss(self, ids, attention, targets, pairs, ref):
        """Runs inside the wrapped model's forward: decoder, then the fused loss through the LM-head module."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            hidden = decoder_of(unwrapped)(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1]
        head = output_embeddings(unwrapped)
        weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)  # as autocast does
        bias = getattr(head, "bias", None)
        online = {}
        if hidden.shape[0] > 2 * pairs:
            online = dict(online_input=hidden[2 * pairs:], online_target=targets[2 * pairs:],
                          online_ref_logps=ref["online"])
        return _call_as_module(head, lambda: self.hypo_loss(
            weight, hidden[:2 * pairs], targets[:2 * pairs], None if bias is None else bias.to(hidden.dtype),
            ref_chosen_logps=ref["chosen"], ref_rejected_logps=ref["rejected"], **online))

    def _inside_forward(self, model, fn, *args):
        """Route ``fn(*args)`` through ``model``'s own forward, so the wrappers' hooks (DDP, DeepSpeed) fire."""
        inner = self.accelerator.unwrap_model(model)
        original = inner.forward

        def redirected(*_, **__):
            inner.forward = original
            return fn(*args)

        inner.forward = redirected
        try:
            return model(torch.zeros(1))  # the argument is ignored; the wrapper only needs to call forward
        finally:
            inner.forward = original

    @torch.no_grad()
    def _reference(self, inputs, ids, attention, targets, pairs, with_online) -> dict:
        """π_ref's sequence log-probs of the pairs (precomputed, or from one no-grad forward) and token log-probs
        of the online samples at the sampling τ (from the same forward)."""
        ref = {"chosen": inputs.get("ref_chosen_logps"), "rejected": inputs.get("ref_rejected_logps"), "online": None}
        need_pairs = ref["chosen"] is None
        if not need_pairs and not with_online:
            return ref
        start = 0 if need_pairs else 2 * pairs  # the rows the reference must score
        model, context = self._reference_model()
        with context, self.accelerator.autocast():
            hidden = decoder_of(model)(input_ids=ids[start:], attention_mask=attention[start:],
                                       use_cache=False).last_hidden_state[:, :-1]
        weight = output_embeddings(model).weight
        weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # as the policy
        scored = targets[start:]  # [R, T]
        segments = Segments(hidden.reshape(-1, hidden.shape[-1]), scored.reshape(-1),  # pairs' rows first
                            scored[:2 * pairs].numel() if need_pairs else 0, self.hypo_loss.scorer.temperature)
        logps = score_segments(lambda h, t, tau, _: linear_logprobs(h, weight, t, temperature=tau), segments).logps
        pair_logps, online_logps = segments.split(logps)  # 0 where ignored
        if need_pairs:
            ref["chosen"], ref["rejected"] = pair_logps.view(2 * pairs, -1).sum(-1).split(pairs)
        if with_online:
            ref["online"] = online_logps.view(-1, scored.shape[1])
        return ref

    def _reference_model(self):
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and self._is_peft():
            return unwrapped, use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None)
        return self.accelerator.unwrap_model(self.ref_model), contextlib.nullcontext()

    def _is_peft(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

    # ---- online samples ----------------------------------------------------------------------------

    def _sample(self, ids, attention, completion):
        """k completions per pair's prompt from π_τ; returns right-padded (ids, attention, completion) rows."""
        pairs = ids.shape[0] // 2
        prompt_mask = (attention[:pairs] == 1) & (completion[:pairs] == 0)
        prompts = [row[mask].tolist() for row, mask in zip(ids[:pairs], prompt_mask)]
        unwrapped = self.accelerator.unwrap_model(self.model)
        policy = Policy(unwrapped, temperature=self.hypo_loss.scorer.temperature)  # the sampler reads model, head, τ
        eos = self.processing_class.eos_token_id if hasattr(self.processing_class, "eos_token_id") else None
        sampler = Sampler(policy, SamplingConfig(max_new_tokens=self.args.max_new_tokens, temperature=policy.temperature,
                                                 num_samples=self.objective.num_samples,
                                                 stop_token_ids=() if eos is None else (eos,)), pad_id=self.pad_token_id)
        seed = derive_seed(self.args.seed, "sample", self.state.global_step, self.accelerator.process_index, self._draws)
        self._draws += 1
        with self.accelerator.autocast():  # the distribution the training forward scores, precision included
            samples = sampler.generate(prompts, seed=seed)
        rows = [(prompts[i], r) for i, r in zip(samples.prompt_index.tolist(), samples.responses())]
        out, att = pad_rows([p + r for p, r in rows], self.pad_token_id)
        comp, _ = pad_rows([[0] * len(p) + [1] * len(r) for p, r in rows], 0)
        return tuple(t.to(device=ids.device, dtype=ids.dtype) for t in (out, att, comp))

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    # ---- metrics -----------------------------------------------------------------------------------

    def _record(self, mode, aux, attention) -> None:
        """The objective's metrics (TRL's names, plus HyPO's) into TRL's per-log buffers, averaged over ranks."""
        metrics = aux.metrics()
        values = self.accelerator.gather_for_metrics(torch.tensor(list(metrics.values()), device=attention.device))
        for key, value in zip(metrics, values.view(-1, len(metrics)).mean(0).tolist()):
            self._metrics[mode][key].append(value)
        if mode == "train":
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(attention.sum()).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _call_as_module(module: torch.nn.Module, fn):
    """Call ``fn`` as ``module``'s forward, so ZeRO-3 gathers the module's weight for it (and for its backward)."""
    original = module.forward
    module.forward = lambda *_: fn()
    try:
        return module(torch.zeros(1))
    finally:
        module.forward = original


def _stack(blocks, pad_id: int):
    """Right-pad (ids, attention, completion) blocks to one width and stack them."""
    width = max(b[0].shape[1] for b in blocks)
    out = []
    for k in range(3):
        out.append(torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=pad_id if k == 0 else 0)
                              for b in blocks]))
    return tuple(out)
