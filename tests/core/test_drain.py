"""An operator's drain in the scheduler: no new lease but a pinned one, running leases finish,
requests held for the backend's cache go elsewhere at once, and undrain returns it to service."""

from __future__ import annotations

from local_inference_pool.core.scheduler import TicketState

from ..clock import Clock
from .test_scheduler import backend_of, cache_pair, hold_a_turn, make, state


def test_a_draining_backend_gets_no_new_lease_and_is_drained_when_its_leases_end(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=2, models=["m"])
    s.add_backend("b", "http://b", slots=2, models=["m"])
    running = s.submit("m", pin="a")
    assert state(running) is TicketState.GRANTED
    s.update_backend("a", draining=True)
    assert s.backends["a"].admin_state == "draining"
    assert not s.drained("a")
    later = [s.submit("m") for _ in range(3)]
    assert [backend_of(t) for t in later[:2]] == ["b", "b"]
    assert state(later[2]) is TicketState.WAITING  # a has a free slot, but takes no new lease
    assert running.grant is not None
    s.release(running.grant)
    assert s.drained("a")
    assert s.backends["a"].admin_state == "drained"
    assert state(later[2]) is TicketState.WAITING
    s.update_backend("a", draining=False)
    assert backend_of(later[2]) == "a"
    assert s.backends["a"].admin_state == "active"


def test_a_request_pinned_to_a_draining_backend_is_still_served_there(clock: Clock) -> None:
    s, _ = make(clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.add_backend("b", "http://b", slots=1, models=["m"])
    s.update_backend("a", draining=True)
    pinned = s.submit("m", pin="a")
    assert backend_of(pinned) == "a"
    assert s.alternative("m", avoid=["b"]) is None  # a retry is never pinned to a draining backend


def test_requests_held_for_a_draining_backends_cache_go_back_to_their_queue_at_once(clock: Clock) -> None:
    s, _ = cache_pair(clock)
    holder, turn, later = hold_a_turn(s, clock)
    s.update_backend("a", draining=True)
    assert turn.held_for is None
    assert state(turn) is TicketState.WAITING
    assert later.grant is not None
    s.release(later.grant)  # b frees: the turn goes there, not back to the draining a
    assert backend_of(turn) == "b"
    assert holder.grant is not None
    s.release(holder.grant)
    assert s.drained("a")


def test_a_draining_backend_takes_no_barrier_for_a_starving_model(clock: Clock) -> None:
    s, _ = make(clock, starvation_bound=1.0)
    s.add_backend("a", "http://a", slots=1, models=["m", "n"], resident=["m"])
    s.add_backend("b", "http://b", slots=1, models=["m", "n"], resident=["m"])
    on_a, on_b = s.submit("m", pin="a"), s.submit("m", pin="b")
    s.update_backend("a", draining=True)
    starving = s.submit("n")
    clock.advance(2.0)
    newer = s.submit("m")
    assert on_b.grant is not None
    s.release(on_b.grant)  # b serves the newer m: n starves, and only b may be drained for it
    assert backend_of(newer) == "b"
    assert s.backends["a"].barrier is None
    assert s.backends["b"].barrier == "n"
    assert newer.grant is not None
    assert on_a.grant is not None
    s.release(on_a.grant)
    assert state(starving) is TicketState.WAITING  # a, drained, takes nothing
    s.release(newer.grant)
    assert backend_of(starving) == "b"
