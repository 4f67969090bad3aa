"""A clock the test moves by hand: what the scheduler, the health monitor and the pool are given
instead of time.monotonic, so a test says how much time passes instead of waiting for it."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
