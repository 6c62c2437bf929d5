"""Run logging on rank 0: a progress bar, a JSONL metrics file, TensorBoard."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import torch

log = logging.getLogger("hypo_fast")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class MetricsLog:
    """``metrics.jsonl`` always, plus the reporters of ``output.report_to``: TensorBoard, W&B, MLflow.

    Names are TRL's: ``metrics.jsonl`` and MLflow hold them as TRL's log history does (``loss``,
    ``rewards/chosen``, evaluation's under ``eval/``); TensorBoard and W&B get them as Hugging Face's Trainer
    writes them there (``train/loss``, ``train/rewards/chosen``, ``eval/rewards/chosen``).

    A reporter whose package is missing is a clear error at start (not a silent gap in the logs). A resumed
    leg replays the steps after its checkpoint, so TensorBoard drops their old events (``purge_step``) and
    W&B / MLflow runs resume under the run folder's id.
    """

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 report_to: tuple[str, ...] = (), config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writers = []
        self.bar = None
        if not enabled:
            return
        for name in report_to:
            self.writers.append(_REPORTERS[name](Path(out_dir), start_step, config or {}))
        from tqdm.auto import tqdm

        import sys

        # a progress bar only on a terminal; redirected logs get one line per logged step instead
        self.bar = tqdm(total=total_steps, initial=start_step, desc="hypo-fast", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.started = time.time()

    def log(self, step: int, metrics: dict, advance: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step"}
        for writer in self.writers:
            writer.log(step, scalars)
        shown = {k: metrics[k] for k in ("loss", "kl/online", "tokens_per_s") if k in metrics}
        if advance and self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            if self.bar.disable and shown:
                log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for writer in self.writers:
            writer.close()


def _require(package: str, reporter: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        from hypo_fast.train.errors import UserError

        raise UserError(f"output.report_to: {reporter} needs the {package} package (pip install {package})") from err


def trainer_names(scalars: dict) -> dict:
    """The names Hugging Face's Trainer (and so TRL) gives its TensorBoard and W&B scalars: ``train/loss``,
    ``train/rewards/chosen``, …; evaluation's ``eval/…`` as they are (its ``rewrite_logs``), so runs of the
    CLI and of the TRL integration overlay in one dashboard."""
    return {k if k.startswith("eval/") else f"train/{k}": v for k, v in scalars.items()}


class TensorBoardWriter:
    def __init__(self, out: Path, start_step: int, config: dict):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict) -> None:
        for key, value in trainer_names(scalars).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """One W&B run per run folder (its id is kept in the folder, so a resumed leg continues it)."""

    def __init__(self, out: Path, start_step: int, config: dict):
        self.wandb = _require("wandb", "wandb")
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = self.wandb.init(id=run_id, resume="allow", dir=str(out), name=_run_name(out, config), config=config)

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(trainer_names(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowWriter:
    """MLflow run per run folder (tracking URI from MLFLOW_TRACKING_URI, default ./mlruns); resumed legs continue it."""

    def __init__(self, out: Path, start_step: int, config: dict):
        self.mlflow = _require("mlflow", "mlflow")
        import os

        if "MLFLOW_TRACKING_URI" not in os.environ:  # keep the run's records beside it
            self.mlflow.set_tracking_uri(local_mlflow_uri(out))
        self.file_store = self.mlflow.get_tracking_uri().startswith("file:")
        id_file = out / "mlflow_run_id"
        if id_file.exists():
            self.run = self.mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            self.run = self.mlflow.start_run(run_name=_run_name(out, config))
            id_file.write_text(self.run.info.run_id)
            flat = {k: str(v)[:250] for k, v in _flatten(config).items()}
            self.mlflow.log_params(flat)

    def log(self, step: int, scalars: dict) -> None:
        if self.file_store:  # "loss" is a file there, so "loss/dpo" cannot be one under it
            scalars = {k.replace("/", "."): v for k, v in scalars.items()}
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _run_name(out: Path, config: dict) -> str:
    """``output.run_name`` (TRL's run_name), else the run folder's name."""
    return (config.get("output") or {}).get("run_name") or out.name


def local_mlflow_uri(out: Path) -> str:
    """A store in the run folder: SQLite where MLflow's database backend is installed (full ``mlflow``), else
    its file store (``mlflow-skinny``; MLflow 3 asks for an explicit opt-in to it, given here)."""
    import importlib.util
    import os

    if importlib.util.find_spec("sqlalchemy") is not None:
        return f"sqlite:///{(out / 'mlflow.db').resolve()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (out / "mlruns").resolve().as_uri()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_REPORTERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter, "mlflow": MlflowWriter}
