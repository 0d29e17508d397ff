"""Where training stands and when it stops: the position a checkpoint records, the clock of
training time, the limits of the training budget (steps, epochs, minutes, patience), and
SIGINT/SIGTERM turned into a stop.

This module imports only :mod:`transformer.config` from the rest of the package.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

from transformer.config import TrainConfig


@dataclass
class Position:
    """Where training stands: the step done, and the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch within this rank's batches of `epoch`
    elapsed: float = 0.0  # seconds spent training, over all resumptions
    best_bleu: float = -1.0
    bad_evals: int = 0  # validations in a row without a better BLEU
    nonfinite: int = 0  # non-finite steps in a row
    validation_due: bool = False  # a signal stopped the run where it validates: the resumed run validates first


class Clock:
    """Seconds of training over all resumptions. Validation is not training: the clock restarts
    after each one, from the time the position records."""

    def __init__(self, elapsed: float) -> None:
        self.restart(elapsed)

    def restart(self, elapsed: float) -> None:
        self.start, self.before = time.perf_counter(), elapsed

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start


def stop_reason(tc: TrainConfig, position: Position, batches_per_epoch: int) -> str | None:
    """Why training must stop at `position` ("step limit", ...), or None while the budget lasts."""
    if tc.max_steps and position.step >= tc.max_steps:
        return "step limit"
    if tc.max_epochs and position.epoch + (position.batch >= batches_per_epoch) >= tc.max_epochs:
        return "epoch limit"
    if tc.max_minutes and position.elapsed >= tc.max_minutes * 60:
        return "time limit"
    if tc.patience and position.bad_evals >= tc.patience:
        return f"no better validation BLEU in {tc.patience} validations"
    return None


def budget_used(tc: TrainConfig, position: Position, batches_per_epoch: int) -> float:
    """Fraction of the training budget spent so far: the largest over the step, epoch and minute limits set."""
    fractions = [0.0]
    if tc.max_steps:
        fractions.append(position.step / tc.max_steps)
    if tc.max_epochs:
        fractions.append((position.epoch + position.batch / max(batches_per_epoch, 1)) / tc.max_epochs)
    if tc.max_minutes:
        fractions.append(position.elapsed / (tc.max_minutes * 60))
    return min(1.0, max(fractions))


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run saves before leaving.

    A context manager: the previous handlers are put back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.elsewhere = False  # another rank was signalled: this one stops as if it had been too
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @property
    def exit_signal(self) -> int | None:
        """The signal the process exits with (128 + its number): its own, SIGTERM for one that another
        rank received, or None when no rank was signalled."""
        return self.signal if self.signal is not None else (signal.SIGTERM if self.elsewhere else None)

    @property
    def reason(self) -> str:
        """The stop reason the run logs for the signal received (here or, with none here, on another rank)."""
        return f"signal {signal.Signals(self.signal).name}" if self.signal is not None else "signal to another rank"
