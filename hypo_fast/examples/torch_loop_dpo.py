"""``FusedLinearDPOLoss`` in a plain PyTorch loop: policy and frozen reference, no logits anywhere.

    python -m hypo_fast.examples.torch_loop_dpo
"""

from __future__ import annotations

import copy

import torch

from hypo_fast import FusedLinearDPOLoss
from hypo_fast.examples.toy import shifted_hidden_and_targets, tiny_llama, toy_pairs


def main(steps: int = 20, lr: float = 3e-3) -> list[float]:
    policy = tiny_llama()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    loss_fn = FusedLinearDPOLoss(beta=0.1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    batch = toy_pairs(n_pairs=4)
    with torch.no_grad():  # the reference never changes: its hidden states once
        ref_hidden, _ = shifted_hidden_and_targets(reference, **batch)
    losses = []
    for step in range(steps):
        hidden, targets = shifted_hidden_and_targets(policy, **batch)
        loss, aux = loss_fn(policy.get_output_embeddings().weight, hidden, targets,
                            ref_input=ref_hidden, ref_weight=reference.get_output_embeddings().weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        metrics = aux.metrics()
        print(f"step {step:3d}  loss {loss.item():.4f}  acc {metrics['rewards/accuracies']:.2f}  "
              f"margin {metrics['rewards/margins']:+.3f}")
    return losses


if __name__ == "__main__":
    main()
