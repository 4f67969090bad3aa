"""Per-key rate limits and token budgets, decided in process: exact sliding windows, no I/O.

- ``rpm``: requests in any 60 seconds. Each admitted request's time is kept until it is a minute
  old, so the count is exact, never an estimate from fixed windows (which admit twice the limit
  across a window's edge).
- ``tpm``: tokens in any 60 seconds. A request reserves an estimate when admitted; when it ends,
  the reservation becomes what the server reported using (``settle``), if it is still in the
  window. A request is admitted when its estimate fits beside what the window holds.
- ``budget``: tokens per period (a UTC day, week or month, or a number of seconds from the epoch),
  counted when requests end. A request is admitted while the period's tokens are below the
  budget, so the request that crosses it finishes, and the next one is refused.

``admit`` returns what happened (``Admitted`` with the ticket to settle, or ``Refused`` with when to
come back), with the standing that the rate-limit headers show. The times are the caller's clock
(``now``, seconds since the epoch). ``pool.key_limits`` decides the same in Redis for a fleet.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "WINDOW",
    "Admitted",
    "KeyLimiter",
    "Limits",
    "Refused",
    "Standing",
    "Ticket",
    "period_bounds",
]

WINDOW = 60.0  # seconds: requests and tokens are limited per sliding minute
Limit = Literal["requests", "tokens", "budget"]


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    budget: int | None = None  # tokens per period
    period: str | float = "month"  # day, week, month (UTC), or seconds

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.budget is not None


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a key stands against its limits (for the rate-limit headers): each limit, what is left
    of it, and in how many seconds it is whole again (``budget_reset``: the period's end, epoch)."""

    rpm: int | None = None
    requests_left: int = 0
    requests_reset: float = 0.0
    tpm: int | None = None
    tokens_left: int = 0
    tokens_reset: float = 0.0
    budget: int | None = None
    budget_left: int = 0
    budget_reset: float = 0.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """What ``settle`` needs of an admitted request: whose, which reservation, of how many tokens."""

    key: str
    reservation: str
    estimate: int


@dataclass(frozen=True, slots=True)
class Admitted:
    ticket: Ticket
    standing: Standing


@dataclass(frozen=True, slots=True)
class Refused:
    limit: Limit
    retry_after: float  # seconds until a request like it would be admitted (math.inf: never)
    standing: Standing
    asked: int = 0  # the tokens it would have reserved


def period_bounds(period: str | float, now: float) -> tuple[float, float]:
    """The budget period ``now`` falls in, as seconds since the epoch: [start, end)."""
    if not isinstance(period, str):
        start = math.floor(now / period) * period
        return start, start + period
    day = dt.datetime.fromtimestamp(now, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        first, after = day, day + dt.timedelta(days=1)
    elif period == "week":
        first = day - dt.timedelta(days=day.weekday())
        after = first + dt.timedelta(days=7)
    else:
        first = day.replace(day=1)
        after = (first + dt.timedelta(days=32)).replace(day=1)
    return first.timestamp(), after.timestamp()


@dataclass(slots=True)
class _Reservation:
    at: float
    tokens: int
    name: str


@dataclass(slots=True)
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[_Reservation] = field(default_factory=deque)
    reserved: dict[str, _Reservation] = field(default_factory=dict)  # in the window, by name
    token_total: int = 0
    period_start: float = -math.inf
    spent: int = 0  # tokens in the current budget period
    made: int = 0  # reservations made: their names


class KeyLimiter:
    """Every key's windows and budget in this process; a key's state goes when its windows empty
    out (``sweep``) or it is forgotten, so the limiter holds only what still counts."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key: str, limits: Limits, estimate: int, now: float) -> Admitted | Refused:
        """Count one request of ``key`` that may use about ``estimate`` tokens, if its limits let it."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        self._trim(state, now)
        self._roll(state, limits, now)
        standing = _standing(state, limits, now)
        if limits.rpm is not None and len(state.requests) >= limits.rpm:
            wait = state.requests[0] + WINDOW - now if state.requests else math.inf
            return Refused("requests", wait, standing)
        if limits.tpm is not None and state.token_total + estimate > limits.tpm:
            return Refused("tokens", _tokens_free_in(state, limits.tpm, estimate, now), standing, estimate)
        if limits.budget is not None and state.spent >= limits.budget:
            return Refused("budget", max(0.0, standing.budget_reset - now), standing)
        state.made += 1
        name = f"{state.made}"
        if limits.rpm is not None:
            state.requests.append(now)
        if limits.tpm is not None:
            reservation = _Reservation(now, estimate, name)
            state.tokens.append(reservation)
            state.reserved[name] = reservation
            state.token_total += estimate
        return Admitted(Ticket(key, name, estimate), _standing(state, limits, now))

    def settle(self, ticket: Ticket, used: int | None, limits: Limits, now: float) -> None:
        """The request ended having used ``used`` tokens (None: the server did not say): its
        reservation, if still in the window, becomes that (else stays the estimate), and the
        budget of the period ``now`` falls in counts what was reported."""
        state = self._keys.get(ticket.key)
        if state is None or used is None:
            return
        reservation = state.reserved.get(ticket.reservation)
        if reservation is not None:
            state.token_total += used - reservation.tokens
            reservation.tokens = used
        if limits.budget is not None:
            self._roll(state, limits, now)
            state.spent += used

    def standing(self, key: str, limits: Limits, now: float) -> Standing:
        state = self._keys.get(key) or _KeyState()
        self._trim(state, now)
        self._roll(state, limits, now)
        return _standing(state, limits, now)

    def forget(self, key: str) -> None:
        self._keys.pop(key, None)

    def sweep(self, now: float, keep: set[str]) -> None:
        """Drop the state of keys whose windows are empty and that have no budget (``keep``: the
        keys with one, whose period's count must stay)."""
        for key in [k for k in self._keys if k not in keep]:
            state = self._keys[key]
            self._trim(state, now)
            if not state.requests and not state.tokens:
                del self._keys[key]

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def _trim(state: _KeyState, now: float) -> None:
        horizon = now - WINDOW
        requests, tokens = state.requests, state.tokens
        while requests and requests[0] <= horizon:
            requests.popleft()
        while tokens and tokens[0].at <= horizon:
            gone = tokens.popleft()
            state.token_total -= gone.tokens
            del state.reserved[gone.name]

    @staticmethod
    def _roll(state: _KeyState, limits: Limits, now: float) -> None:
        if limits.budget is None:
            return
        start, _ = period_bounds(limits.period, now)
        if start != state.period_start:
            state.period_start, state.spent = start, 0


def _standing(state: _KeyState, limits: Limits, now: float) -> Standing:
    budget_end = period_bounds(limits.period, now)[1] if limits.budget is not None else 0.0
    return Standing(
        rpm=limits.rpm,
        requests_left=max(0, (limits.rpm or 0) - len(state.requests)),
        requests_reset=max(0.0, state.requests[-1] + WINDOW - now) if state.requests else 0.0,
        tpm=limits.tpm,
        tokens_left=max(0, (limits.tpm or 0) - state.token_total),
        tokens_reset=max(0.0, state.tokens[-1].at + WINDOW - now) if state.tokens else 0.0,
        budget=limits.budget,
        budget_left=max(0, (limits.budget or 0) - state.spent),
        budget_reset=budget_end,
    )


def _tokens_free_in(state: _KeyState, tpm: int, estimate: int, now: float) -> float:
    """Seconds until ``estimate`` tokens fit in the window (math.inf when they never can)."""
    if estimate > tpm:
        return math.inf
    total = state.token_total
    for reservation in state.tokens:
        total -= reservation.tokens
        if total + estimate <= tpm:
            return max(0.0, reservation.at + WINDOW - now)
    return 0.0
