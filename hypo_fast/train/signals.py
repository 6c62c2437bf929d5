"""Stopping cleanly: SIGTERM (what schedulers send) and SIGINT (Ctrl-C) end the run after the current step.

The handler only records the request; the training loop checks it between steps, saves a checkpoint
and returns normally, so resuming continues exactly. A second SIGINT interrupts at once, as usual.
With several ranks the request is shared, so every rank stops after the same step.
"""

from __future__ import annotations

import signal
import threading

from hypo_fast.train import distributed

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signal.Signals(signum).name

    def requested(self, device) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it after each step)."""
        return distributed.any_rank(self.received is not None, device)
