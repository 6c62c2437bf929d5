"""The HyPO trainer (DESIGN.md §2): sample → pack → reference → one policy forward → objective → step.

Composition, not inheritance: the trainer holds the policy (model + fused head + reference + sampling
temperature), the objective, the sampler, the data streams, the DeepSpeed engine and the logs. It knows
no batch layout and no loss formula: :func:`pack_step` names the segments, :class:`HyPOObjective`
assembles the loss and its metrics. ``algorithm.kl_coef = 0`` is plain DPO and never samples, so the DPO
baseline and HyPO are measured by the same code.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hypo_fast.models import FrozenReference, Policy, StepBatch, add_lora, load_causal_lm, pack_step
from hypo_fast.models.loading import DTYPES
from hypo_fast.sampling import Sampler, SamplingConfig
from hypo_fast.seeds import derive_seed
from hypo_fast.train import checkpoint, distributed, evaluate, reference_cache
from hypo_fast.train.config import TrainConfig, config_to_dict, save_config
from hypo_fast.train.data import Prompt, Stream, load_pairs, load_prompts
from hypo_fast.train.engine import build_engine
from hypo_fast.train.metrics_log import MetricsLog, peak_memory_mb

log = logging.getLogger("hypo_fast")


class TrainModule(torch.nn.Module):
    """What DeepSpeed wraps: the decoder body and the fused head as submodules (so ZeRO-3 gathers the head
    weight); its forward is the policy's own step scoring."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.model, self.head = policy.model, policy.head
        self.policy = policy

    def forward(self, batch: StepBatch):
        return self.policy.step_logprobs(batch, return_logit_mean=True)


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
        self.objective = cfg.algorithm
        self.rank, self.world = distributed.init_distributed()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(cfg.output.dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self._load_tokenizer()
        self._load_policy()
        self._load_data()
        self.engine = build_engine(TrainModule(self.policy), cfg, self.world)
        s = cfg.sampling
        stops = (self.tokenizer.eos_token_id,) if s.stop_on_eos and self.tokenizer.eos_token_id is not None else ()
        self.sampler = Sampler(self.policy, SamplingConfig(max_new_tokens=s.max_new_tokens,
                                                           num_samples=self.objective.num_samples,
                                                           stop_token_ids=stops), pad_id=self.pad_id)
        self.eval_sampler = Sampler(self.policy, SamplingConfig(max_new_tokens=s.max_new_tokens,
                                                                num_samples=cfg.eval.kl_samples,
                                                                stop_token_ids=stops), pad_id=self.pad_id)
        if s.temperature != 1.0 and self.rank == 0:
            log.info("sampling.temperature=%s: the KL term is KL(π_τ ‖ π_ref,τ); samples, their scoring and the "
                     "evaluation KL all use τ (pairs are scored at τ = 1)", s.temperature)
        self.ref_train = self._reference_logps(self.train_pairs, "train")
        self.ref_eval = self._reference_logps(self.eval_pairs, "eval") if self.eval_pairs else None
        self.reward = evaluate.load_reward(cfg.eval.reward, self.device)
        seed = cfg.optim.seed
        self.pairs = Stream(len(self.train_pairs), seed, self.rank, self.world, name="pairs")
        self.prompt_stream = Stream(len(self.prompts), seed, self.rank, self.world, name="prompts")
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
        self.policy = Policy(model, reference, temperature=self.cfg.sampling.temperature)

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

    def _reference_logps(self, pairs, name: str) -> torch.Tensor:
        """Offline reference log-probs ``[n, 2]`` (chosen, rejected), from the on-disk cache when present."""
        m = self.cfg.model
        source = {"path": m.path, "config": m.config, "seed": m.init_seed, "dtype": m.dtype, "lora": m.lora is not None}
        files = []
        if m.path is not None:
            files = sorted(Path(m.path).glob("*.safetensors")) + sorted(Path(m.path).glob("*.bin"))
        average = self.objective.length_normalised
        key = reference_cache.fingerprint(source, files, pairs, average)
        return reference_cache.reference_logps(self.policy, pairs, self.out / "ref_cache" / f"{name}-{key}.pt",
                                               average, self.rank, self.world, self.device)

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

    def sample_seed(self, micro: int) -> int:
        """The draw of one micro-batch, named by its index in the global batch (not by the rank that runs
        it): two ranks draw exactly what one process with gradient accumulation draws."""
        return derive_seed(self.cfg.optim.seed, "sample", self.step, micro * self.world + self.rank)

    def micro_step(self, micro: int) -> StepResult:
        pair_index = self.pairs.take(self.cfg.optim.pairs_per_micro_batch)
        prompt_index = []
        if self.objective.samples_online:
            prompt_index = self.prompt_stream.take(self.cfg.sampling.prompts_per_step)
        return self.step_loss(pair_index, prompt_index, self.sample_seed(micro))

    def step_loss(self, pair_index: list[int], prompt_index: list[int], seed: int) -> StepResult:
        """Sample → pack → reference → ONE policy forward → the objective, for the given pairs and prompts."""
        pairs = [self.train_pairs[i] for i in pair_index]
        online, generated, gen_seconds, ref_seconds = [], 0, 0.0, 0.0
        if prompt_index:
            prompts = [self.prompts[i] for i in prompt_index]
            start = time.perf_counter()
            samples = self.sampler.generate([p.ids for p in prompts], seed=seed)  # from π_τ
            gen_seconds = time.perf_counter() - start
            generated = samples.num_tokens()
            online = [(prompts[i].ids, r) for i, r in zip(samples.prompt_index.tolist(), samples.responses())]
        batch = pack_step([(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs], online,
                          pad_id=self.pad_id).to(self.device)
        ref_online = None
        if online:
            start = time.perf_counter()
            ref_online = self.policy.reference_online_logprobs(batch)  # one no-grad forward over the samples
            ref_seconds = time.perf_counter() - start
        token_logps, logit_means = self.engine(batch)  # ONE policy forward over pairs and samples together
        step = batch.step_logps(token_logps, self.ref_train[pair_index].to(self.device), ref_online, logit_means,
                                average=self.objective.length_normalised)
        loss, aux = self.objective(step)
        metrics = {"loss": loss.detach(), **aux.metrics()}
        return StepResult(loss, metrics, int(batch.tokens.input_ids.numel()), generated, gen_seconds, ref_seconds)

    def train_step(self) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        ga = self.cfg.optim.gradient_accumulation_steps
        start, sums, tokens, generated, bad = time.perf_counter(), {}, 0, 0, False
        gen_seconds = ref_seconds = 0.0
        for micro in range(ga):
            out = self.micro_step(micro)
            if distributed.all_agree(bool(torch.isfinite(out.loss).all()), self.device):  # ranks skip together
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
        sums = distributed.mean_over_ranks(sums, self.device)  # the global batch's metrics, not rank 0's share
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
        self.engine.eval()
        out = {}
        if self.eval_pairs:
            share = self.eval_pairs[self.rank::self.world]
            if share:
                out.update(evaluate.pair_metrics(self.policy, self.objective, share,
                                                 self.ref_eval[self.rank::self.world], self.device))
        prompts = self.eval_prompts[self.rank::self.world]
        out.update(evaluate.sampled_kl_metrics(self.policy, self.eval_sampler, prompts,
                                               seed=derive_seed(self.cfg.optim.seed, "eval", self.rank),
                                               tokenizer=self.tokenizer, reward=self.reward, device=self.device))
        self.engine.train()
        return distributed.mean_over_ranks_that_have(out)

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
