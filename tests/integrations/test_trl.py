"""hypo_fast inside TRL: HyPOTrainer's DPO equals TRL's own DPOTrainer; its HyPO term trains; bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from hypo_fast.examples.toy import char_tokenizer, tiny_llama  # noqa: E402
from hypo_fast.integrations.trl import HyPOConfig, HyPOTrainer  # noqa: E402

ROWS = [{"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in (("abc", "dd", "hh"), ("bca", "ad", "gh"), ("cab", "da", "hg"), ("aab", "ddd", "e"))] * 4


def _args(cls, tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    bf16=False, gradient_checkpointing=False, max_length=16, seed=3, disable_tqdm=True,
                    dataloader_num_workers=0)
    return cls(**{**defaults, **kwargs})


def _trainer(cls, config_cls, tmp_path, model=None, **kwargs):
    torch.manual_seed(0)
    model = model or tiny_llama(vocab_size=12, hidden_size=32, layers=1)
    tok = char_tokenizer("abcdefgh")
    reference = None if kwargs.get("precompute_ref_log_probs") else copy.deepcopy(model)  # no Hub id to load it from
    return cls(model=model, ref_model=reference, args=_args(config_cls, tmp_path, **kwargs),
               train_dataset=Dataset.from_list(ROWS), processing_class=tok)


def _history(trainer, key="loss"):
    return [row[key] for row in trainer.state.log_history if key in row and "train_runtime" not in row]


def test_fused_dpo_path_equals_trls_own_dpo(tmp_path):
    """kl_coef = 0: the same steps, data order and updates as TRL's DPOTrainer, loss by hypo_fast's fused head."""
    model = tiny_llama(vocab_size=12, hidden_size=32, layers=1)
    ours = _trainer(HyPOTrainer, HyPOConfig, tmp_path / "ours", model=copy.deepcopy(model))
    theirs = _trainer(DPOTrainer, DPOConfig, tmp_path / "theirs", model=copy.deepcopy(model))
    ours.train()
    theirs.train()
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm",
                "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):  # TRL's token metrics too
        assert _history(theirs, key), f"TRL logged no {key}"
        torch.testing.assert_close(torch.tensor(_history(ours, key)), torch.tensor(_history(theirs, key)),
                                   atol=2e-5, rtol=2e-4, msg=key)
    assert 0 < sum(_history(theirs, "mean_token_accuracy")) < len(_history(theirs, "mean_token_accuracy"))
    assert _history(ours, "num_tokens") == _history(theirs, "num_tokens")


def test_hypo_term_trains_inside_trl_and_logs_its_metrics(tmp_path):
    trainer = _trainer(HyPOTrainer, HyPOConfig, tmp_path, kl_coef=0.5, num_samples=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="needs a reference model"):
        _trainer(HyPOTrainer, HyPOConfig, tmp_path / "x", kl_coef=0.5, precompute_ref_log_probs=True)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "kl/online" in r]
    assert len(rows) == 4
    for row in rows:  # the logged loss is the objective's: DPO + λ·ℓ_kl
        assert row["loss"] == pytest.approx(row["loss/dpo"] + 0.5 * row["loss/kl"], abs=1e-4)
    assert rows[-1]["kl/online"] != 0.0


def test_lora_reference_is_the_base_model_and_bf16_autocast_reaches_the_decoder(tmp_path):
    from peft import LoraConfig

    model = tiny_llama(vocab_size=12, hidden_size=32, layers=1)
    dtypes = []
    # a matmul inside the decoder (its residual stream stays fp32 under autocast; the matmuls run in bf16)
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    trainer = HyPOTrainer(model=model, args=_args(HyPOConfig, tmp_path, kl_coef=0.5, max_new_tokens=3, bf16=True,
                                                  max_steps=2),
                          train_dataset=Dataset.from_list(ROWS), processing_class=char_tokenizer("abcdefgh"),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # every forward (training, reference, sampling) autocast
    assert len([r for r in trainer.state.log_history if "kl/online" in r]) == 2


def test_the_cli_logs_every_metric_trls_dpo_trainer_logs(tmp_path):
    """One set of names: each metric TRL's own DPOTrainer logs in a training step (``entropy`` and
    ``mean_token_accuracy`` included) is in the CLI's log under the same name."""
    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer
    from tests.train.helpers import toy_config

    theirs = _trainer(DPOTrainer, DPOConfig, tmp_path / "theirs")
    theirs.train()
    trl_names = {k for row in theirs.state.log_history if "loss" in row for k in row}
    ours = Trainer(config_from_dict(toy_config(tmp_path, "ours", steps=2))).train()
    cli_names = {k for row in ours if "loss" in row for k in row}
    assert {"entropy", "mean_token_accuracy", "logits/chosen"} <= trl_names
    assert trl_names - cli_names == set()
