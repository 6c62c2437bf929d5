"""The one hasher behind every fingerprint: tokenized-data caches, reference caches and ``run.json``."""

from __future__ import annotations

import hashlib
from pathlib import Path


class Fingerprint:
    """A SHA-256 of what a cached or resumed result depends on, fed piece by piece.

    Strings and bytes enter as themselves, anything else as its ``repr`` (token-id tuples, for example), so
    two runs agree exactly when they fed the same pieces in the same order.
    """

    def __init__(self, *items):
        self._digest = hashlib.sha256()
        self.add(*items)

    def add(self, *items) -> "Fingerprint":
        for item in items:
            data = item if isinstance(item, bytes) else (item if isinstance(item, str) else repr(item)).encode()
            self._digest.update(data)
        return self

    def add_file(self, path: str | Path, chunk_bytes: int = 1 << 24) -> "Fingerprint":
        """The file's contents (read in chunks: data files can be large)."""
        with Path(path).open("rb") as f:
            while chunk := f.read(chunk_bytes):
                self._digest.update(chunk)
        return self

    def hex(self, length: int | None = 24) -> str:
        return self._digest.hexdigest()[:length]
