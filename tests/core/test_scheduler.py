from __future__ import annotations

from collections.abc import Iterator

import pytest

from local_inference_pool.core.fleet import remember_affinity
from local_inference_pool.core.prompt_index import Prompt, prompt_of
from local_inference_pool.core.scheduler import Affinity, Health, Scheduler, Ticket, TicketState
from local_inference_pool.errors import ModelNotFoundError, NoCapacityError, QueueFullError, QueueTimeoutError

from ..clock import Clock


class Done:
    """The tickets the scheduler's calls granted or failed, in the order reported: each look takes
    the events reported since the last (``Scheduler.take_events``)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.tickets: list[Ticket] = []

    def _taken(self) -> list[Ticket]:
        events = self.scheduler.take_events()
        self.tickets += [*events.granted, *events.failed]
        return self.tickets

    def __getitem__(self, index: int) -> Ticket:
        return self._taken()[index]

    def __iter__(self) -> Iterator[Ticket]:
        return iter(self._taken())

    def __eq__(self, other: object) -> bool:
        return self._taken() == other

    __hash__ = None  # type: ignore[assignment]


def make(clock: Clock, **kwargs: object) -> tuple[Scheduler, Done]:
    scheduler = Scheduler(clock=clock, **kwargs)  # type: ignore[arg-type]
    return scheduler, Done(scheduler)


def state(ticket: Ticket) -> TicketState:
    """Read through a call so the type checker does not narrow a state that dispatch changes."""
    return ticket.state


def backend_of(ticket: Ticket) -> str | None:
    return ticket.grant.backend.name if ticket.grant else None


def test_grants_at_once_when_a_slot_is_free_and_queues_beyond_slots(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=2, models=["m"])
    tickets = [s.submit("m") for _ in range(3)]
    assert [t.state for t in tickets] == [TicketState.GRANTED, TicketState.GRANTED, TicketState.WAITING]
    assert s.waiting == 1


def test_release_hands_the_slot_to_the_waiter_and_wakes_it(clock: Clock) -> None:
    s, done = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    first = s.submit("m")
    second = s.submit("m")
    assert first.grant is not None
    assert s.release(first.grant) is True
    assert state(second) is TicketState.GRANTED
    assert done[-1] is second
    assert s.release(first.grant) is False  # idempotent
    assert s.backends["a"].active_total == 1


def test_spreads_by_weighted_load_ratio(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("small", "http://s", slots=2, models=["m"], resident=["m"])
    s.add_backend("big", "http://b", slots=2, models=["m"], resident=["m"], weight=3.0)
    names = [backend_of(s.submit("m")) for _ in range(4)]
    # A lease on big weighs a third of one on small: 0/0 tie -> small, then big twice, then small.
    assert names == ["small", "big", "big", "small"]


def test_idle_backend_with_room_loads_rather_than_letting_a_request_wait(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("warm", "http://w", slots=1, models=["m"], resident=["m"])
    s.add_backend("empty", "http://e", slots=1, models=["m"])
    assert [backend_of(s.submit("m")) for _ in range(2)] == ["warm", "empty"]


def test_prefers_the_backend_with_the_model_loaded(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("cold", "http://c", slots=4, models=["m", "x"], resident=["x"])
    s.add_backend("warm", "http://w", slots=4, models=["m", "x"], resident=["m"])
    assert backend_of(s.submit("m")) == "warm"


def test_drain_guard_keeps_a_busy_backend_on_its_model(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=4, models=["m", "x"])
    s.submit("m")
    other = s.submit("x")
    assert state(other) is TicketState.WAITING
    assert s.backends["a"].active == {"m": 1}


def test_max_loaded_models_lets_a_backend_hold_two(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=4, models=["m", "x", "y"], max_loaded_models=2)
    assert s.submit("m").state is TicketState.GRANTED
    assert s.submit("x").state is TicketState.GRANTED
    assert s.submit("y").state is TicketState.WAITING
    assert s.backends["a"].resident == ["x", "m"]


def test_free_slot_goes_to_the_loaded_model_before_an_older_request_that_would_swap(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=30.0)
    s.add_backend("a", "http://a", slots=1, models=["m", "x"])
    holder = s.submit("m")
    cold = s.submit("x")  # older, needs a swap
    clock.now += 1
    warm = s.submit("m")
    assert holder.grant is not None
    s.release(holder.grant)
    assert state(warm) is TicketState.GRANTED
    assert state(cold) is TicketState.WAITING


def test_passed_over_request_gets_a_drain_barrier_and_then_the_backend(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=30.0)
    s.add_backend("a", "http://a", slots=2, models=["m", "x"])
    held = [s.submit("m"), s.submit("m")]
    cold = s.submit("x")  # the drain guard keeps it out while m runs
    clock.now += 31
    assert held[0].grant is not None
    s.release(held[0].grant)
    assert s.backends["a"].barrier is None  # nobody passed x over yet
    newer = s.submit("m")  # granted: it arrived 31 s after x, so x now starves
    assert state(newer) is TicketState.GRANTED
    assert s.backends["a"].barrier == "x"
    late = s.submit("m")  # the barrier refuses new work for the old model
    assert state(late) is TicketState.WAITING
    for ticket in (held[1], newer):
        assert ticket.grant is not None
        s.release(ticket.grant)
    assert state(cold) is TicketState.GRANTED
    assert state(late) is TicketState.WAITING
    assert s.backends["a"].barrier is None
    assert s.stats["barriers"] == 1


def test_saturation_alone_drains_nothing(clock: Clock) -> None:
    """Everyone waits long, but in arrival order: nobody is passed over, so no barrier."""
    s, _ = make(clock, starvation_bound=30.0)
    s.add_backend("a", "http://a", slots=1, models=["m", "x"])
    first = s.submit("m")
    queue = [s.submit("m"), s.submit("x"), s.submit("m")]
    clock.now += 100
    s.refresh()
    assert first.grant is not None
    s.release(first.grant)
    assert state(queue[0]) is TicketState.GRANTED  # the oldest, no swap needed
    assert s.backends["a"].barrier is None
    assert s.stats["barriers"] == 0


def test_barrier_is_dropped_when_the_backend_goes_unhealthy_and_placed_again(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=5.0)
    s.add_backend("a", "http://a", slots=1, models=["m", "x"], resident=["m"])
    s.add_backend("b", "http://b", slots=1, models=["m", "x"], resident=["m"])
    first = [s.submit("m"), s.submit("m")]
    cold = s.submit("x")
    clock.now += 6
    newer = s.submit("m")  # queued behind the busy backends
    assert first[0].grant is not None
    s.release(first[0].grant)  # hands the slot to the newer m request: x is passed over
    assert state(newer) is TicketState.GRANTED
    barrier_on = next(b.name for b in s.backends.values() if b.barrier == "x")
    s.update_backend(barrier_on, health=Health.UNHEALTHY)
    assert s.backends[barrier_on].barrier is None
    other = next(name for name in s.backends if name != barrier_on)
    assert s.backends[other].barrier == "x"
    assert state(cold) is TicketState.WAITING


def test_idle_backend_loads_a_cold_model_when_nowhere_else_has_it(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m", "x"], resident=["m"])
    ticket = s.submit("x")
    assert state(ticket) is TicketState.GRANTED
    assert ticket.grant is not None
    assert ticket.grant.loaded_model
    assert s.backends["a"].resident == ["x"]
    assert s.stats["loads"] == 1


def test_cold_model_waits_for_its_loaded_backend_while_backlog_is_small(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=30.0)
    s.add_backend("has_x", "http://1", slots=2, models=["x"], resident=["x"])
    s.add_backend("has_m", "http://2", slots=2, models=["m", "x"], resident=["m"])
    s.submit("x")
    s.submit("x")
    queued = s.submit("x")  # has_x is full; loading x on has_m costs a swap for one request
    assert state(queued) is TicketState.WAITING
    s.submit("x")  # backlog 2 >= 2 slots where x is loaded: now a second copy pays off
    assert state(queued) is TicketState.GRANTED
    assert backend_of(queued) == "has_m"


def test_priority_is_served_first(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    holder = s.submit("m")
    low = s.submit("m", priority=0)
    high = s.submit("m", priority=5)
    assert holder.grant is not None
    s.release(holder.grant)
    assert state(high) is TicketState.GRANTED
    assert state(low) is TicketState.WAITING


def test_affinity_hit_then_moved_when_full_and_no_prompt_to_weigh(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"], resident=["m"])
    s.add_backend("b", "http://b", slots=1, models=["m"], resident=["m"])
    first = s.submit("m", affinity_key="chat-1")
    assert first.grant is not None
    assert (first.grant.backend.name, first.grant.affinity) == ("a", Affinity.MISS)
    s.release(first.grant)
    s.submit("m")  # takes a (lowest index on a tie): the session must follow it to b
    moved = s.submit("m", affinity_key="chat-1")
    assert moved.grant is not None
    assert (moved.grant.backend.name, moved.grant.affinity) == ("b", Affinity.MOVED)
    s.release(moved.grant)
    back = s.submit("m", affinity_key="chat-1")  # b is remembered now, and has room
    assert back.grant is not None
    assert (back.grant.backend.name, back.grant.affinity) == ("b", Affinity.HIT)
    assert (s.stats["affinity_miss"], s.stats["affinity_moved"], s.stats["affinity_hit"]) == (1, 1, 1)


def test_affinity_forgets_after_ttl_and_beyond_max_sessions(clock: Clock) -> None:
    s, _ = make(clock, affinity_ttl=10.0, affinity_max_sessions=2)
    s.add_backend("a", "http://a", slots=8, models=["m"])
    for key in ("k1", "k2", "k3"):
        ticket = s.submit("m", affinity_key=key)
        assert ticket.grant is not None
        s.release(ticket.grant)
    again = s.submit("m", affinity_key="k1")  # evicted by the LRU bound
    assert again.grant is not None
    assert again.grant.affinity is Affinity.MISS
    clock.now += 11
    s.refresh()
    expired = s.submit("m", affinity_key="k3")
    assert expired.grant is not None
    assert expired.grant.affinity is Affinity.MISS


def test_unknown_model_fails_at_once_with_the_known_ones(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    with pytest.raises(ModelNotFoundError, match=r"'nope'.*available: m"):
        s.submit("nope")


def test_no_backends_at_all_is_no_capacity(clock: Clock) -> None:
    s, _ = make(clock)
    with pytest.raises(NoCapacityError, match="no backends"):
        s.submit("m")


def test_all_backends_unhealthy_fails_at_once(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"], health=Health.UNHEALTHY)
    with pytest.raises(NoCapacityError, match="no healthy backend"):
        s.submit("m")


def test_loading_backend_queues_and_releases_when_ready(clock: Clock) -> None:
    s, done = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"], health=Health.LOADING)
    ticket = s.submit("m")
    assert state(ticket) is TicketState.WAITING
    s.update_backend("a", health=Health.HEALTHY)
    assert state(ticket) is TicketState.GRANTED
    assert done == [ticket]


def test_waits_for_discovery_then_fails_if_nobody_serves_the_model(clock: Clock) -> None:
    s, done = make(clock)
    s.add_backend("a", "http://a", slots=1, models=None)
    served = s.submit("m")
    missing = s.submit("x")
    assert state(served) is missing.state is TicketState.WAITING
    s.update_backend("a", models=["m"])
    assert state(served) is TicketState.GRANTED
    assert state(missing) is TicketState.FAILED
    assert isinstance(missing.error, ModelNotFoundError)
    assert set(done) == {served, missing}


def test_model_removed_everywhere_fails_its_queue_at_once(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m")
    queued = s.submit("m")
    s.update_backend("a", models=["other"])
    assert state(queued) is TicketState.FAILED
    assert isinstance(queued.error, ModelNotFoundError)


def test_queue_limit(clock: Clock) -> None:
    s, _ = make(clock, queue_limit=1)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m")
    s.submit("m")
    with pytest.raises(QueueFullError, match="limit 1"):
        s.submit("m")
    assert s.stats["rejected"] == 1


def test_deadline_fails_the_ticket_with_what_it_waited_for(clock: Clock) -> None:
    s, done = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m")
    ticket = s.submit("m", timeout=5.0)
    assert s.next_wakeup() == pytest.approx(clock.now + 5.0)
    clock.now += 5.0
    s.refresh()
    assert state(ticket) is TicketState.FAILED
    assert isinstance(ticket.error, QueueTimeoutError)
    assert "'m'" in ticket.error.message
    assert ticket.error.waited == pytest.approx(5.0)
    assert done[-1] is ticket


def test_cancel_of_an_untaken_grant_passes_the_slot_on(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    holder = s.submit("m")
    granted_but_gone = s.submit("m")
    next_in_line = s.submit("m")
    assert holder.grant is not None
    s.release(holder.grant)
    assert state(granted_but_gone) is TicketState.GRANTED
    s.cancel(granted_but_gone)
    assert state(next_in_line) is TicketState.GRANTED
    assert s.backends["a"].active_total == 1


def test_external_busy_slots_reduce_capacity(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=2, models=["m"])
    s.update_backend("a", external_busy=1)
    assert s.submit("m").state is TicketState.GRANTED
    blocked = s.submit("m")
    assert state(blocked) is TicketState.WAITING
    s.update_backend("a", external_busy=0)
    assert state(blocked) is TicketState.GRANTED


def test_more_slots_wake_waiters(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m")
    waiting = [s.submit("m") for _ in range(3)]
    s.update_backend("a", slots=4)
    assert all(t.state is TicketState.GRANTED for t in waiting)


def test_fewer_slots_than_leases_admits_nothing_until_below(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=3, models=["m"])
    held = [s.submit("m") for _ in range(3)]
    s.update_backend("a", slots=1)
    queued = s.submit("m")
    for ticket in held[:2]:
        assert ticket.grant is not None
        s.release(ticket.grant)
    assert state(queued) is TicketState.WAITING
    assert held[2].grant is not None
    s.release(held[2].grant)
    assert state(queued) is TicketState.GRANTED


def test_removed_backend_fails_its_pinned_tickets_and_keeps_grants_releasable(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.add_backend("b", "http://b", slots=1, models=["m"])
    held = s.submit("m", pin="a")
    pinned = s.submit("m", pin="a")
    s.remove_backend("a")
    assert state(pinned) is TicketState.FAILED
    assert held.grant is not None
    assert s.release(held.grant) is True
    assert "a" not in s.backends


def test_pinned_ticket_goes_only_to_its_backend(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.add_backend("b", "http://b", slots=1, models=["m"])
    s.submit("m", pin="a")
    pinned = s.submit("m", pin="a")
    assert state(pinned) is TicketState.WAITING
    assert s.backends["b"].free == 1


def test_try_acquire_never_queues(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    assert s.try_acquire("m") is not None
    assert s.try_acquire("m") is None
    assert s.waiting == 0


def test_snapshot_reports_backends_and_queue(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m", "x"])
    s.submit("m")
    s.submit("x")
    clock.now += 2.5
    snap = s.snapshot()
    (backend,) = snap["backends"]
    assert backend["active_by_model"] == {"m": 1}
    assert backend["resident_models"] == ["m"]
    assert backend["health"] == "healthy"
    assert snap["queue"]["by_model"] == {"x": {"waiting": 1, "oldest_wait_s": 2.5}}
    assert snap["active_leases"] == 1


def test_next_wakeup_is_the_earliest_deadline(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=30.0)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    assert s.next_wakeup() is None
    s.submit("m")
    s.submit("m", timeout=10.0)
    s.submit("m")
    assert s.next_wakeup() == pytest.approx(clock.now + 10.0)


def test_next_wakeup_never_reports_a_moment_already_handled(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=10.0)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m")
    s.submit("m")  # starves behind its own model: no barrier can help it
    clock.now += 11
    s.refresh()
    wake = s.next_wakeup()
    assert wake is None or wake > clock.now


def test_pinned_ticket_to_an_unhealthy_backend_fails_at_once(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"], health=Health.UNHEALTHY)
    with pytest.raises(NoCapacityError, match="'a' is unhealthy"):
        s.submit("m", pin="a")


def test_a_retry_goes_to_another_healthy_backend_that_may_take_the_model_now(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("failed", "http://f", slots=2, models=["m"], resident=["m"])
    s.add_backend("busy-with-other", "http://b", slots=2, models=["m", "x"], resident=["x"])
    s.add_backend("down", "http://d", slots=2, models=["m"], health=Health.UNHEALTHY)
    s.add_backend("cold", "http://c", slots=2, models=["m"])
    s.add_backend("unrelated", "http://u", slots=2, models=["x"])
    s.submit("x", pin="busy-with-other")  # model x in flight there: the drain guard keeps m away
    assert s.alternative("m", ["failed"]) == "cold"
    assert s.alternative("m", ["failed", "cold"]) == "busy-with-other"  # it may take m once drained
    assert s.alternative("m", ["failed", "cold", "busy-with-other"]) is None  # never down, never x-only
    assert s.alternative("nope", []) is None


def test_models_other_processes_have_active_count_in_the_drain_guard(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=4, models=["m", "x"], max_loaded_models=1)
    s.update_backend("a", external_busy=1, foreign_models=["x"])  # another process runs x here
    blocked = s.submit("m")
    assert state(blocked) is TicketState.WAITING  # m would make two models active on a one-model server
    assert backend_of(s.submit("x")) == "a"  # x may join the other process's work
    s.update_backend("a", external_busy=0, foreign_models=[])  # theirs finished
    assert state(blocked) is TicketState.WAITING  # our x is still in flight there


# --- tenants: fair shares and caps ---------------------------------------------------------------


def serve_in_turn(s: Scheduler, count: int) -> list[str]:
    """Release the oldest lease ``count`` times; the tenants of the tickets granted in turn."""
    order: list[str] = []
    for _ in range(count):
        grant = min(s.grants.values(), key=lambda g: g.id)
        before = set(s.grants)
        s.release(grant)
        order += [s.grants[g].ticket.tenant.name for g in set(s.grants) - before]
    return order


def test_a_light_key_is_not_queued_behind_a_flood(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    for _ in range(51):
        s.submit("m", tenant="flood")
    light = [s.submit("m", tenant="light") for _ in range(2)]
    order = serve_in_turn(s, 10)
    assert order.index("light") <= 1  # the next turn but one, not after 50 of the flood
    assert order.count("light") == 2
    assert all(state(t) is TicketState.GRANTED or t.grant is not None for t in light)


def test_weights_share_contended_slots_two_to_one(clock: Clock) -> None:
    s, _ = make(clock, queue_limit=10_000)
    s.set_tenant("heavy", weight=2.0)
    s.set_tenant("light", weight=1.0)
    s.add_backend("a", "http://a", slots=3, models=["m"])
    for _ in range(600):
        s.submit("m", tenant="heavy")
        s.submit("m", tenant="light")
    order = serve_in_turn(s, 300)
    share = order.count("heavy") / order.count("light")
    assert abs(share - 2.0) / 2.0 < 0.05, share


def test_a_key_alone_gets_every_slot_in_arrival_order(clock: Clock) -> None:
    s, _ = make(clock)
    s.set_tenant("only", weight=0.25)
    s.add_backend("a", "http://a", slots=2, models=["m"])
    tickets = [s.submit("m", tenant="only") for _ in range(6)]
    assert [state(t) for t in tickets[:2]] == [TicketState.GRANTED] * 2
    serve_in_turn(s, 2)
    assert [state(t) for t in tickets[2:4]] == [TicketState.GRANTED] * 2  # in order, and all slots
    assert [state(t) for t in tickets[4:]] == [TicketState.WAITING] * 2


def test_priority_still_comes_before_fair_shares(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m", tenant="light")  # holds the slot
    for _ in range(5):
        s.submit("m", tenant="light")
    urgent = s.submit("m", tenant="flood", priority=5)
    serve_in_turn(s, 1)
    assert state(urgent) is TicketState.GRANTED


def test_a_key_at_its_cap_waits_while_others_use_the_slots(clock: Clock) -> None:
    s, _ = make(clock)
    s.set_tenant("capped", max_concurrent=1)
    s.add_backend("a", "http://a", slots=3, models=["m"])
    capped = [s.submit("m", tenant="capped") for _ in range(3)]
    other = s.submit("m", tenant="other")
    assert [state(t) for t in capped] == [TicketState.GRANTED, TicketState.WAITING, TicketState.WAITING]
    assert state(other) is TicketState.GRANTED  # not behind the capped key's queue
    assert capped[0].grant is not None
    s.release(capped[0].grant)
    assert state(capped[1]) is TicketState.GRANTED
    assert state(capped[2]) is TicketState.WAITING
    assert s.tenants["capped"].active == 1


def test_a_capped_key_counts_what_other_processes_hold_for_it(clock: Clock) -> None:
    s, _ = make(clock)
    s.set_tenant("capped", max_concurrent=2)
    s.add_backend("a", "http://a", slots=3, models=["m"])
    s.update_tenant("capped", external=2)
    waiting = s.submit("m", tenant="capped")
    assert state(waiting) is TicketState.WAITING
    s.update_tenant("capped", external=1)
    assert state(waiting) is TicketState.GRANTED


def test_a_keys_queue_limit_refuses_that_key_only(clock: Clock) -> None:
    from local_inference_pool.errors import TenantQueueFullError

    s, _ = make(clock)
    s.set_tenant("small", max_queued=2)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.submit("m", tenant="small")  # granted
    s.submit("m", tenant="small")
    s.submit("m", tenant="small")
    with pytest.raises(TenantQueueFullError) as refused:
        s.submit("m", tenant="small")
    assert refused.value.code == "key_queue_full"
    assert refused.value.status == 429
    assert state(s.submit("m", tenant="other")) is TicketState.WAITING


def test_one_models_backlog_refuses_no_other_model(clock: Clock) -> None:
    s, _ = make(clock, queue_limit=2)
    s.add_backend("a", "http://a", slots=1, models=["m", "x"], max_loaded_models=2)
    s.submit("m")
    s.submit("m")
    s.submit("m")
    with pytest.raises(QueueFullError):
        s.submit("m")
    assert [state(s.submit("x")) for _ in range(2)] == [TicketState.WAITING] * 2  # its own queue


# --- prompt caches ---------------------------------------------------------------------------

DOCUMENT = "".join(f"Paragraph {i} of the shared document, long enough to matter. " for i in range(60))


def prompt(*parts: str, model: str = "m") -> Prompt:
    return prompt_of(list(parts), model=model)


def cache_pair(clock: Clock, **kwargs: object) -> tuple[Scheduler, Done]:
    """Two one-slot backends serving m, a prefill of 1 ms per token, and a lease of 1 s learned on each."""
    s, done = make(clock, prefill_seconds_per_token=0.001, prefix_min_tokens=64, **kwargs)
    for name in ("a", "b"):
        s.add_backend(name, f"http://{name}", slots=1, models=["m"], resident=["m"])
        lease = s.submit("m", pin=name)
        assert lease.grant is not None
        clock.now += 1.0
        s.release(lease.grant)
    return s, done


def hold_a_turn(s: Scheduler, clock: Clock) -> tuple[Ticket, Ticket, Ticket]:
    """On ``cache_pair``: a busy with the document's first question, b busy; a second question
    held for a when b frees half a second later (0.5 s left on a, 0.9 s saved), the next request
    on b. Returns the lease holder, the held turn and the request that took b."""
    holder = s.submit("m", prompt=prompt(DOCUMENT, "q1"))
    other = s.submit("m")
    turn = s.submit("m", prompt=prompt(DOCUMENT, "q2"))
    later = s.submit("m")
    clock.now += 0.5
    assert other.grant is not None
    s.release(other.grant)
    assert turn.held_for is s.backends["a"]
    return holder, turn, later


def test_a_long_shared_prefix_goes_where_it_is_cached_a_short_one_spreads(clock: Clock) -> None:
    s, _ = make(clock, prefix_min_tokens=64)
    s.add_backend("a", "http://a", slots=2, models=["m"], resident=["m"])
    s.add_backend("b", "http://b", slots=2, models=["m"], resident=["m"])
    first = s.submit("m", prompt=prompt(DOCUMENT, "first question"))
    assert backend_of(first) == "a"
    again = s.submit("m", prompt=prompt(DOCUMENT, "another question"))  # a is busier, but holds it
    assert (backend_of(again), again.grant and again.grant.affinity) == ("a", Affinity.PREFIX)
    short = s.submit("m", prompt=prompt("Be brief. " * 5, "hello"))  # nothing worth a cache: least loaded
    assert backend_of(short) == "b"
    assert short.grant is not None
    assert short.grant.affinity is Affinity.MISS


def test_waits_for_the_busy_cache_holder_when_that_is_cheaper_and_gets_it(clock: Clock) -> None:
    s, _ = cache_pair(clock)
    holder, turn, later = hold_a_turn(s, clock)
    assert backend_of(holder) == "a"
    assert state(turn) is TicketState.WAITING
    assert backend_of(later) == "b"  # the slot went to the next request meanwhile
    assert holder.grant is not None
    s.release(holder.grant)
    assert turn.grant is not None
    assert (turn.grant.backend.name, turn.grant.affinity) == ("a", Affinity.WAITED)
    assert s.stats["affinity_waited"] == 1
    assert s.cache_stats[("a", "m")].waits == 1


def test_moves_at_once_when_the_wait_costs_more_than_the_prefill_it_saves(clock: Clock) -> None:
    s, _ = cache_pair(clock)
    holder = s.submit("m", prompt=prompt(DOCUMENT, "q1"))
    other = s.submit("m")
    turn = s.submit("m", prompt=prompt(DOCUMENT, "q2"))
    assert other.grant is not None
    s.release(other.grant)  # a's lease has a whole second to go: more than the 0.9 s saved
    assert turn.grant is not None
    assert (turn.grant.backend.name, turn.grant.affinity) == ("b", Affinity.MOVED)
    assert s.cache_stats[("a", "m")].moved == 1
    assert holder.grant is not None
    assert not holder.grant.released


def test_a_hold_runs_out_at_the_saving_then_the_request_goes_anywhere_once(clock: Clock) -> None:
    s, _ = cache_pair(clock, cache_wait_max=0.3)
    holder = s.submit("m", prompt=prompt(DOCUMENT, "q1"))
    other = s.submit("m")
    turn = s.submit("m", prompt=prompt(DOCUMENT, "q2"))
    blocker = s.submit("m")
    clock.now += 0.8
    assert other.grant is not None
    s.release(other.grant)  # 0.2 s to go on a, within the 0.3 s bound: held, b goes to blocker
    assert turn.held_for is s.backends["a"]
    assert backend_of(blocker) == "b"
    assert s.next_wakeup() == pytest.approx(clock.now + 0.3)
    clock.now += 0.3  # a's lease overruns: the hold ends
    s.refresh()
    assert turn.held_for is None
    assert state(turn) is TicketState.WAITING
    assert blocker.grant is not None
    s.release(blocker.grant)  # b frees: the turn goes there now, and is not held again
    assert turn.grant is not None
    assert (turn.grant.backend.name, turn.grant.affinity) == ("b", Affinity.MOVED)
    assert holder.grant is not None
    assert not holder.grant.released


def test_a_held_request_goes_back_to_its_queue_when_its_holder_goes_down(clock: Clock) -> None:
    s, _ = cache_pair(clock)
    _, turn, _ = hold_a_turn(s, clock)
    s.update_backend("a", health=Health.UNHEALTHY)
    assert turn.held_for is None
    assert state(turn) is TicketState.WAITING
    assert s.waiting == 1
    assert [t.id for t in s.waiting_tickets()] == [turn.id]


def test_a_starving_request_does_not_wait_for_a_cache(clock: Clock) -> None:
    s, _ = cache_pair(clock, starvation_bound=0.1)
    s.submit("m", prompt=prompt(DOCUMENT, "q1"))
    other = s.submit("m")
    turn = s.submit("m", prompt=prompt(DOCUMENT, "q2"))
    clock.now += 0.5
    s.submit("m", priority=1)  # arrives later, is served first when b frees: the turn starves
    assert other.grant is not None
    s.release(other.grant)
    assert state(turn) is TicketState.WAITING
    assert turn.held_for is None


def test_a_cancelled_held_request_leaves_nothing_behind(clock: Clock) -> None:
    s, _ = cache_pair(clock)
    holder, turn, _ = hold_a_turn(s, clock)
    s.cancel(turn)
    assert s.waiting == 0
    assert s.snapshot()["backends"][0]["held_for_cache"] == 0
    assert holder.grant is not None
    s.release(holder.grant)
    assert s.backends["a"].active_total == 0


def test_learns_prefill_time_and_characters_per_token_from_reports(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    ticket = s.submit("m", prompt=prompt("x" * 4000, "y" * 800))
    assert ticket.grant is not None
    s.learn(ticket.grant, prompt_tokens=1600, cached_tokens=400, prefill_seconds=2.4, evaluated_tokens=1200)
    s.learn(ticket.grant, prompt_tokens=1600, cached_tokens=1599, prefill_seconds=0.5, evaluated_tokens=1)
    backend = s.snapshot()["backends"][0]
    assert backend["prefill_ms_per_token"] == pytest.approx(2.0)  # the one-token hit taught nothing
    row = s.snapshot()["prompt_cache"][0]
    assert (row["prompt_tokens"], row["cached_tokens"]) == (3200, 1999)
    assert row["prefill_saved_s"] == pytest.approx(1999 * 0.002)
    assert s.chars_per_token("m") == pytest.approx(3.0)


def test_with_others_waiting_for_the_slot_it_passes_on_a_request_waits_longer_than_its_saving(
    clock: Clock,
) -> None:
    s, _ = cache_pair(clock)
    holder = s.submit("m", prompt=prompt(DOCUMENT, "q1"))  # a's lease: 1 s expected
    other = s.submit("m")
    turn = s.submit("m", prompt=prompt(DOCUMENT, "q2"))  # saves ~0.9 s: less than a's second
    behind = s.submit("m")  # ...but this one takes b's slot meanwhile: waiting only reorders
    assert other.grant is not None
    s.release(other.grant)
    assert turn.held_for is s.backends["a"]
    assert backend_of(behind) == "b"
    assert turn.hold_until is not None
    assert turn.hold_until - clock.now == pytest.approx(1.0 + 0.9, abs=0.15)  # expected + saving
    assert holder.grant is not None
    s.release(holder.grant)
    assert turn.grant is not None
    assert turn.grant.affinity is Affinity.WAITED


def test_a_conversation_another_process_served_counts_its_history_as_cached_there(clock: Clock) -> None:
    s, _ = cache_pair(clock)
    history = "earlier turns of this conversation " * 60
    busy = s.submit("m", pin="b")
    s.submit("m", pin="a")
    remember_affinity(s, "conversation-7", "b")  # the fleet says: b served it; this index never saw it
    turn = s.submit("m", affinity_key="conversation-7", prompt=prompt(history, "the next question"))
    queued = s.submit("m")
    assert busy.grant is not None
    clock.now += 0.7
    a_lease = next(g for g in s.grants.values() if g.backend.name == "a")
    s.release(a_lease)  # a frees: the turn waits for b, where its history is
    assert turn.held_for is s.backends["b"]
    assert backend_of(queued) == "a"
    s.release(busy.grant)
    assert turn.grant is not None
    assert (turn.grant.backend.name, turn.grant.affinity) == ("b", Affinity.WAITED)


def test_a_broken_or_hostile_prefill_report_teaches_nothing(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    ticket = s.submit("m", prompt=prompt("x" * 4000, "y"))
    assert ticket.grant is not None
    for seconds in (float("nan"), float("inf"), -5.0, 1e9):
        s.learn(
            ticket.grant, prompt_tokens=1000, cached_tokens=0, prefill_seconds=seconds, evaluated_tokens=1000
        )
    assert s.snapshot()["backends"][0]["prefill_ms_per_token"] is None
    s.learn(ticket.grant, prompt_tokens=10**12, cached_tokens=-3, prefill_seconds=None)
    row = s.snapshot()["prompt_cache"][0]
    assert row["cached_tokens"] == 0  # a negative count is none
