"""One rank of the 2-process ZeRO-3 check (launched by tests/distributed/test_zero3.py)."""

from __future__ import annotations

import os
import sys

import torch


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    # no LOCAL_SIZE: DeepSpeed would then give each rank a /dev/shm all-reduce segment it never unlinks
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    from hypo_fast.examples.toy import tiny_llama
    from hypo_fast.models import Policy, final_hidden, pack_sequences
    from hypo_fast.sampling import Sampler, SamplingConfig

    class Scorer(torch.nn.Module):  # the module DeepSpeed wraps: decoder body + fused head
        def __init__(self, policy):
            super().__init__()
            self.model, self.head = policy.model, policy.head

        def forward(self, batch):
            return self.head(final_hidden(self.model, batch), batch.targets, batch.loss_positions)

    deepspeed.init_distributed(dist_backend="gloo")
    policy = Policy(tiny_llama(seed=0))
    scorer = Scorer(policy)
    batch = pack_sequences([([1, 2, 3], [4, 5, 6]), ([9, 8], [7, 6, 5, 4])])
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=scorer, optimizer=torch.optim.SGD(scorer.parameters(), lr=0.1),
                                      config=config)
    partitioned = policy.head.weight.ds_tensor.numel() < policy.head.weight.ds_numel
    logps = engine(batch)
    sampler = Sampler(policy, SamplingConfig(max_new_tokens=6, num_samples=1, greedy=True))
    tokens = sampler.generate([[1, 2, 3], [9, 8]]).tokens
    engine.backward(-logps.sum())
    engine.step()
    with deepspeed.zero.GatheredParameters([policy.head.weight]):
        head_after = policy.head.weight.detach().clone()
    torch.save({"logps": logps.detach(), "tokens": tokens, "head_after": head_after, "partitioned": partitioned},
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
