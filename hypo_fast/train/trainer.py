"""The HyPO trainer, one step: sample → pack → reference → one policy forward → objective → step.

Composition, not inheritance: the trainer holds the policy (model + fused head + reference + sampling
temperature), the objective, the sampler, the data streams, the DeepSpeed engine and the logs. It knows
no batch layout and no loss formula: :func:`pack_step` names the segments, :class:`HyPOObjective`
assembles the loss and its metrics. ``algorithm.kl_coef = 0`` is plain DPO and never samples, so the DPO
baseline and HyPO are measured by the same code.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hypo_fast.models import Policy, StepBatch, pack_step
from hypo_fast.sampling import Sampler
from hypo_fast.seeds import derive_seed
from hypo_fast.train import build, checkpoint, distributed, evaluate, reference_cache, run_folder
from hypo_fast.train.config import ConfigError, TrainConfig, config_to_dict, save_config
from hypo_fast.train.data import Stream
from hypo_fast.train.errors import UserError
from hypo_fast.train.signals import StopRequests
from hypo_fast.train.engine import build_engine
from hypo_fast.train.metrics_log import MetricsLog, peak_memory_mb

log = logging.getLogger("hypo_fast")
# a full disk, a file too large, a folder turned read-only or gone: the run stops with one line
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}  # under output.dir


class OutputWriteError(UserError):
    """The run folder could not be written mid-run (the message names the file and what to do)."""


class TrainModule(torch.nn.Module):
    """What DeepSpeed wraps: the decoder body and the fused head as submodules (so ZeRO-3 gathers the head
    weight); its forward is the policy's own step scoring."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.model, self.head = policy.model, policy.head
        self.policy = policy

    def forward(self, batch: StepBatch, ref_online_hidden: torch.Tensor | None = None):
        return self.policy.step_logprobs(batch, return_metrics=True, ref_online_hidden=ref_online_hidden)


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict
    tokens: int  # every token of the packed forward (pairs and samples)
    pair_tokens: int  # the pairs' tokens, prompts counted twice (TRL's num_tokens)
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
        self.rank, self.world = distributed.init_distributed(cfg.distributed.timeout_minutes)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(cfg.output.dir)
        if self.rank == 0:
            build.check_output_dir(self.out)
        self.tokenizer, self.pad_id = build.load_tokenizer(cfg)
        data = build.load_datasets(cfg, self.tokenizer, report=self.rank == 0)
        self.train_pairs, self.eval_pairs = data.train_pairs, data.eval_pairs
        self.prompts, self.eval_prompts = data.prompts, data.eval_prompts
        self.start = self._claim_run_folder(data.fingerprints())  # before the model: fail fast
        self.policy = build.load_policy(cfg, self.device)
        self.max_steps = self._total_steps()
        self.engine = build_engine(TrainModule(self.policy), cfg, self.world, self.max_steps)
        s = cfg.sampling
        stops = (self.tokenizer.eos_token_id,) if s.stop_on_eos and self.tokenizer.eos_token_id is not None else ()
        self.sampler = Sampler(self.policy, replace(s, num_samples=self.objective.num_samples, stop_token_ids=stops),
                               pad_id=self.pad_id)
        self.eval_sampler = Sampler(self.policy, replace(s, num_samples=cfg.eval.kl_samples, stop_token_ids=stops),
                                    pad_id=self.pad_id)
        if s.temperature != 1.0 and self.rank == 0:
            log.info("sampling.temperature=%s: the KL term is KL(π_τ ‖ π_ref,τ); samples, their scoring and the "
                     "evaluation KL all use τ (pairs are scored at τ = 1)", s.temperature)
        try:
            self.reward = evaluate.load_reward(cfg.eval.reward, self.device)
        except (ValueError, OSError) as err:
            raise ConfigError(f"eval.reward: {err}") from err
        self.ref_train = self._reference_logps(self.train_pairs, "train")
        self.ref_eval = self._reference_logps(self.eval_pairs, "eval") if self.eval_pairs else None
        seed = cfg.optim.seed
        self.pairs = Stream(len(self.train_pairs), seed, self.rank, self.world, name="pairs")
        self.prompt_stream = Stream(len(self.prompts), seed, self.rank, self.world, name="prompts")
        self.step, self.phase, self.num_tokens, self.saved_step = 0, "start-up", 0, None
        self._resume()
        self.leg = None  # rank 0 records the leg; its checkpoints carry the number
        if self.rank == 0:
            self.leg = run_folder.apply(self.out, self.start, self._config, self._data, self.step if self.step else -1)
            save_config(cfg, self.out / "config.yaml")
        distributed.barrier()

    # ---- set-up ----------------------------------------------------------------------------------

    def _total_steps(self) -> int:
        """``optim.max_steps``, or ``num_epochs`` passes over the training pairs in global batches."""
        o = self.cfg.optim
        if o.max_steps is not None:
            return o.max_steps
        global_batch = o.pairs_per_micro_batch * o.gradient_accumulation_steps * self.world
        return max(1, math.ceil(o.num_epochs * len(self.train_pairs) / global_batch))

    def _steps_per_epoch(self) -> int:
        o = self.cfg.optim
        return max(1, math.ceil(len(self.train_pairs) / (o.pairs_per_micro_batch * o.gradient_accumulation_steps
                                                         * self.world)))

    def _due(self, every: int, strategy: str) -> bool:
        """Whether this step ends a period: every ``every`` steps, or (``epoch``) each pass over the pairs."""
        if strategy == "epoch":
            return self.step % self._steps_per_epoch() == 0
        return bool(every) and self.step % every == 0

    def _claim_run_folder(self, data: dict) -> run_folder.Start:
        """Whether this start continues the folder's run, starts over, or must refuse (every rank decides
        from the same files before rank 0 writes anything)."""
        self._config, self._data = config_to_dict(self.cfg), data
        o = self.cfg.output
        start = run_folder.decide(self.out, self._config, data, o.resume, o.overwrite)
        distributed.barrier()
        return start

    def _reference_logps(self, pairs, name: str) -> torch.Tensor:
        """Offline reference log-probs ``[n, 2]`` (chosen, rejected), from the on-disk cache when present."""
        m = self.cfg.model
        source = {"path": m.path, "config": m.config, "seed": m.init_seed, "dtype": m.dtype, "lora": m.lora is not None}
        files = []
        if m.path is not None:
            files = sorted(Path(m.path).glob("*.safetensors")) + sorted(Path(m.path).glob("*.bin"))
        key = reference_cache.fingerprint(source, files, pairs)
        return reference_cache.reference_logps(self.policy, pairs, self.out / "ref_cache" / f"{name}-{key}.pt",
                                               self.rank, self.world, self.device)

    def _resume(self):
        """Continue from the chosen checkpoint; a damaged one is named and the next older intact one used."""
        folder = self.start.resume_from
        if folder is None:
            return
        candidates = [folder, *self.start.fallbacks]  # auto: older checkpoints of the run's line
        for candidate in candidates:
            try:
                checkpoint.verify(candidate)
                state = checkpoint.load_checkpoint(candidate, self.engine, self.rank)
                break
            except checkpoint.CheckpointError as err:
                if self.rank == 0:
                    log.warning("cannot resume from a damaged checkpoint: %s", err)
        else:
            raise checkpoint.CheckpointError(f"output.dir {self.out}: no intact checkpoint to resume from "
                                             f"(tried {', '.join(c.name for c in candidates)})")
        self.step, self.num_tokens = state["step"], state.get("num_tokens", 0)
        self.pairs.load_state(state["pairs"])
        self.prompt_stream.load_state(state["prompts"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", candidate, self.step)

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
            self.phase = "sampling (weights gathered under ZeRO-3)"
            samples = self.sampler.generate([p.ids for p in prompts], seed=seed)  # from π_τ
            gen_seconds = time.perf_counter() - start
            generated = samples.num_tokens()
            online = [(prompts[i].ids, r) for i, r in zip(samples.prompt_index.tolist(), samples.responses())]
        batch = pack_step([p.ids for p in pairs], online,
                          pad_id=self.pad_id).to(self.device)
        ref_online = ref_hidden = None
        exact = self.objective.kl_loss == "exact_token"  # needs the reference's hidden states of the samples
        if online:
            start = time.perf_counter()
            ref_online = self.policy.reference_online_logprobs(batch, return_hidden=exact)  # one no-grad forward
            if exact:
                ref_online, ref_hidden = ref_online
            ref_seconds = time.perf_counter() - start
        self.phase = "the policy forward"
        # ONE policy forward over pairs and samples together (exact_token: plus the samples' exact KL_t)
        token_logps, row_metrics, *token_kls = self.engine(batch, ref_online_hidden=ref_hidden)
        step = batch.step_logps(token_logps, self.ref_train[pair_index].to(self.device), ref_online, row_metrics,
                                token_kls[0] if token_kls else None)
        loss, aux = self.objective(step)
        metrics = {"loss": loss.detach(), **aux.metric_tensors()}  # on the device: transferred once per step
        pair_tokens = sum(p.packed_tokens for p in pairs)
        return StepResult(loss, metrics, int(batch.tokens.input_ids.numel()), pair_tokens, generated, gen_seconds,
                          ref_seconds)

    def train_step(self) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        ga = self.cfg.optim.gradient_accumulation_steps
        start, sums, tokens, pair_tokens, generated, bad = time.perf_counter(), {}, 0, 0, 0, False
        grad_norm = None
        learning_rate = self.engine.get_lr()[0]  # the rate this step's update uses (what HF's Trainer logs)
        gen_seconds = ref_seconds = 0.0
        for micro in range(ga):
            out = self.micro_step(micro)
            self.phase = "the agreement on a finite loss"
            if distributed.all_agree(bool(torch.isfinite(out.loss).all()), self.device):  # ranks skip together
                self.engine.backward(out.loss)
            else:
                bad = True
                self.engine.backward(self._zero_loss())  # DeepSpeed's bookkeeping stays in step
            self.phase = "the backward's gradient reduction and the optimizer step"
            if micro == ga - 1 and not bad:
                grad_norm = self._local_grad_norm()
            with optimizer_step_skipped(self.engine) if bad and micro == ga - 1 else contextlib.nullcontext():
                self.engine.step()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v.float() / ga
            tokens, pair_tokens, generated = tokens + out.tokens, pair_tokens + out.pair_tokens, generated + out.generated
            gen_seconds, ref_seconds = gen_seconds + out.gen_seconds, ref_seconds + out.ref_seconds
        seconds = time.perf_counter() - start
        self.step += 1
        self.phase = "the metrics' mean over ranks"
        sums["num_tokens"] = pair_tokens  # this step's share; summed over ranks below
        if not bad:  # the norm before clipping, as HF's Trainer logs it (the same on every rank)
            grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
            if grad_norm is not None:
                sums["grad_norm"] = grad_norm
        # the global batch's metrics, not rank 0's share, in one device→host transfer for the whole step
        sums = distributed.mean_over_ranks(sums, self.device)
        self.num_tokens += round(sums.pop("num_tokens") * self.world)
        sums.update({"skipped_nonfinite": float(bad), "tokens_per_s": tokens * self.world / seconds,
                     "learning_rate": learning_rate, "epoch": self.pairs.epoch + self.pairs.position / self.pairs.n,
                     "num_tokens": float(self.num_tokens), "peak_memory_mb": peak_memory_mb(), "step_seconds": seconds,
                     "time/sampling": gen_seconds, "time/reference": ref_seconds,
                     "time/policy": seconds - gen_seconds - ref_seconds})
        if generated:
            sums["generation/tokens_per_s"] = generated * self.world / max(gen_seconds, 1e-9)
        if bad and self.rank == 0:
            log.warning("step %d: non-finite loss: optimizer step skipped, weights unchanged", self.step)
        return sums

    def _local_grad_norm(self) -> torch.Tensor | None:
        """Without ZeRO, DeepSpeed keeps no gradient norm: take it from the (already reduced) gradients.
        ZeRO's optimizers record it themselves during the step (``engine.get_global_grad_norm``)."""
        if self.cfg.deepspeed.zero_stage != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else None

    def _zero_loss(self) -> torch.Tensor:
        """A loss whose gradient is exactly zero, backed in place of a non-finite one. ZeRO-1/2 reduce
        gradients in buckets that expect every trainable parameter, so it touches each of them; ZeRO-3
        gathers parameters only inside the forward, so there it touches none."""
        if self.cfg.deepspeed.zero_stage == 3:
            return torch.zeros((), device=self.device, requires_grad=True) * 1.0
        return sum((p * 0).sum() for p in self.engine.module.parameters() if p.requires_grad)

    # ---- loop ----------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        self.phase = "evaluation"
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
        self.phase = "saving a checkpoint"
        state = {"step": self.step, "pairs": self.pairs.state(), "prompts": self.prompt_stream.state(),
                 "num_tokens": self.num_tokens, "leg": self.leg}
        config_yaml = (self.out / "config.yaml").read_text() if self.rank == 0 else ""
        folder = checkpoint.save_checkpoint(self.out, self.step, self.engine, self.policy.model, self.tokenizer,
                                            state, config_yaml, self.cfg.output.keep_last, self.rank,
                                            line=lambda out: run_folder.lineage(out, run_folder.read_record(out)))
        self.saved_step = self.step
        return folder

    def _save_unless_saved(self) -> Path:
        return self.out / f"checkpoint-{self.step}" if self.saved_step == self.step else self.save()

    def resume_advice(self) -> str:
        """What to run to continue this run after a stop: the same command, with the overrides it needs."""
        o = self.cfg.output
        needed = (["output.overwrite=false"] if o.overwrite else []) + \
            (["output.resume=auto"] if o.resume != "auto" else [])
        return f"to resume, run the same command with {' '.join(needed)} added" if needed else \
            "run the same command to resume"

    def train(self) -> list[dict]:
        """Train to ``optim.max_steps``; SIGTERM/SIGINT stop after the current step with a checkpoint."""
        o, max_steps = self.cfg.output, self.max_steps
        if self.step >= max_steps:
            if self.rank == 0:
                print(f"hypo-fast: the run in {self.out} is complete (step {self.step} of {max_steps}); nothing to do "
                      "(raise optim.max_steps to train on)", flush=True)
            return []
        logger = MetricsLog(self.out, max_steps, self.step, self.rank == 0, o.report_to, self._config)
        history = []
        try:
            with StopRequests() as stop, self._timeouts_named():
                evaluating = bool(self.cfg.eval.every) or self.cfg.eval.strategy == "epoch"
                if evaluating and self.step == 0:  # the starting point (= the reference)
                    history.append(self._evaluate_and_log(logger))
                while self.step < max_steps:
                    metrics = self.train_step()
                    if self.step % o.log_every == 0 or self.step == max_steps:
                        logger.log(self.step, metrics)
                    history.append({"step": self.step, **metrics})
                    if self._due(self.cfg.eval.every, self.cfg.eval.strategy) and self.step < max_steps:
                        history.append(self._evaluate_and_log(logger))
                    if self._due(o.save_every, o.save_strategy):
                        self.save()
                    self.phase = "the stop-signal check"
                    if stop.requested(self.device):
                        folder = self._save_unless_saved()
                        if self.rank == 0:
                            print(f"hypo-fast: stopped by {stop.received or 'a peer rank'} after step {self.step}; "
                                  f"checkpoint saved to {folder}; {self.resume_advice()}", flush=True)
                        return history
                history.append(self._evaluate_and_log(logger))
                self._save_unless_saved()
        except OSError as err:
            if err.errno not in WRITE_ERRORS or (err.filename and self.out.resolve() not in
                                                 Path(err.filename).resolve().parents):
                raise  # not the run folder's writes
            raise OutputWriteError(self._write_failure(err)) from err
        finally:
            logger.close()
        return history

    def _write_failure(self, err: OSError) -> str:
        try:
            line = run_folder.lineage(self.out, run_folder.read_record(self.out)) if self.out.is_dir() else []
        except run_folder.RunFolderError:
            line = checkpoint.list_checkpoints(self.out)
        kept = f"its last checkpoint, {line[-1][1]}, is whole" if line else "it has no checkpoint yet"
        where = f" {err.filename}" if err.filename else ""
        return (f"cannot write{where} at step {self.step} ({err.strerror or err}); the run stopped and "
                f"{kept}. Free space or fix the folder's permissions, then {self.resume_advice()}")

    @contextlib.contextmanager
    def _timeouts_named(self):
        """A collective that times out is reported with the step and the phase that was waiting."""
        try:
            yield
        except RuntimeError as err:
            if not distributed.is_timeout(err) or isinstance(err, distributed.CollectiveTimeout):
                raise
            raise distributed.CollectiveTimeout(
                f"rank {self.rank}: a collective timed out after distributed.timeout_minutes="
                f"{self.cfg.distributed.timeout_minutes} during {self.phase} at step {self.step + 1}: a peer rank is "
                f"frozen or dead ({str(err).splitlines()[0]})") from err

    def _evaluate_and_log(self, logger) -> dict:
        evaluation = self.evaluate()
        logger.log(self.step, evaluation, advance=False)
        return {"step": self.step, **evaluation}


def run(cfg: TrainConfig) -> list[dict]:
    """Train per the config; returns the per-step metrics (and the final evaluation)."""
    return Trainer(cfg).train()


__all__ = ["Trainer", "TrainModule", "run", "config_to_dict"]
