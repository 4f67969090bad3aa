"""Waiting requests and their indexes: every index holds only the tickets still in it, whatever the
traffic; a refused request costs its tenant nothing; a tenant nobody declared is not kept."""

from __future__ import annotations

import pytest

from local_inference_pool.core.scheduler import Scheduler
from local_inference_pool.errors import QueueFullError

from ..clock import Clock

BOUND = 64  # what a handful of live tickets may leave in any index (dead entries are compacted)


def test_requests_with_a_deadline_leave_nothing_behind_when_granted_at_once(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=2, models=["m"])
    for _ in range(10_000):  # a lightly loaded gateway with queue_timeout set: nothing waits
        ticket = s.submit("m", timeout=600)
        assert ticket.grant is not None
        s.release(ticket.grant)
        clock.now += 0.01
    assert all(size <= BOUND for size in s.index_sizes().values()), s.index_sizes()


def test_a_queue_that_never_empties_keeps_only_its_waiters(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    running = s.submit("m", timeout=600)
    for _ in range(2):
        s.submit("m", timeout=600)
    s.take_events()  # the first one's grant
    for _ in range(10_000):  # two waiters always queued; each release grants the oldest
        assert running.grant is not None
        s.release(running.grant)
        granted = s.take_events().granted
        assert len(granted) == 1
        running = granted[0]
        s.submit("m", timeout=600)
        clock.now += 0.01
    assert s.waiting == 2
    sizes = s.index_sizes()
    assert all(size <= BOUND for size in sizes.values()), sizes


def test_cancelled_waiters_leave_nothing_in_any_order(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m")
    for _ in range(10_000):
        s.cancel(s.submit("m", timeout=600, tenant="a key"))
    assert s.waiting == 0
    assert all(size <= BOUND for size in s.index_sizes().values()), s.index_sizes()


def test_a_refused_request_does_not_advance_its_tenants_fair_share(clock: Clock) -> None:
    s = Scheduler(clock=clock, queue_limit=1)
    s.add_backend("busy", "http://busy", slots=1, models=["m"])
    s.add_backend("other", "http://other", slots=1, models=["x"])  # free, but not for m
    s.set_tenant("k")
    s.submit("m", tenant="k")  # runs
    s.submit("m", tenant="k")  # waits: the queue is full now
    before = s.tenants["k"].finish
    with pytest.raises(QueueFullError):
        s.submit("m", tenant="k")  # refused after it was placed (a backend was free)
    assert s.tenants["k"].finish == before


def test_tenants_nobody_declared_are_forgotten_when_idle(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    declared = set(s.tenants)
    for index in range(1000):
        ticket = s.submit("m", tenant=f"caller-{index}")  # a library caller's made-up names
        assert ticket.grant is not None
        s.release(ticket.grant)
    assert set(s.tenants) == declared
    s.set_tenant("kept")
    ticket = s.submit("m", tenant="kept")
    assert ticket.grant is not None
    s.release(ticket.grant)
    assert "kept" in s.tenants
