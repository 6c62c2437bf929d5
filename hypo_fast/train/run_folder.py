"""The run folder records what made it, and decides whether a new start may use it.

``OUT/run.json`` holds the resolved config and the fingerprints of the data of the run that owns the
folder, and one entry per leg (start or resume). A start into a folder that holds a run

* continues it (``output.resume: auto``, the default) only when the config — apart from the settings
  that may change between legs, such as ``optim.max_steps`` or the logging cadence — and the data are
  the same as the run's;
* refuses, listing every difference, when they differ or when ``output.resume: never``;
* starts over when ``output.overwrite: true`` (the old run's checkpoints, logs and record go first);
* continues from a named checkpoint when ``output.resume`` is its path, whatever changed (the changes
  are recorded in the run's history).

Logs never mix runs: a resumed leg drops the rows its replayed steps would write twice.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hypo_fast.train import checkpoint
from hypo_fast.train.config import TrainConfig, config_to_dict
from hypo_fast.train.errors import UserError

RUN_RECORD = "run.json"
# settings a continued run may change: cadence, length and where the data files live (data is compared by
# content); anything else changes what the run computes
MAY_CHANGE = ("optim.max_steps", "output.resume", "output.overwrite", "output.save_every", "output.keep_last",
              "output.log_every", "output.report_to", "eval.every", "distributed.timeout_minutes",
              "data.train_file", "data.eval_file", "data.prompt_file", "data.skip_bad_rows")


class RunFolderError(UserError):
    """The output folder holds a run this start may not continue (the message lists why)."""


@dataclass(frozen=True)
class Start:
    """What a start does: continue from ``resume_from`` (a checkpoint folder) or begin at step 0."""

    resume_from: Path | None
    overwrite: bool  # delete the folder's old run first
    changes: tuple[str, ...]  # differences accepted by an explicit resume


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "config":  # model.config compares as one value
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _defaults() -> dict:
    return _flat(json.loads(json.dumps(config_to_dict(TrainConfig()))))


def differences(old_config: dict, new_config: dict, old_data: dict, new_data: dict) -> list[str]:
    """``key: old → new`` for every setting that changes what the run computes, and every changed dataset.

    A key the old record lacks (a setting added by a later release) is unchanged at its default."""
    old, new = _flat(json.loads(json.dumps(old_config))), _flat(json.loads(json.dumps(new_config)))
    defaults = _defaults()
    old.update({k: defaults[k] for k in set(new) - set(old) if k in defaults})
    found = [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}"
             for k in sorted(set(old) | set(new)) if k not in MAY_CHANGE and old.get(k) != new.get(k)]
    found += [f"data ({name}): the contents changed" for name in sorted(set(old_data) | set(new_data))
              if old_data.get(name) != new_data.get(name)]
    return found


def _holds_a_run(out: Path) -> bool:
    return (out / RUN_RECORD).exists() or bool(checkpoint.list_checkpoints(out)) or (out / "metrics.jsonl").exists()


def decide(out: Path, config: dict, data: dict, resume: str, overwrite: bool) -> Start:
    """Read-only: what this start may do with ``out`` (every rank calls it before anything is written)."""
    if overwrite or not _holds_a_run(out):
        return Start(None, overwrite and _holds_a_run(out), ())
    record = json.loads((out / RUN_RECORD).read_text()) if (out / RUN_RECORD).exists() else None
    how = "set output.overwrite=true to start over"
    if resume == "never":
        raise RunFolderError(f"output.dir {out} already holds a run ({_describe(out)}); {how}, or "
                             "output.resume=auto to continue it")
    if resume != "auto":  # an explicit checkpoint: the user asked to continue from it, whatever changed
        folder = Path(resume)
        checkpoint.verify(folder)
        changes = differences(record["config"], config, record["data"], data) if record else ["(no run record)"]
        return Start(folder, False, tuple(changes))
    if record is None:
        raise RunFolderError(f"output.dir {out} holds checkpoints or logs but no {RUN_RECORD}, so what made them "
                             f"is unknown; {how}, or output.resume=<checkpoint folder> to continue from one")
    changed = differences(record["config"], config, record["data"], data)
    if changed:
        raise RunFolderError(f"output.dir {out} holds a run with other settings:\n  " + "\n  ".join(changed)
                             + f"\n{how}, output.dir=<new folder> for a new run, or "
                               "output.resume=<checkpoint folder> to continue from a checkpoint with the new settings")
    return Start(checkpoint.latest_intact_checkpoint(out), False, ())


def _describe(out: Path) -> str:
    found = checkpoint.list_checkpoints(out)
    return f"checkpoints up to step {found[-1][0]}" if found else "logs, no checkpoint"


def apply(out: Path, start: Start, config: dict, data: dict, step: int) -> None:
    """Rank 0 only: clear an overwritten run, drop log rows after ``step``, and record this leg."""
    if start.overwrite:
        for path in [out / name for name in (RUN_RECORD, "config.yaml", "metrics.jsonl", "tensorboard")] + \
                [p for pattern in ("checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*") for p in out.glob(pattern)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    truncate_metrics(out / "metrics.jsonl", step)
    if start.resume_from is None and (out / "tensorboard").exists():
        shutil.rmtree(out / "tensorboard")  # a fresh start: the old attempt's events would mix in
    record_path = out / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {"config": config, "data": data, "legs": []}
    record["legs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": step,
                           "from_checkpoint": str(start.resume_from) if start.resume_from else None,
                           "changes": list(start.changes)})
    if start.changes:  # an explicit resume with new settings: the record follows the run
        record["config"], record["data"] = config, data
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.rename(record_path)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of steps ≤ ``step`` (a resumed leg replays the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
