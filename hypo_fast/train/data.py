"""Preference and prompt data: local files in TRL's formats, tokenised, truncated, streamed reproducibly.

Formats (as TRL's): *standard* rows ``{"prompt": str, "chosen": str, "rejected": str}`` and
*conversational* rows whose fields are lists of ``{"role", "content"}`` messages, rendered with the
tokenizer's chat template. Prompt-only sets need just ``prompt``. Files: ``.jsonl``, ``.json`` (a list
of rows), ``.parquet``, or a folder written by ``datasets.Dataset.save_to_disk``. Files are only read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from hypo_fast.seeds import derive_seed
from hypo_fast.train.errors import UserError

log = logging.getLogger(__name__)


class DataError(UserError):
    """A malformed data file or row (the message names the file and row)."""


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    prompt: str  # rendered prompt text (for rewards and logs)


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    text: str


@dataclass
class DataStats:
    rows: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped: int = 0
    bad_rows: int = 0
    notes: list[str] = field(default_factory=list)


def read_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for every row of a local data file or saved dataset folder, in order.

    ``where`` names the file and row (or line). A row that cannot be read (bad UTF-8, bad JSON) comes as a
    :class:`DataError` in place of the row, so the caller raises it or, with ``skip_bad_rows``, counts it;
    a file that cannot be read at all raises at once.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix == ".parquet":
        for number, row in enumerate(_read_dataset(path), start=1):
            yield f"{path}: row {number}", row
        return
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: not valid UTF-8 JSON ({err})") from err
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        for number, row in enumerate(rows, start=1):
            yield f"{path}: row {number}", row
        return
    with path.open("rb") as lines:  # JSON Lines, one row per line, each read on its own
        for number, raw in enumerate(lines, start=1):
            where = f"{path}: line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, DataError(f"{where}: not valid JSON ({err.msg})")


def _read_dataset(path: Path):
    import datasets

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet

            pyarrow.parquet.read_metadata(path)  # a damaged file fails here, before datasets logs about it
            return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DataError(f"{path}: a folder, but not a dataset saved with datasets' save_to_disk")
        loaded = datasets.load_from_disk(str(path))
    except DataError:
        raise
    except Exception as err:  # a truncated or foreign file: name it, not pyarrow's internals
        raise DataError(f"{path}: cannot be read as a dataset ({type(err).__name__}: {err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict with splits {sorted(loaded)}; point at one split's folder")
    return loaded


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render(row: dict, keys: tuple[str, ...], tokenizer, where: str) -> tuple[str, ...]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (has {sorted(row)})")
    values = [row[k] for k in keys]
    if all(isinstance(v, str) for v in values):
        if any(not v.strip() for v in values):
            raise DataError(f"{where}: field {keys[[not v.strip() for v in values].index(True)]!r} is empty")
        return tuple(values)
    if all(_is_messages(v) for v in values):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: conversational row but the tokenizer has no chat template")
        try:
            prompt = tokenizer.apply_chat_template(values[0], tokenize=False, add_generation_prompt=True)
            fulls = [tokenizer.apply_chat_template(values[0] + completion, tokenize=False) for completion in values[1:]]
        except Exception as err:  # the template's own checks (e.g. roles must alternate) raise anything
            raise DataError(f"{where}: the chat template rejected the row ({type(err).__name__}: {err})") from err
        rendered = [prompt]
        for full in fulls:
            if not full.startswith(prompt):
                raise DataError(f"{where}: the chat template does not extend the prompt with the completion")
            rendered.append(full[len(prompt):])
        return tuple(rendered)
    raise DataError(f"{where}: fields {list(keys)} must all be strings or all be message lists")


class Tokenization:
    """Turns rendered text into truncated token ids, counting what was cut."""

    def __init__(self, tokenizer, max_prompt_length: int, max_length: int, stats: DataStats):
        self.tokenizer, self.max_prompt_length, self.max_length, self.stats = tokenizer, max_prompt_length, max_length, stats
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def prompt(self, text: str) -> tuple[int, ...]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_prompt_length:
            self.stats.prompts_truncated += 1
            bos = self.tokenizer.bos_token_id
            head = [bos] if ids and ids[0] == bos and bos is not None else []
            ids = head + ids[len(ids) - (self.max_prompt_length - len(head)):]  # BOS, then the prompt's end
        return tuple(ids)

    def response(self, text: str, prompt_len: int) -> tuple[int, ...]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.eos
        room = self.max_length - prompt_len
        if len(ids) > room:
            self.stats.responses_truncated += 1
            ids = ids[:room]
        return tuple(ids)


def _rendered_rows(path, keys: tuple[str, ...], tokenizer, skip_bad_rows: bool, stats: DataStats):
    """Yield each row's rendered text fields; a malformed row raises (or, with skip_bad_rows, is counted)."""
    for where, row in read_rows(path):
        stats.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            yield _render(row, keys, tokenizer, where)
        except DataError as err:
            if not skip_bad_rows:
                raise
            stats.bad_rows += 1
            log.warning("skipped %s", err)


def load_pairs(path, tokenizer, max_prompt_length: int, max_length: int,
               skip_bad_rows: bool = False) -> tuple[list[PreferencePair], DataStats]:
    stats = DataStats()
    tok = Tokenization(tokenizer, max_prompt_length, max_length, stats)
    pairs = []
    for prompt, chosen, rejected in _rendered_rows(path, ("prompt", "chosen", "rejected"), tokenizer,
                                                   skip_bad_rows, stats):
        prompt_ids = tok.prompt(prompt)
        chosen_ids, rejected_ids = tok.response(chosen, len(prompt_ids)), tok.response(rejected, len(prompt_ids))
        if not chosen_ids or not rejected_ids:
            stats.dropped += 1
            continue
        pairs.append(PreferencePair(prompt_ids, chosen_ids, rejected_ids, prompt))
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({stats.rows} rows, {stats.bad_rows} bad)")
    return pairs, stats


def load_prompts(path, tokenizer, max_prompt_length: int, skip_bad_rows: bool = False) -> tuple[list[Prompt], DataStats]:
    stats = DataStats()
    tok = Tokenization(tokenizer, max_prompt_length, max_prompt_length + 1, stats)
    prompts = [Prompt(tok.prompt(text), text)
               for (text,) in _rendered_rows(path, ("prompt",), tokenizer, skip_bad_rows, stats)]
    if not prompts:
        raise DataError(f"{path}: no usable prompts")
    return prompts, stats


class Stream:
    """Endless, reproducible order over ``n`` items: a fresh seeded permutation per epoch.

    Each call to :meth:`take` returns this rank's share of the next global batch; ``state()`` /
    ``load_state()`` make resumption continue with exactly the next batch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, name: str = "order"):
        if n < 1:
            raise DataError("nothing to stream")
        self.n, self.seed, self.rank, self.world, self.name = n, seed, rank, world, name
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.name, epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def _next(self) -> int:
        if self.position == self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        self.position += 1
        return self._order[self.position - 1]

    def take(self, per_rank: int) -> list[int]:
        batch = [self._next() for _ in range(per_rank * self.world)]
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
