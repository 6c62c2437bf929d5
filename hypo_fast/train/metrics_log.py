"""Run logging on rank 0: a progress bar, a JSONL metrics file, TensorBoard."""

from __future__ import annotations

import json
import logging
import time
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
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = self.bar = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed leg replays the steps after its checkpoint: TensorBoard drops their old events
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                log.warning("tensorboard is not installed: TensorBoard logging is off")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="hypo-fast", dynamic_ncols=True)
        self.started = time.time()

    def log(self, step: int, metrics: dict, advance: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        if advance and self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {k: metrics[k] for k in ("loss", "kl/online", "tokens_per_s") if k in metrics}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
