"""Errors a user can fix. The CLI prints their message on one line and exits with status 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad configuration, data, run folder or checkpoint; the message names the key, file, row or folder."""


class ConfigError(UserError):
    """A bad configuration key or value (the message names the dotted key)."""
