"""The run folder records what made it, and decides whether a new start may use it.

``OUT/run.json`` holds the resolved config and the fingerprints of the data of the run that owns the
folder, and one entry per leg (start or resume). A start into a folder that holds a run

* continues it (``output.resume: auto``, the default) only when the config — apart from the settings
  that may change between legs, such as ``optim.max_steps`` or the logging cadence — and the data are
  the same as the run's;
* refuses, listing every difference, when they differ or when ``output.resume: never``;
* starts over when ``output.overwrite: true`` (the old run's checkpoints, logs and record go first);
* continues from a named checkpoint when ``output.resume`` is its path, whatever changed (the changes
  are recorded in the run's history), also into a new, empty ``output.dir`` (never together with
  ``output.overwrite: true``, which would delete it).

``auto`` follows the run's line: the checkpoints the latest leg wrote and, back through the legs it
continued, those each earlier leg wrote up to the step the next one started from (each checkpoint's
``trainer_state.json`` names the leg that wrote it). Checkpoints of a branch abandoned by an explicit resume
from an older step are neither resumed from nor pruned. When every checkpoint on the line is damaged the
start is refused and nothing is touched. The folder may be moved or copied: ``output.dir`` may change.

Logs never mix runs: a resumed leg drops the rows its replayed steps would write twice (and a row cut
short by a kill or a full disk).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hypo_fast.train import checkpoint
from hypo_fast.train.config import TrainConfig, config_to_dict
from hypo_fast.train.errors import UserError

log = logging.getLogger("hypo_fast")
RUN_RECORD = "run.json"
# settings a continued run may change: cadence, length, and where the run folder and the data files live (data
# is compared by content); anything else changes what the run computes
MAY_CHANGE = ("output.dir", "optim.max_steps", "output.resume", "output.overwrite", "output.save_every", "output.keep_last",
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
    fallbacks: tuple[Path, ...] = ()  # older checkpoints of the run's line, newest first (auto only)


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


def read_record(out: Path) -> dict | None:
    """The run's record, or None when there is none; a damaged one raises :class:`RunFolderError`."""
    path = out / RUN_RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not {"config", "data", "legs"} <= set(record):
            raise ValueError("not a run record")
        return record
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is damaged ({err}); it records what made the run. Nothing was changed: "
                             "restore it, set output.resume=<checkpoint folder> to continue from a checkpoint "
                             "(a new record is started), or output.overwrite=true to start over") from err


def leg_of(folder: Path) -> int | None:
    """The leg of the run that wrote a checkpoint (None: unreadable, or written before legs were recorded)."""
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("leg")
    except (OSError, ValueError, AttributeError):
        return None


def lineage(out: Path, record: dict | None) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints on the run's line, oldest first (see the module docstring)."""
    found = checkpoint.list_checkpoints(out)
    legs = record["legs"] if record else []
    if not legs:
        return found
    highest: dict[int, float] = {}  # leg → the highest step of its checkpoints on the line
    leg, bound = len(legs) - 1, math.inf
    while leg is not None and 0 <= leg < len(legs) and leg not in highest:
        highest[leg] = bound
        bound = min(bound, legs[leg]["from_step"])
        leg = legs[leg].get("from_leg")
    return [(step, folder) for step, folder in found
            if (tag := leg_of(folder)) is None or step <= highest.get(tag, -1)]


def _continued_from_elsewhere(record: dict | None) -> tuple[int, Path] | None:
    """The checkpoint outside this folder that the latest leg started from, when it is still there."""
    if not record or not record["legs"]:
        return None
    leg = record["legs"][-1]
    if leg.get("from_here", True) or not leg.get("from_checkpoint"):
        return None
    folder = Path(leg["from_checkpoint"])
    return (leg["from_step"], folder) if folder.is_dir() else None


def _choose(out: Path, record: dict | None) -> Start:
    """``resume: auto``: the newest intact checkpoint of the run's line; refuses when all are damaged."""
    candidates = lineage(out, record)
    if elsewhere := _continued_from_elsewhere(record):
        candidates = sorted(candidates + [elsewhere])
    damage = []
    for index in range(len(candidates) - 1, -1, -1):
        folder = candidates[index][1]
        try:
            checkpoint.verify(folder)
        except checkpoint.CheckpointError as err:
            log.warning("skipping a damaged checkpoint: %s", err)
            damage.append(str(err))
            continue
        return Start(folder, False, (), tuple(f for _, f in reversed(candidates[:index])))
    way_out = ("Nothing was changed. To start over: output.overwrite=true (deletes them) or output.dir=<new folder>; "
               "to continue from a copy you trust: output.resume=<checkpoint folder>")
    if damage:
        raise RunFolderError(f"output.dir {out}: every checkpoint of the run is damaged ({'; '.join(damage)}). "
                             + way_out)
    legs = record["legs"] if record else []
    if legs and legs[-1].get("from_checkpoint"):
        raise RunFolderError(f"output.dir {out}: the run's last leg continued from {legs[-1]['from_checkpoint']} "
                             f"(step {legs[-1]['from_step']}), which is gone, and wrote no checkpoint. " + way_out)
    return Start(None, False, ())  # the run never saved: it starts again from step 0


def decide(out: Path, config: dict, data: dict, resume: str, overwrite: bool) -> Start:
    """Read-only: what this start may do with ``out`` (every rank calls it before anything is written)."""
    if resume not in ("auto", "never"):  # an explicit checkpoint: continue from it, whatever changed
        return _explicit(out, Path(resume), config, data, overwrite)
    if overwrite or not _holds_a_run(out):
        return Start(None, overwrite and _holds_a_run(out), ())
    record = read_record(out)
    how = "set output.overwrite=true to start over"
    if resume == "never":
        raise RunFolderError(f"output.dir {out} already holds a run ({_describe(out)}); {how}, or "
                             "output.resume=auto to continue it")
    if record is None:
        raise RunFolderError(f"output.dir {out} holds checkpoints or logs but no {RUN_RECORD}, so what made them "
                             f"is unknown; {how}, or output.resume=<checkpoint folder> to continue from one")
    changed = differences(record["config"], config, record["data"], data)
    if changed:
        raise RunFolderError(f"output.dir {out} holds a run with other settings:\n  " + "\n  ".join(changed)
                             + f"\n{how}, output.dir=<new folder> for a new run, or "
                               "output.resume=<checkpoint folder> to continue from a checkpoint with the new settings")
    return _choose(out, record)


def _explicit(out: Path, folder: Path, config: dict, data: dict, overwrite: bool) -> Start:
    if overwrite:
        raise RunFolderError(f"output.resume={folder} and output.overwrite=true: give one (overwrite deletes the "
                             "folder's checkpoints, resume continues from one)")
    if not folder.is_dir():
        raise RunFolderError(f"output.resume: {folder}: no such checkpoint folder")
    checkpoint.verify(folder)
    if not _holds_a_run(out):
        return Start(folder, False, ())
    try:
        record = read_record(out)
    except RunFolderError as err:
        return Start(folder, False, (f"({RUN_RECORD} was damaged: a new record starts; {err.__cause__})",))
    changes = differences(record["config"], config, record["data"], data) if record else ["(no run record)"]
    return Start(folder, False, tuple(changes))


def _describe(out: Path) -> str:
    found = checkpoint.list_checkpoints(out)
    return f"checkpoints up to step {found[-1][0]}" if found else "logs, no checkpoint"


def apply(out: Path, start: Start, config: dict, data: dict, step: int) -> int:
    """Rank 0 only: clear an overwritten run, drop log rows after ``step``, and record this leg; returns the
    leg's number (checkpoints carry it, so ``auto`` can follow the run's line)."""
    if start.overwrite:
        for path in [out / name for name in (RUN_RECORD, "config.yaml", "metrics.jsonl", "tensorboard")] + \
                [p for pattern in ("checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*") for p in out.glob(pattern)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    truncate_metrics(out / "metrics.jsonl", step)
    if start.resume_from is None and (out / "tensorboard").exists():
        shutil.rmtree(out / "tensorboard")  # a fresh start: the old attempt's events would mix in
    record_path = out / RUN_RECORD
    try:
        record = read_record(out)
    except RunFolderError:  # only an explicit resume gets here with a damaged record: keep it aside
        record = None
        record_path.rename(out / f"{RUN_RECORD}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    record = record or {"config": config, "data": data, "legs": []}
    here = start.resume_from is not None and start.resume_from.parent.resolve() == out.resolve()
    record["legs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": step,
                           "from_checkpoint": str(start.resume_from) if start.resume_from else None,
                           "from_here": here, "from_leg": leg_of(start.resume_from) if here else None,
                           "changes": list(start.changes)})
    if start.changes:  # an explicit resume with new settings: the record follows the run
        record["config"], record["data"] = config, data
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.rename(record_path)
    return len(record["legs"]) - 1


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of steps ≤ ``step`` (a resumed leg replays the steps after its checkpoint); a row
    that is not whole JSON (a kill or a full disk cut its write short) is dropped with a warning."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: line %d is not a whole row (a write cut short); dropped", path, number)
            continue
        if row_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
