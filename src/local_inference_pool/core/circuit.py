"""Passive health: a circuit breaker per backend, fed by real traffic. Pure, with an injected clock.

closed --N consecutive failures--> open --cooldown passes--> half-open --trial succeeds--> closed
                                    ^                            |
                                    +------- trial fails --------+  (cooldown doubles, up to a cap)

What counts as a failure is the caller's choice: the app counts connection failures, 5xx answers and
streams that die midway, and never a read timeout on one long generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Circuit:
    threshold: int
    cooldown: float
    max_cooldown: float = 300.0
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    open_until: float = 0.0
    openings: int = 0
    _current_cooldown: float = 0.0

    def record_failure(self, now: float) -> bool:
        """Count a failure; True when this one opened the circuit."""
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN:
            self._open(now, self._current_cooldown * 2)
            return True
        if self.state is CircuitState.CLOSED and self.failures >= self.threshold:
            self._open(now, self.cooldown)
            return True
        return False

    def record_success(self) -> bool:
        """A request went well; True when this closed an open or half-open circuit."""
        reopened = self.state is not CircuitState.CLOSED
        self.state = CircuitState.CLOSED
        self.failures = 0
        return reopened

    def current(self, now: float) -> CircuitState:
        """The state now: an open circuit whose cooldown has passed lets one trial through."""
        if self.state is CircuitState.OPEN and now >= self.open_until:
            self.state = CircuitState.HALF_OPEN
        return self.state

    def _open(self, now: float, cooldown: float) -> None:
        self._current_cooldown = min(max(cooldown, self.cooldown), self.max_cooldown)
        self.state = CircuitState.OPEN
        self.open_until = now + self._current_cooldown
        self.openings += 1
