"""The in-process key limiter: exact sliding windows and budgets, on a fake clock."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from local_inference_pool.core.limits import (
    WINDOW,
    Admitted,
    KeyLimiter,
    Limits,
    Refused,
    Ticket,
    period_bounds,
)


def test_rpm_is_a_sliding_window_not_a_fixed_one() -> None:
    limiter = KeyLimiter()
    limits = Limits(rpm=2)
    assert isinstance(limiter.admit("a", limits, 0, 59.0), Admitted)
    assert isinstance(limiter.admit("a", limits, 0, 61.0), Admitted)
    refused = limiter.admit("a", limits, 0, 62.0)  # a fixed window would have reset at 60
    assert isinstance(refused, Refused)
    assert refused.limit == "requests"
    assert refused.retry_after == 59.0 + WINDOW - 62.0
    assert isinstance(limiter.admit("a", limits, 0, 119.0), Admitted)  # the first is a minute old


def test_tokens_are_reserved_then_corrected_from_usage() -> None:
    limiter = KeyLimiter()
    limits = Limits(tpm=1000)
    first = limiter.admit("a", limits, 800, 0.0)
    assert isinstance(first, Admitted)
    assert first.standing.tokens_left == 200
    assert isinstance(limiter.admit("a", limits, 300, 1.0), Refused)
    limiter.settle(first.ticket, 100, limits, 2.0)  # it used far less than it reserved
    second = limiter.admit("a", limits, 300, 3.0)
    assert isinstance(second, Admitted)
    assert second.standing.tokens_left == 600


def test_a_request_larger_than_tpm_is_never_admitted() -> None:
    refused = KeyLimiter().admit("a", Limits(tpm=100), 101, 0.0)
    assert isinstance(refused, Refused)
    assert math.isinf(refused.retry_after)
    assert refused.asked == 101


def test_a_budget_lets_the_crossing_request_finish_and_refuses_the_next() -> None:
    limiter = KeyLimiter()
    limits = Limits(budget=100, period="day")
    admitted = limiter.admit("a", limits, 10, 0.0)
    assert isinstance(admitted, Admitted)
    limiter.settle(admitted.ticket, 150, limits, 5.0)  # crossed it while running
    refused = limiter.admit("a", limits, 10, 6.0)
    assert isinstance(refused, Refused)
    assert refused.limit == "budget"
    assert refused.retry_after == 86_400 - 6.0
    assert isinstance(limiter.admit("a", limits, 10, 86_400.0), Admitted)  # a new day


def test_unknown_usage_keeps_the_reservation_and_spends_no_budget() -> None:
    limiter = KeyLimiter()
    limits = Limits(tpm=100, budget=10)
    admitted = limiter.admit("a", limits, 60, 0.0)
    assert isinstance(admitted, Admitted)
    limiter.settle(admitted.ticket, None, limits, 1.0)
    standing = limiter.standing("a", limits, 2.0)
    assert (standing.tokens_left, standing.budget_left) == (40, 10)


def test_period_bounds_follow_the_utc_calendar() -> None:
    moment = dt.datetime(2027, 2, 17, 15, 30, tzinfo=dt.UTC).timestamp()
    day = period_bounds("day", moment)
    week = period_bounds("week", moment)
    month = period_bounds("month", moment)
    assert day == (
        dt.datetime(2027, 2, 17, tzinfo=dt.UTC).timestamp(),
        dt.datetime(2027, 2, 18, tzinfo=dt.UTC).timestamp(),
    )
    assert week[0] == dt.datetime(2027, 2, 15, tzinfo=dt.UTC).timestamp()  # a Monday
    assert month == (
        dt.datetime(2027, 2, 1, tzinfo=dt.UTC).timestamp(),
        dt.datetime(2027, 3, 1, tzinfo=dt.UTC).timestamp(),
    )
    assert period_bounds(3600.0, 7300.0) == (7200.0, 10_800.0)


def test_sweep_drops_keys_whose_windows_emptied() -> None:
    limiter = KeyLimiter()
    limiter.admit("a", Limits(rpm=5), 0, 0.0)
    limiter.admit("b", Limits(budget=5), 0, 0.0)
    limiter.sweep(120.0, keep={"b"})
    assert len(limiter) == 1
    limiter.forget("b")
    assert len(limiter) == 0


# --- the property: against a model that remembers every request ------------------------------


@dataclass
class _Request:
    at: float
    key: str
    estimate: int
    ticket: Ticket
    used: int | None = None
    settled_at: float | None = None

    def charge(self) -> int:
        return self.used if self.settled_at is not None and self.used is not None else self.estimate


_LIMITS = st.builds(
    Limits,
    rpm=st.one_of(st.none(), st.integers(0, 6)),
    tpm=st.one_of(st.none(), st.integers(0, 400)),
    budget=st.one_of(st.none(), st.integers(0, 800)),
    period=st.sampled_from(["day", 90.0, 200.0]),
)
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from("ab"), st.integers(0, 150)),
        st.tuples(st.just("settle"), st.integers(0, 50), st.one_of(st.none(), st.integers(0, 200))),
        st.tuples(st.just("wait"), st.floats(0, 45, allow_nan=False)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(limits_a=_LIMITS, limits_b=_LIMITS, steps=_STEPS)
def test_admitted_never_exceed_a_limit_and_refused_only_at_it(
    limits_a: Limits, limits_b: Limits, steps: list[tuple[object, ...]]
) -> None:
    """In every sliding minute the admitted requests and their tokens stay within the key's limits;
    a refusal happens only when the window (in-flight reservations included) or the budget is
    full, so the count admitted falls short of a limit by no more than what was in flight."""
    limiter = KeyLimiter()
    limits = {"a": limits_a, "b": limits_b}
    now = 1_000_000.0
    admitted: list[_Request] = []
    for step in steps:
        if step[0] == "wait":
            now += float(step[1])  # type: ignore[arg-type]
            continue
        if step[0] == "settle":
            open_ones = [r for r in admitted if r.settled_at is None]
            if open_ones:
                request = open_ones[int(step[1]) % len(open_ones)]  # type: ignore[call-overload]
                request.used, request.settled_at = step[2], now  # type: ignore[assignment]
                limiter.settle(request.ticket, request.used, limits[request.key], now)
            continue
        key, estimate = str(step[1]), int(step[2])  # type: ignore[call-overload]
        mine = limits[key]
        window = [r for r in admitted if r.key == key and r.at > now - WINDOW]
        in_window = len(window)
        charged = sum(r.charge() for r in window)
        start, _ = period_bounds(mine.period, now)
        spent = sum(
            r.used or 0
            for r in admitted
            if r.key == key and r.settled_at is not None and r.settled_at >= start
        )
        verdict = limiter.admit(key, mine, estimate, now)
        if isinstance(verdict, Admitted):
            assert mine.rpm is None or in_window + 1 <= mine.rpm
            assert mine.tpm is None or charged + estimate <= mine.tpm
            assert mine.budget is None or spent < mine.budget
            admitted.append(_Request(now, key, estimate, verdict.ticket))
            continue
        if verdict.limit == "requests":
            assert mine.rpm is not None
            assert in_window >= mine.rpm
            assert 0 <= verdict.retry_after <= WINDOW or (mine.rpm == 0 and math.isinf(verdict.retry_after))
        elif verdict.limit == "tokens":
            assert mine.tpm is not None
            assert charged + estimate > mine.tpm
        else:
            assert mine.budget is not None
            assert spent >= mine.budget
