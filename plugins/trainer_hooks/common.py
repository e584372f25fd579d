"""Helpers shared by the built-in trainer hooks: periodic triggers and parameter checks."""

from __future__ import annotations

import time


def every(count: int, period: int | None) -> bool:
    return period is not None and count % period == 0


def check_counts(hook: str, **counts: int | None) -> None:
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"the {hook!r} trainer hook's {key} must be at least 1 (or null: off), got {value}")


class Rate:
    """Images per second between two calls of ``update``."""

    def __init__(self, step: int):
        self.last_time, self.last_step = time.perf_counter(), step

    def update(self, step: int, batch_size: int) -> float:
        now = time.perf_counter()
        rate = batch_size * (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        return rate
