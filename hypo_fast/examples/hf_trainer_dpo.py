"""``FusedLinearDPOLoss`` inside a Hugging Face ``Trainer`` through a custom ``compute_loss``.

    python -m hypo_fast.examples.hf_trainer_dpo

Collated batches hold chosen rows then rejected rows (``toy_pairs``); the reference is a frozen copy
of the starting model. Under DeepSpeed ZeRO-3 wrap the loss call in
``deepspeed.zero.GatheredParameters([model.get_output_embeddings().weight])``.
"""

from __future__ import annotations

import collections
import copy
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from hypo_fast import FusedLinearDPOLoss
from hypo_fast.examples.toy import tiny_llama, toy_pairs


class PairDataset(torch.utils.data.Dataset):
    """Each item is one pair: its chosen row and its rejected row."""

    def __init__(self, n_pairs: int):
        self.batch = toy_pairs(n_pairs)
        self.n = n_pairs

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: torch.stack([v[i], v[self.n + i]]) for k, v in self.batch.items()}


def collate_pairs(items):
    """[(2, T)] per pair → [2B, T]: all chosen rows first, then all rejected rows."""
    return {k: torch.cat([torch.stack([it[k][0] for it in items]), torch.stack([it[k][1] for it in items])])
            for k in items[0]}


class FusedDPOTrainer(Trainer):
    """``compute_loss`` from hidden states; metrics kept until the Trainer logs, so each lands on its step."""

    def __init__(self, *args, reference, loss_fn: FusedLinearDPOLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference, self.loss_fn = reference, loss_fn
        self._pending = collections.defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through the wrapped model's own forward: accelerate's autocast (bf16=True) and DDP's hooks apply.
        # ``logits_to_keep=1`` keeps the HF head to one position; the fused loss scores the rest.
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "output_hidden_states": True, "logits_to_keep": 1, "use_cache": False}
        hidden, targets = model(**batch).hidden_states[-1][:, :-1], inputs["labels"][:, 1:]  # row t predicts t+1
        with torch.no_grad():
            ref = self.reference(**batch)
        head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        loss, aux = self.loss_fn(head, hidden, targets, ref_input=ref.hidden_states[-1][:, :-1],
                                 ref_weight=self.reference.get_output_embeddings().weight)
        for key, value in aux.metrics().items():
            self._pending[key].append(value)
        return (loss, aux) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Merge the metrics of the micro-batches since the last log into the Trainer's own row for this step."""
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._pending.items()})
        self._pending.clear()
        super().log(logs, *args, **kwargs)


def main(steps: int = 20, lr: float = 3e-3, output_dir: str | None = None) -> list[dict]:
    model = tiny_llama()
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=output_dir or tmp, max_steps=steps, learning_rate=lr,
                                 per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=not torch.cuda.is_available(),
                                 remove_unused_columns=False, disable_tqdm=True, lr_scheduler_type="constant")
        trainer = FusedDPOTrainer(model=model, args=args, train_dataset=PairDataset(4), data_collator=collate_pairs,
                                  reference=reference, loss_fn=FusedLinearDPOLoss(beta=0.1))
        trainer.train()
    return trainer.state.log_history


if __name__ == "__main__":
    for row in main():
        print(row)
