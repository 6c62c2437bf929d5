"""Rows → token ids exactly as TRL 1.16's ``DPOTrainer`` makes them, tokenized once per data and tokenizer.

Per row (standard rows hold strings, conversational rows lists of ``{"role", "content"}`` messages):

* **implicit prompt**: a row without ``prompt`` gets the longest common prefix of ``chosen`` and
  ``rejected`` (characters or whole messages; where they differ after a space, the space starts the
  completions; where one is a prefix of the other, its last element is the completion and the prompt keeps
  any space before it, as TRL's ``extract_prompt`` does);
* **standard rows**: the EOS string is appended to each completion that does not already end with it;
  ``prompt`` and ``prompt + completion`` are tokenized with the tokenizer's special tokens (so BOS comes
  once, from the tokenizer);
* **conversational rows**: ``apply_chat_template(tokenize=True)`` renders the prompt (with the generation
  prompt) and the prompt + completion, with the row's own ``tools`` (a list, or its JSON text) and
  ``chat_template_kwargs`` (e.g. ``enable_thinking: false``); BOS comes only from the template, and no EOS is appended (the
  template ends the turn). ``data.eos: ensure`` (not TRL's behaviour) appends EOS to any completion that
  holds none, for templates whose turns end without one (a turn ending "EOS + newline" is left alone);
* **split**: the prompt is the tokens the prompt shares with both full sequences; the rest are the
  completions (so a template that re-tokenizes across the boundary is split where TRL splits it); a prompt
  end left out that way is warned about once per data set, with the number of rows, as TRL warns;
* **truncation** (TRL's ``keep_start``): each prompt + completion is cut to ``max_length`` tokens at the
  end of the completion; a row whose prompt alone fills ``max_length`` is dropped. ``max_prompt_length``
  (TRL ≤ 0.27's name) additionally cuts long prompts, keeping BOS and the prompt's end.

Everything runs in ``datasets.Dataset.map`` with a cache file named by a fingerprint of the data, the
tokenizer and these settings, so a second start reads the cache instead of tokenizing again. Bad rows keep
their names (file and line or row) and are raised, or counted and skipped with ``skip_bad_rows``; a
row whose chosen and rejected tokens are the same (after truncation) is a bad row: it has nothing to prefer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from hypo_fast.train.data import TOKENIZE_FIELDS, DataConfig, DataError, DataStats, PreferencePair, Prompt, Source
from hypo_fast.train.fingerprint import Fingerprint

log = logging.getLogger("hypo_fast")
FORMAT_VERSION = 2  # bump when the rules above change: old cache files are then never read
PAIR_KEYS, PROMPT_KEYS = ("prompt", "chosen", "rejected"), ("prompt",)


def is_conversational(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def implicit_prompt(row: dict, where: str) -> dict:
    """Split ``chosen``/``rejected`` that both start with the prompt into ``prompt`` + completions."""
    chosen, rejected = row["chosen"], row["rejected"]
    shorter = min(len(chosen), len(rejected))
    differ = next((i for i in range(shorter) if chosen[i] != rejected[i]), None)
    if differ is None:  # one is a prefix of the other: its last element is the completion (TRL's rule)
        shared = shorter - 1
    else:
        shared = differ
        if isinstance(chosen, str) and shared > 0 and chosen[shared - 1] == " ":
            shared -= 1  # the separating space starts the completions
    if shared <= 0:
        raise DataError(f"{where}: no 'prompt' field, and chosen and rejected share no prefix to take as one")
    return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _check_fields(row, keys: tuple[str, ...], where: str) -> str:
    """The row's format, ``"standard"`` or ``"conversational"``; raises naming what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (has {sorted(row)})")
    values = [row[k] for k in keys]
    if all(isinstance(v, str) for v in values):
        empty = [k for k, v in zip(keys, values) if not v.strip()]
        if empty:
            raise DataError(f"{where}: field {empty[0]!r} is empty")
        return "standard"
    if all(is_conversational(v) for v in values):
        return "conversational"
    raise DataError(f"{where}: fields {list(keys)} must all be strings or all be message lists")


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _template_kwargs(row: dict, where: str) -> dict:
    """The row's ``tools`` (a list, or its JSON text) and ``chat_template_kwargs``, as TRL passes them."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: field 'tools' is not valid JSON ({err.msg})") from err
    extra = row.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: field 'chat_template_kwargs' must be a mapping, got {type(extra).__name__}")
    return {"tools": tools, **extra}


class RowTokenizer:
    """Tokenizes one row the TRL way (see the module docstring); raises :class:`DataError` naming it."""

    def __init__(self, tokenizer, settings: DataConfig):
        self.tok, self.settings = tokenizer, settings
        self.eos_id, self.eos_text = tokenizer.eos_token_id, tokenizer.eos_token
        self.left_out = ""  # the prompt end the last pair() left out of its sequences (see the module docstring)

    def _template(self, messages, where: str, **kwargs) -> list[int]:
        if getattr(self.tok, "chat_template", None) is None:
            raise DataError(f"{where}: conversational row but the tokenizer has no chat template")
        try:
            out = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        except Exception as err:  # the template's own checks (e.g. roles must alternate) raise anything
            raise DataError(f"{where}: the chat template rejected the row ({type(err).__name__}: {err})") from err
        return list(out["input_ids"])

    def _text(self, text: str) -> list[int]:
        return list(self.tok(text=text)["input_ids"])

    def prompt(self, row, where: str) -> tuple[list[int], str]:
        """``(prompt ids, prompt text)`` of a prompt-only row."""
        if _check_fields(row, PROMPT_KEYS, where) == "standard":
            return self._text(row["prompt"]), row["prompt"]
        ids = self._template(row["prompt"], where, add_generation_prompt=True)
        return ids, self.tok.decode(ids)

    def pair(self, row, where: str) -> tuple[list[int], list[int], list[int], str]:
        """``(prompt ids, chosen ids, rejected ids, prompt text)`` before truncation."""
        if isinstance(row, dict) and "prompt" not in row and "chosen" in row and "rejected" in row:
            row = implicit_prompt(row, where)
        if _check_fields(row, PAIR_KEYS, where) == "standard":
            prompt, text = self._text(row["prompt"]), row["prompt"]
            ends = [c if self.eos_text is None or c.endswith(self.eos_text) else c + self.eos_text
                    for c in (row["chosen"], row["rejected"])]
            full = [self._text(row["prompt"] + c) for c in ends]
        else:
            extra = _template_kwargs(row, where)
            prompt = self._template(row["prompt"], where, add_generation_prompt=True, **extra)
            full = [self._template(row["prompt"] + row[k], where, **extra) for k in ("chosen", "rejected")]
            text = self.tok.decode(prompt)
        n = min(_shared_prefix(prompt, f) for f in full)
        self.left_out = self.tok.decode(prompt[n:]) if n < len(prompt) else ""
        chosen, rejected = (f[n:] for f in full)
        if self.settings.eos == "ensure" and self.eos_id is not None:
            chosen, rejected = (c if self.eos_id in c else c + [self.eos_id] for c in (chosen, rejected))
        return prompt[:n], chosen, rejected, text

    def truncate_prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        limit = self.settings.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids, False
        bos = self.tok.bos_token_id
        head = [bos] if bos is not None and ids[0] == bos else []
        return head + ids[len(ids) - (limit - len(head)):], True  # BOS, then the prompt's end


def _tokenize_pairs(example, index, *, row_tokenizer: RowTokenizer, source: Source):
    where = source.where(example, index)
    out = {"error": "", "prompt_cut": False, "completion_cut": False, "left_out": ""}
    try:
        prompt, chosen, rejected, text = row_tokenizer.pair(source.row(example, where), where)
        out["left_out"] = row_tokenizer.left_out
        if not chosen or not rejected:
            raise DataError(f"{where}: a completion renders to no tokens")
        prompt, out["prompt_cut"] = row_tokenizer.truncate_prompt(prompt)
        limit = row_tokenizer.settings.max_length
        if limit is not None:
            if len(prompt) >= limit:  # TRL keep_start: nothing of the completion would be left
                return {**out, "prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_text": "",
                        "dropped": True}
            room = limit - len(prompt)
            out["completion_cut"] = len(chosen) > room or len(rejected) > room
            chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:  # nothing to prefer: the pair's loss is a constant
            cut = " after truncation to data.max_length" if out["completion_cut"] else ""
            raise DataError(f"{where}: chosen and rejected are the same{cut}")
        return {**out, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "prompt_text": text,
                "dropped": False}
    except DataError as err:
        return {**out, "error": str(err), "prompt_ids": [], "chosen_ids": [], "rejected_ids": [],
                "prompt_text": "", "dropped": False}


def _tokenize_prompts(example, index, *, row_tokenizer: RowTokenizer, source: Source):
    where = source.where(example, index)
    try:
        ids, text = row_tokenizer.prompt(source.row(example, where), where)
        ids, cut = row_tokenizer.truncate_prompt(ids)
        return {"error": "", "prompt_ids": ids, "prompt_text": text, "prompt_cut": cut}
    except DataError as err:
        return {"error": str(err), "prompt_ids": [], "prompt_text": "", "prompt_cut": False}


def cache_key(source: Source, tokenizer, settings: DataConfig, kind: str) -> str:
    return Fingerprint(json.dumps([FORMAT_VERSION, kind, source.fingerprint(),
                                  {k: getattr(settings, k) for k in TOKENIZE_FIELDS}]),
                       datasets.fingerprint.Hasher.hash(tokenizer)).hex(32)


def _tokenized(source: Source, tokenizer, settings: DataConfig, kind: str, cache_dir: Path | None):
    """The tokenized table: read from the cache file when this data, tokenizer and settings were seen before."""
    key = cache_key(source, tokenizer, settings, kind)
    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = str(cache_dir / f"{kind}-{key}.arrow")
        if Path(cache).exists():
            return datasets.Dataset.from_file(cache)
    dataset = source.dataset()
    if len(dataset) == 0:
        raise DataError(f"{source.name}: no rows (an empty file or dataset)")
    fn = _tokenize_pairs if kind == "pairs" else _tokenize_prompts
    return dataset.map(fn, with_indices=True, fn_kwargs={"row_tokenizer": RowTokenizer(tokenizer, settings),
                                                           "source": source},
                       remove_columns=dataset.column_names, cache_file_name=cache, load_from_cache_file=True,
                       new_fingerprint=key, desc=f"tokenizing {source.name}")


def _bad_rows(errors: list[str], settings: DataConfig, stats: DataStats) -> None:
    bad = [e for e in errors if e]
    if bad and not settings.skip_bad_rows:
        more = f" (and {len(bad) - 1} more bad rows, the next: {bad[1]})" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; data.skip_bad_rows=true skips and counts them")
    for err in bad:
        log.warning("skipped %s", err)
    stats.bad_rows += len(bad)


def load_pairs(source: Source | str | Path, tokenizer, settings: DataConfig = DataConfig(),
               cache_dir: Path | None = None) -> tuple[list[PreferencePair], DataStats]:
    """Preference pairs of ``source``, tokenized as TRL does (cached), with what was cut or dropped counted."""
    source = source if isinstance(source, Source) else Source(source)
    table = _tokenized(source, tokenizer, settings, "pairs", cache_dir)
    columns = table.to_dict()
    stats = DataStats(rows=len(table))
    _bad_rows(columns["error"], settings, stats)
    pairs = []
    for prompt, chosen, rejected, text, error, dropped, prompt_cut, completion_cut in zip(
            columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], columns["prompt_text"],
            columns["error"], columns["dropped"], columns["prompt_cut"], columns["completion_cut"]):
        if error:
            continue
        stats.dropped += dropped
        stats.prompts_truncated += prompt_cut
        stats.responses_truncated += completion_cut
        if not dropped:
            pairs.append(PreferencePair(tuple(prompt), tuple(chosen), tuple(rejected), text))
    _warn_left_out(source.name, columns["left_out"])
    if not pairs:
        raise DataError(f"{source.name}: no usable preference pairs ({stats.rows} rows, {stats.bad_rows} bad, "
                        f"{stats.dropped} whose prompt fills max_length)")
    return pairs, stats


def _warn_left_out(name: str, left_out: list[str]) -> None:
    tails = [t for t in left_out if t]
    if tails:
        log.warning("%s: in %d of %d rows the tokenized prompt is not a prefix of the tokenized prompt + completion "
                    "(the chat template renders the prompt alone differently, or tokens merge across the boundary); "
                    "the completion starts where they diverge, and this end of the prompt is left out of the training "
                    "sequence, as TRL does (first: %r). Train and inference contexts then differ: use a template that "
                    "renders the prompt the same way in both, or end prompts on a token boundary.",
                    name, len(tails), len(left_out), tails[0])


def load_prompts(source: Source | str | Path, tokenizer, settings: DataConfig = DataConfig(),
                 cache_dir: Path | None = None) -> tuple[list[Prompt], DataStats]:
    """Prompt-only rows for online sampling (the generation prompt added to conversations)."""
    source = source if isinstance(source, Source) else Source(source)
    table = _tokenized(source, tokenizer, settings, "prompts", cache_dir)
    columns = table.to_dict()
    stats = DataStats(rows=len(table))
    _bad_rows(columns["error"], settings, stats)
    prompts = [Prompt(tuple(ids), text) for ids, text, error in
               zip(columns["prompt_ids"], columns["prompt_text"], columns["error"]) if not error]
    stats.prompts_truncated = sum(columns["prompt_cut"])
    if not prompts:
        raise DataError(f"{source.name}: no usable prompts")
    return prompts, stats
