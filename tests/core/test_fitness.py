"""``core.fitness``: why a model cannot serve a request well now (what fallbacks decide on)."""

from __future__ import annotations

from local_inference_pool.core.fitness import expected_wait, unfit
from local_inference_pool.core.scheduler import Health, Scheduler

from ..clock import Clock


def test_a_model_without_a_healthy_server_is_unhealthy(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    assert unfit(s, "m", 10, None) == "unhealthy"  # no server at all
    s.add_backend("a", "http://a", slots=1, models=["m"])
    assert unfit(s, "m", 10, None) is None
    s.update_backend("a", health=Health.UNHEALTHY)
    assert unfit(s, "m", 10, None) == "unhealthy"


def test_a_prompt_longer_than_every_servers_context_is_context(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.update_backend("a", context=4096)
    assert unfit(s, "m", 4000, None) is None
    assert unfit(s, "m", 5000, None) == "context"
    s.add_backend("b", "http://b", slots=1, models=["m"])  # says nothing of its context: not judged
    assert unfit(s, "m", 5000, None) is None


def test_the_expected_wait_counts_the_queue_by_slots_and_the_mean_lease(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=2, models=["m"])
    assert expected_wait(s, "m") == 0.0  # free slots
    first, second = s.submit("m"), s.submit("m")
    assert expected_wait(s, "m") is None  # no lease timed yet: not judged
    assert unfit(s, "m", 10, 1.0) is None
    clock.advance(4.0)
    assert first.grant is not None
    s.release(first.grant)  # a lease of 4 s
    third = s.submit("m")
    assert third.grant is not None
    for _ in range(3):
        s.submit("m")  # three waiting for two busy slots
    assert expected_wait(s, "m") == 2 * 4.0  # the fourth in line waits for two rounds of leases
    assert unfit(s, "m", 10, 5.0) == "wait"
    assert unfit(s, "m", 10, 10.0) is None
    assert second.grant is not None


def test_a_models_own_context_on_a_server_counts_before_the_servers_per_slot(clock: Clock) -> None:
    s = Scheduler(clock=clock)
    s.add_backend("a", "http://a", slots=1, models=["m"])
    s.update_backend("a", context=4096)
    assert unfit(s, "m", 6000, None, {"a": 8192}) is None
    assert unfit(s, "m", 6000, None, {}) == "context"
    s.add_backend("b", "http://b", slots=1, models=["m"])
    assert unfit(s, "m", 9000, None, {"a": 8192, "b": 4096}) == "context"
