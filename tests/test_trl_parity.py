"""hypo_fast's preference losses against TRL 1.16's own ``DPOTrainer`` loss, on the same forward pass.

TRL computes its loss inline in ``DPOTrainer._compute_loss``, so the test drives that code itself: a tiny
Llama policy and reference (built from a config on CPU), TRL's own tokenization and collator, and
``trainer.compute_loss``. Forward hooks on the two models read the per-token log-probs of that very
forward; hypo_fast's objective then gets their sums and token counts. Loss, its gradient with respect to
every per-token log-prob, and the logged reward metrics must agree. Skipped without TRL (``.[trl]``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hypo_fast.dpo_losses import LOSS_TYPES, OptionError
from hypo_fast.examples.toy import char_tokenizer, tiny_llama
from hypo_fast.losses import sequence_logps
from hypo_fast.objective import HyPOObjective, StepLogps

trl = pytest.importorskip("trl", reason="TRL not installed (pip install -e '.[trl]')")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"written against TRL 1.16 (installed: {trl.__version__})", allow_module_level=True)
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames TRL's defaults

ROWS = [  # ragged prompts and responses; TRL appends EOS to plain-text responses
    {"prompt": "abc", "chosen": "dd", "rejected": "efgh"},
    {"prompt": "hh", "chosen": "abcab", "rejected": "g"},
    {"prompt": "g", "chosen": "hha", "rejected": "bb"},
    {"prompt": "fed", "chosen": "a", "rejected": "ccah"},
    {"prompt": "bbb", "chosen": "gfe", "rejected": "ad"},
]
TRL_TYPES = [t for t in LOSS_TYPES if t != "cdpo"]  # cdpo is hypo_fast's name for older TRL's smoothed sigmoid
BETA, EPS, TAU = 0.5, 0.1, 0.3


def _models(vocab: int):
    policy = tiny_llama(vocab_size=vocab, hidden_size=32, layers=1, seed=0)
    reference = tiny_llama(vocab_size=vocab, hidden_size=32, layers=1, seed=0)
    with torch.no_grad():  # a reference away from the policy: log-ratios of order one per token
        generator = torch.Generator().manual_seed(1)
        for p in reference.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return policy, reference


def _trl_trainer(tmp_path, loss_type, loss_weights):
    tokenizer = char_tokenizer("abcdefgh")
    policy, reference = _models(len(tokenizer))
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], beta=BETA,
                         loss_type=loss_type, loss_weights=loss_weights, label_smoothing=EPS, discopop_tau=TAU,
                         gradient_checkpointing=False, max_length=None)
    return trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(ROWS))


def _both_losses(tmp_path, loss_type, loss_weights=None):
    """TRL's loss and metrics and hypo_fast's objective, from the same forward's per-token log-probs.

    Returns ``((trl_loss, trl_metrics), (our_loss, our_metrics), token_logps [2B, T−1], scored [2B, T−1])``."""
    trainer = _trl_trainer(tmp_path, loss_type, loss_weights)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    seen = {}
    hooks = [model.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.log_probs))
             for name, model in (("policy", trainer.model), ("reference", trainer.ref_model))]
    try:
        trl_loss = trainer.compute_loss(trainer.model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    token_logps, ref_token_logps = seen["policy"], seen["reference"]  # [2B, T−1], 0 at unscored positions
    mask = batch["completion_mask"][:, 1:].bool()  # scored: the positions whose next token is a completion token
    assert token_logps.requires_grad and token_logps.shape == mask.shape and mask.any(1).all()
    seq, ref_seq = sequence_logps(token_logps, mask), sequence_logps(ref_token_logps, mask)
    counts = mask.sum(1)
    B = len(ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sigmoid with label_smoothing: ignored by both, as TRL 1.16 does
        objective = HyPOObjective(beta=BETA, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=EPS,
                                  discopop_tau=TAU)
    ours, aux = objective(StepLogps(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:],
                                    chosen_tokens=counts[:B], rejected_tokens=counts[B:]))
    return (trl_loss, trl_metrics), (ours, aux.metrics()), token_logps, mask


@pytest.mark.parametrize("loss_type,loss_weights", [pytest.param(t, None, id=t) for t in TRL_TYPES] + [
    pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], id="mpo"),  # TRL's MPO example
    pytest.param(["ipo", "aot", "exo_pair", "sigmoid_norm"], None, id="list-unweighted"),  # 1.0 each
    pytest.param(["aot_unpaired", "discopop", "sft"], [0.5, 2.0, 0.0], id="list-weighted"),
])
def test_loss_and_gradient_equal_trl_own_loss(tmp_path, loss_type, loss_weights):
    (trl_loss, trl_metrics), (ours, our_metrics), token_logps, scored = _both_losses(tmp_path, loss_type,
                                                                                     loss_weights)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    trl_grad, = torch.autograd.grad(trl_loss, token_logps, retain_graph=True)
    our_grad, = torch.autograd.grad(ours, token_logps)
    # TRL sums every position (its unscored log-probs are constant zeros, so their gradient is moot)
    assert trl_grad[scored].abs().max() > 0
    torch.testing.assert_close(our_grad[scored], trl_grad[scored], rtol=1e-4, atol=1e-6)
    assert not our_grad[~scored].any()
    # rewards are β·(Σ log π − Σ log π_ref) for every loss type, and logps/* the summed log-probs
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("options,option", [
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
    ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "label_smoothing"),
])
def test_configurations_trl_refuses_are_refused(tmp_path, options, option):
    with pytest.raises(ValueError):
        _trl_trainer(tmp_path, options["loss_type"], options.get("loss_weights")) if "loss_weights" in options \
            else trl.DPOTrainer(model=_models(12)[0], ref_model=_models(12)[1], processing_class=char_tokenizer("a"),
                                train_dataset=datasets.Dataset.from_list(ROWS),
                                args=trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                                                   **options))
    with pytest.raises(OptionError, match=option):
        HyPOObjective(**options)
