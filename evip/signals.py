"""Preemption signals: a handler only records the signal; the trainer acts at the next step boundary.

SLURM sends SIGUSR1 (`--signal`) before a time limit or preemption, and SIGTERM before a kill.
The trainer all-reduces `requested` so every rank checkpoints at the same step, then exits with
evip.exit_codes.PREEMPTED (75).
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Install with `with StopRequest() as stop:`; `stop.requested` is the signal number or 0."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.requested = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def __enter__(self) -> "StopRequest":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written."""


class TooManyNonFinite(Exception):
    """Too many non-finite steps in a row; a checkpoint was written."""
