"""Preference and prompt data sources: local files, saved ``datasets`` folders, Hub names; streamed reproducibly.

Formats (TRL's): *standard* rows ``{"prompt": str, "chosen": str, "rejected": str}``, *conversational* rows
whose fields are lists of ``{"role", "content"}`` messages, and the *implicit-prompt* form (only
``chosen``/``rejected``, sharing the prompt). Prompt-only sets need just ``prompt``. Sources: ``.jsonl``,
``.json`` (a list of rows), ``.parquet``, ``.csv``, a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (with ``data.split``), a folder of data files read as ``datasets.load_dataset``
reads it (json/jsonl/csv/parquet; splits from the file names, e.g. ``train.jsonl`` and ``test.jsonl``, or
from ``data.data_files``), or a Hub dataset name, which ``datasets`` resolves itself when online. A file or
a saved single ``Dataset`` has one split (``datasets`` calls a file's ``train``): a ``data.split`` that
names another is an error, never silently ignored. Files are only read. Turning rows into token ids is
:mod:`hypo_fast.train.tokenization`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from hypo_fast.seeds import derive_seed
from hypo_fast.train.errors import UserError
from hypo_fast.train.fingerprint import Fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how its rows become token ids: the ``data`` section of ``hypo-fast train``, and
    the settings :mod:`hypo_fast.train.tokenization` reads (its rules are those of ``TOKENIZE_FIELDS``)."""

    train_file: str | None = None  # JSONL / JSON / Parquet file, a saved `datasets` folder, or a Hub dataset name
    split: str | None = None  # the split of a saved DatasetDict or Hub dataset (default: train)
    data_files: Any = None  # a folder's files per split, as datasets.load_dataset takes them ({train: a.jsonl, …})
    eval_file: str | None = None
    eval_split: str | None = None  # held-out pairs from this split of train_file's dataset
    prompt_file: str | None = None  # prompt-only set for online sampling (default: the train prompts)
    eval_fraction: float = 0.0  # held out of train_file when there is neither eval_file nor eval_split
    max_length: int | None = 1024  # prompt + completion per sequence; the completion's end is cut (TRL 1.16)
    max_prompt_length: int | None = None  # also cut prompts, keeping BOS and their end (TRL ≤ 0.27's option)
    eos: str = "trl"  # trl: EOS appended to string completions only (TRL 1.16) | ensure: to every completion
    skip_bad_rows: bool = False
    cache_dir: str | None = None  # tokenized data cache (default: the `datasets` cache folder)


TOKENIZE_FIELDS = ("max_length", "max_prompt_length", "eos", "skip_bad_rows")  # what a tokenized table depends on


class DataError(UserError):
    """A malformed data file or row (the message names the file and row)."""


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    prompt: str  # rendered prompt text (for rewards and logs)

    @property
    def ids(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(prompt, chosen, rejected)`` token ids, as ``pack_step`` takes them."""
        return self.prompt_ids, self.chosen_ids, self.rejected_ids

    @property
    def packed_tokens(self) -> int:
        """Tokens the pair occupies in a step batch (its prompt packed once per response)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


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
    """``(where, row)`` for every row of a ``.json`` (a list of rows) or JSON Lines file, in order.

    ``where`` names the file and row (or line). A line that cannot be read (bad UTF-8, bad JSON) comes as a
    :class:`DataError` in place of the row, so the caller raises it or, with ``skip_bad_rows``, counts it;
    a ``.json`` file that cannot be read at all raises at once.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
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


class Source:
    """One data source as a ``datasets.Dataset``, with a name for each row and a fingerprint of its contents.

    JSON and JSON Lines files are read here, line by line, so that a bad line is named (and can be skipped)
    instead of failing the whole file; everything else is read by ``datasets``.
    """

    def __init__(self, spec: str | Path, split: str | None = None, split_key: str = "data.split", data_files=None):
        self.name, self.split, self.split_key, self.data_files = str(spec), split, split_key, data_files
        self.path = Path(spec)
        self._dataset = None
        if not self.path.exists() and not _looks_like_hub_name(self.name):
            raise DataError(f"{spec}: no such file or folder")
        if self.is_lines or self.path.suffix in (".parquet", ".csv"):
            check_single_split(split, "train", split_key, self.name)

    @property
    def is_lines(self) -> bool:
        return self.path.is_file() and self.path.suffix not in (".parquet", ".csv")

    def fingerprint(self) -> str:
        if self.path.is_file():
            return Fingerprint().add_file(self.path).hex(None)
        return self.dataset()._fingerprint  # saved folders and Hub datasets carry their own

    def dataset(self):
        if self._dataset is None:
            self._dataset = self._lines() if self.is_lines else \
                _read_dataset(self.path, self.name, self.split, self.split_key, self.data_files)
        return self._dataset

    def _lines(self):
        import datasets

        where, rows, errors = [], [], []
        for w, row in read_rows(self.path):
            where.append(w)
            bad = isinstance(row, DataError)
            rows.append("" if bad else json.dumps(row))
            errors.append(str(row) if bad else "")
        return datasets.Dataset.from_dict({"where": where, "row": rows, "read_error": errors})

    def where(self, example: dict, index: int) -> str:
        return example["where"] if self.is_lines else f"{self.name}: row {index + 1}"

    def row(self, example: dict, where: str):
        """The row as a plain object (raises the read error of a line that could not be read)."""
        if not self.is_lines:
            return dict(example)  # datasets hands map functions a lazy row
        if example["read_error"]:
            raise DataError(example["read_error"])
        return json.loads(example["row"])


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def check_single_split(split: str | None, own: str, split_key: str, name: str) -> None:
    """A source with one split (``own``) accepts no ``split`` or that one; any other is an error naming the key."""
    if split is not None and split != own:
        raise DataError(f"{split_key}: {split!r}, but {name} holds a single split ({own!r}), not a DatasetDict; "
                        f"unset {split_key} or name a source that has the split")


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def is_data_folder(path: Path) -> bool:
    """A folder of data files (not a ``save_to_disk`` folder): what ``datasets.load_dataset(folder)`` reads."""
    return path.is_dir() and any(p.suffix in DATA_FILE_SUFFIXES and p.is_file() for p in path.rglob("*"))


def _read_folder(path: Path, name: str, split: str | None, data_files):
    """One split of a folder of data files, read as ``datasets.load_dataset(folder, data_files=...)`` reads
    it: splits come from the file names (``train.jsonl``, ``test.jsonl``, ``data/train-*.parquet``, …) or
    from ``data_files``; a split the folder lacks is an error naming the ones it has."""
    import datasets

    try:
        loaded = datasets.load_dataset(str(path), data_files=data_files)
    except Exception as err:  # mixed formats, a damaged file, files that match no split
        raise DataError(f"{name}: cannot be read as a folder of data files ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err
    chosen = split or "train"
    if chosen not in loaded:
        raise DataError(f"{name}: the folder's splits are {sorted(loaded)} (from its file names or data_files); "
                        f"there is no split {chosen!r} (set data.split / data.eval_split, TRL's dataset_train_split "
                        "/ dataset_test_split, to one of them)")
    return loaded[chosen]


def _read_dataset(path: Path, name: str, split: str | None, split_key: str = "data.split", data_files=None):
    import datasets

    try:
        if not path.exists():  # a Hub name: datasets resolves it (its own cache first; never in tests)
            return datasets.load_dataset(name, split=split or "train")
        if path.suffix == ".parquet":
            import pyarrow.parquet

            pyarrow.parquet.read_metadata(path)  # a damaged file fails here, before datasets logs about it
            return datasets.Dataset.from_parquet(str(path))
        if path.suffix == ".csv":
            return datasets.Dataset.from_csv(str(path))
        saved = any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))
        if not saved and is_data_folder(path):
            return _read_folder(path, name, split, data_files)
        if not saved:
            raise DataError(f"{path}: a folder, but not a dataset saved with datasets' save_to_disk, nor a folder "
                            f"of data files ({', '.join(DATA_FILE_SUFFIXES)})")
        loaded = datasets.load_from_disk(str(path))
    except DataError:
        raise
    except Exception as err:  # a truncated or foreign file, an unreachable Hub: name it, not the internals
        what = "cannot be read as a dataset" if path.exists() else "is not a local file or folder, and datasets " \
                                                                     "could not load it from the Hub"
        raise DataError(f"{name}: {what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or "train"
        if chosen not in loaded:
            raise DataError(f"{split_key}: {chosen!r}, but {name} is a DatasetDict with splits {sorted(loaded)}; "
                            f"set {split_key} to one of them")
        return loaded[chosen]
    if path.exists():  # a saved single Dataset (a Hub load above already picked its split)
        check_single_split(split, str(loaded.split) if loaded.split else "train", split_key, name)
    return loaded


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
