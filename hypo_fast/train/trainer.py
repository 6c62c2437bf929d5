"""The HyPO trainer (DESIGN.md §2): sample → reference → one packed policy forward → loss → DeepSpeed step.

Composition, not inheritance: the trainer holds the policy (model + fused head + reference), the
sampler, the data streams, the DeepSpeed engine and the logs. ``algorithm.kl_coef = 0`` is plain DPO
and never samples, so the DPO baseline and HyPO are measured by the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hypo_fast.losses import hypo_loss, sequence_logps
from hypo_fast.models import FrozenReference, Policy, add_lora, final_hidden, load_causal_lm, pack_sequences
from hypo_fast.sampling import Sampler, SamplingConfig
from hypo_fast.train import checkpoint, evaluate
from hypo_fast.train.config import TrainConfig, config_to_dict, save_config
from hypo_fast.train.data import Stream, load_pairs, load_prompts, Prompt
from hypo_fast.train.engine import build_engine, init_distributed
from hypo_fast.train.metrics_log import MetricsLog, peak_memory_mb

log = logging.getLogger("hypo_fast")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainModule(torch.nn.Module):
    """What DeepSpeed wraps: the decoder body and the fused head (so ZeRO-3 gathers the head weight)."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.model, self.head = policy.model, policy.head

    def forward(self, batch):
        hidden = final_hidden(self.model, batch)
        return self.head(hidden, batch.targets, batch.loss_positions, return_logit_mean=True)


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict
    tokens: int
    generated: int
    gen_seconds: float
    ref_seconds: float


@contextlib.contextmanager
def optimizer_step_skipped(engine):
    """Let ``engine.step()`` run its bookkeeping (counters, zero_grad) but leave every weight unchanged."""
    original = engine.optimizer.step
    engine.optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        engine.optimizer.step = original


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(cfg.output.dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self._load_tokenizer()
        self._load_policy()
        self._load_data()
        self.engine = build_engine(TrainModule(self.policy), cfg, self.world)
        stops = (self.tokenizer.eos_token_id,) if cfg.sampling.stop_on_eos and self.tokenizer.eos_token_id is not None else ()
        s = cfg.sampling
        self.sampler = Sampler(self.policy.model, self.policy.head,
                               SamplingConfig(max_new_tokens=s.max_new_tokens, num_samples=s.num_samples,
                                              temperature=s.temperature, stop_token_ids=stops), pad_id=self.pad_id)
        self.eval_sampler = Sampler(self.policy.model, self.policy.head,
                                    SamplingConfig(max_new_tokens=s.max_new_tokens, num_samples=cfg.eval.kl_samples,
                                                   temperature=s.temperature, stop_token_ids=stops), pad_id=self.pad_id)
        if s.temperature != 1.0 and self.rank == 0:
            log.warning("sampling.temperature=%s: the KL term regularises the tempered policy softmax(z/τ)",
                        s.temperature)
        self.ref_train = self._reference_logps(self.train_pairs, "train")
        self.ref_eval = self._reference_logps(self.eval_pairs, "eval") if self.eval_pairs else None
        self.reward = evaluate.load_reward(cfg.eval.reward, self.device)
        self.pairs = Stream(len(self.train_pairs), cfg.optim.seed, self.rank, self.world)
        self.prompt_stream = Stream(len(self.prompts), cfg.optim.seed + 1, self.rank, self.world)
        self.step = 0
        self._resume()

    # ---- set-up ----------------------------------------------------------------------------------

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        source = self.cfg.model.tokenizer or self.cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _load_policy(self):
        m = self.cfg.model
        if m.path is not None:
            source = m.path
        else:
            from transformers import AutoConfig

            kwargs = dict(m.config)
            source = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        model = load_causal_lm(source, dtype=DTYPES[m.dtype], attn_implementation=m.attn_implementation,
                               gradient_checkpointing=m.gradient_checkpointing, seed=m.init_seed).to(self.device)
        reference = None
        if m.lora is not None:
            model = add_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                             target_modules=m.lora.target_modules)
        else:
            reference = FrozenReference.copy_of(model, device=m.reference_device)
        model.train()
        self.policy = Policy(model, reference)

    def _load_data(self):
        d = self.cfg.data
        pairs, stats = load_pairs(d.train_file, self.tokenizer, d.max_prompt_length, d.max_length, d.skip_bad_rows)
        self._report_stats(d.train_file, stats)
        if d.eval_file:
            self.eval_pairs, stats = load_pairs(d.eval_file, self.tokenizer, d.max_prompt_length, d.max_length,
                                                d.skip_bad_rows)
            self._report_stats(d.eval_file, stats)
        else:
            n_eval = int(len(pairs) * d.eval_fraction)
            pairs, self.eval_pairs = pairs[n_eval:], pairs[:n_eval]
        self.train_pairs = pairs
        if d.prompt_file:
            self.prompts, stats = load_prompts(d.prompt_file, self.tokenizer, d.max_prompt_length, d.skip_bad_rows)
            self._report_stats(d.prompt_file, stats)
        else:  # the preference set's own prompts, once each
            unique = {p.prompt_ids: p.prompt for p in pairs}
            self.prompts = [Prompt(ids, text) for ids, text in unique.items()]
        eval_unique = {p.prompt_ids: p.prompt for p in (self.eval_pairs or self.train_pairs)}
        self.eval_prompts = [Prompt(ids, text) for ids, text in eval_unique.items()][: self.cfg.eval.kl_prompts]

    def _report_stats(self, path, stats):
        if self.rank == 0:
            log.info("%s: %d rows, %d prompts truncated, %d responses truncated, %d dropped, %d bad rows skipped",
                     path, stats.rows, stats.prompts_truncated, stats.responses_truncated, stats.dropped,
                     stats.bad_rows)

    def _fingerprint(self, pairs) -> str:
        """Data, tokenizer and truncation enter through the token ids; the reference through its source."""
        h = hashlib.sha256()
        m = self.cfg.model
        h.update(json.dumps({"path": m.path, "config": m.config, "seed": m.init_seed, "dtype": m.dtype,
                             "lora": m.lora is not None}, sort_keys=True, default=str).encode())
        if m.path is not None:
            for f in sorted(Path(m.path).glob("*.safetensors")) + sorted(Path(m.path).glob("*.bin")):
                h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        for p in pairs:
            h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
        return h.hexdigest()[:24]

    @torch.no_grad()
    def _reference_logps(self, pairs, name: str, batch_pairs: int = 8) -> torch.Tensor:
        """Offline reference log-probs ``[n, 2]`` (chosen, rejected): computed once, cached on disk.

        Every rank scores an equal share (collectives stay matched under ZeRO-3), then all are gathered.
        """
        path = self.out / "ref_cache" / f"{name}-{self._fingerprint(pairs)}.pt"
        if path.exists():
            return torch.load(path)
        n = len(pairs)
        per_rank = -(-n // self.world)
        mine = [(self.rank * per_rank + i) % n for i in range(per_rank)]  # padded by wrapping: equal counts
        local = []
        for start in range(0, per_rank, batch_pairs):
            chunk = [pairs[i] for i in mine[start:start + batch_pairs]]
            batch = pack_sequences([(p.prompt_ids, p.chosen_ids) for p in chunk]
                                   + [(p.prompt_ids, p.rejected_ids) for p in chunk]).to(self.device)
            seq = sequence_logps(self.policy.reference_token_logprobs(batch), batch.segment_ids,
                                 num_segments=batch.num_sequences)
            local.append(torch.stack([seq[:len(chunk)], seq[len(chunk):]], 1).float())
        local = torch.cat(local)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        result = torch.empty(n, 2, device=local.device)
        for r, part in enumerate(gathered):
            for i, value in zip([(r * per_rank + i) % n for i in range(per_rank)], part):
                result[i] = value
        result = result.cpu()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(result, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        return result

    def _resume(self):
        mode = self.cfg.output.resume
        folder = None
        if mode == "auto":
            folder = checkpoint.latest_checkpoint(self.out)
        elif mode != "never":
            folder = Path(mode)
        if folder is None:
            return
        state = checkpoint.load_checkpoint(folder, self.engine, self.rank)
        self.step = state["step"]
        self.pairs.load_state(state["pairs"])
        self.prompt_stream.load_state(state["prompts"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", folder, self.step)

    # ---- the step ----------------------------------------------------------------------------------

    def _sample_seed(self, micro: int) -> int:
        return (self.cfg.optim.seed * 1_000_003 + self.step * 1_009 + micro * 17 + self.rank) % (2**31 - 1)

    def micro_step(self, micro: int) -> StepResult:
        cfg = self.cfg
        index = self.pairs.take(cfg.optim.pairs_per_micro_batch)
        pairs = [self.train_pairs[i] for i in index]
        B = len(pairs)
        sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        online, generated, gen_seconds = [], 0, 0.0
        if cfg.algorithm.kl_coef > 0:
            prompts = [self.prompts[i] for i in self.prompt_stream.take(cfg.sampling.prompts_per_step)]
            start = time.perf_counter()
            samples = self.sampler.generate([p.ids for p in prompts], seed=self._sample_seed(micro))
            gen_seconds = time.perf_counter() - start
            generated = samples.num_tokens()
            online = [(prompts[i].ids, r) for i, r in zip(samples.prompt_index.tolist(), samples.responses())]
        batch = pack_sequences(sequences + online, pad_id=self.pad_id).to(self.device)

        ref = self.ref_train[index].to(self.device)  # [B, 2] cached offline reference log-probs
        online_args, num_online, ref_seconds = (None, None, None), None, 0.0
        if online:
            start = time.perf_counter()
            online_batch = pack_sequences(online, pad_id=self.pad_id).to(self.device)
            ref_online = self.policy.reference_token_logprobs(online_batch)  # one no-grad reference forward
            ref_seconds = time.perf_counter() - start
        logps, logit_means = self.engine(batch)  # ONE policy forward over pairs and samples together
        if online:
            n_offline = int(sum(len(r) for _, r in sequences))
            online_args = (logps[n_offline:], ref_online, batch.segment_ids[n_offline:] - 2 * B)
            num_online = len(online)
        seq = sequence_logps(logps, batch.segment_ids, num_segments=batch.num_sequences)
        a = cfg.algorithm
        result = hypo_loss(seq[:B], seq[B:2 * B], ref[:, 0], ref[:, 1], *online_args, num_online=num_online,
                           beta=a.beta, kl_coef=a.kl_coef, group_size=cfg.sampling.num_samples,
                           loss_type=a.loss_type, label_smoothing=a.label_smoothing, kl_loss=a.kl_loss)
        chosen_mask = batch.segment_ids < B
        rejected_mask = (batch.segment_ids >= B) & (batch.segment_ids < 2 * B)
        margins = result.chosen_rewards - result.rejected_rewards
        metrics = {
            "loss": result.loss.detach(), "loss/dpo": result.dpo_losses.mean().detach(), "loss/kl": result.kl_loss,
            "kl/online": result.online_kl, "rewards/chosen": result.chosen_rewards.mean(),
            "rewards/rejected": result.rejected_rewards.mean(), "rewards/accuracies": (margins > 0).float().mean(),
            "rewards/margins": margins.mean(), "logps/chosen": seq[:B].detach().mean(),
            "logps/rejected": seq[B:2 * B].detach().mean(),
            "logits/chosen": logit_means[chosen_mask].mean(), "logits/rejected": logit_means[rejected_mask].mean(),
        }
        return StepResult(result.loss, metrics, int(batch.input_ids.numel()), generated, gen_seconds, ref_seconds)

    def train_step(self) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        ga = self.cfg.optim.gradient_accumulation_steps
        start, sums, tokens, generated, bad = time.perf_counter(), {}, 0, 0, False
        gen_seconds = ref_seconds = 0.0
        for micro in range(ga):
            out = self.micro_step(micro)
            finite = torch.isfinite(out.loss).all()
            if self.world > 1:  # every rank must agree to skip
                flag = finite.float().to(self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = flag > 0
            if bool(finite):
                self.engine.backward(out.loss)
            else:
                bad = True
                # a loss connected to no weight: DeepSpeed's bookkeeping stays in step, no gradient is added
                self.engine.backward(torch.zeros((), device=self.device, requires_grad=True) * 1.0)
            with optimizer_step_skipped(self.engine) if bad and micro == ga - 1 else contextlib.nullcontext():
                self.engine.step()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / ga
            tokens, generated = tokens + out.tokens, generated + out.generated
            gen_seconds, ref_seconds = gen_seconds + out.gen_seconds, ref_seconds + out.ref_seconds
        seconds = time.perf_counter() - start
        self.step += 1
        if self.world > 1:  # log the global batch's metrics, not rank 0's share
            keys = sorted(sums)
            values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(values)
            sums = dict(zip(keys, (values / self.world).tolist()))
        sums.update({"skipped_nonfinite": float(bad), "tokens_per_s": tokens * self.world / seconds,
                     "lr": self.engine.get_lr()[0], "peak_memory_mb": peak_memory_mb(), "step_seconds": seconds,
                     "time/sampling": gen_seconds, "time/reference": ref_seconds,
                     "time/policy": seconds - gen_seconds - ref_seconds})
        if generated:
            sums["generation/tokens_per_s"] = generated * self.world / max(gen_seconds, 1e-9)
        if bad and self.rank == 0:
            log.warning("step %d: non-finite loss: optimizer step skipped, weights unchanged", self.step)
        return sums

    # ---- loop ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        a = self.cfg.algorithm
        self.engine.eval()
        out = {}
        if self.eval_pairs:
            share = self.eval_pairs[self.rank::self.world]
            ref = self.ref_eval[self.rank::self.world]
            if share:
                out.update(evaluate.pair_metrics(self.policy, share, ref, a.beta, a.loss_type, a.label_smoothing,
                                                 self.device))
        prompts = self.eval_prompts[self.rank::self.world]
        out.update(evaluate.sampled_kl_metrics(self.policy, self.eval_sampler, prompts,
                                               seed=10_007 + self.rank, tokenizer=self.tokenizer,
                                               reward=self.reward, device=self.device))
        self.engine.train()
        return self._mean_over_ranks(out)

    def _mean_over_ranks(self, metrics: dict) -> dict:
        if self.world == 1:
            return metrics
        gathered = [None] * self.world
        dist.all_gather_object(gathered, metrics)
        keys = sorted({k for m in gathered for k in m})
        return {k: sum(m[k] for m in gathered if k in m) / sum(1 for m in gathered if k in m) for k in keys}

    def save(self):
        state = {"step": self.step, "pairs": self.pairs.state(), "prompts": self.prompt_stream.state()}
        config_yaml = (self.out / "config.yaml").read_text() if self.rank == 0 else ""
        return checkpoint.save_checkpoint(self.out, self.step, self.engine, self.policy.model, self.tokenizer, state,
                                          config_yaml, self.cfg.output.keep_last, self.rank)

    def train(self) -> list[dict]:
        o = self.cfg.output
        logger = MetricsLog(self.out, self.cfg.optim.max_steps, self.step, self.rank == 0, o.tensorboard)
        history = []
        try:
            if self.cfg.eval.every and self.step == 0:  # the starting point (= the reference)
                start = self.evaluate()
                logger.log(0, start, advance=False)
                history.append({"step": 0, **start})
            while self.step < self.cfg.optim.max_steps:
                metrics = self.train_step()
                if self.step % o.log_every == 0 or self.step == self.cfg.optim.max_steps:
                    logger.log(self.step, metrics)
                history.append({"step": self.step, **metrics})
                if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < self.cfg.optim.max_steps:
                    evaluation = self.evaluate()
                    logger.log(self.step, evaluation, advance=False)
                    history.append({"step": self.step, **evaluation})
                if o.save_every and self.step % o.save_every == 0:
                    self.save()
            final = self.evaluate()
            logger.log(self.step, final, advance=False)
            history.append({"step": self.step, **final})
            if not o.save_every or self.step % o.save_every:
                self.save()
        finally:
            logger.close()
        return history


def run(cfg: TrainConfig) -> list[dict]:
    """Train per the config; returns the per-step metrics (and the final evaluation)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Trainer(cfg).train()


__all__ = ["Trainer", "TrainModule", "run", "config_to_dict"]
