"""``core.residency``: what to load and unload where, decided from the scheduler's state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from local_inference_pool.core.residency import (
    Drain,
    Load,
    Residence,
    Residency,
    Undrain,
    Unload,
    place_models,
    reserve,
    unreserve,
)
from local_inference_pool.core.scheduler import Grant, Health, Scheduler
from local_inference_pool.errors import NoCapacityError

from ..clock import Clock


def fleet(
    clock: Clock, *, servers: int = 2, max_loaded: int = 1, models: tuple[str, ...] = ("a", "b", "c")
) -> Scheduler:
    """Routers that serve every model and hold ``max_loaded`` at once, nothing loaded yet."""
    s = Scheduler(clock=clock)
    for index in range(servers):
        s.add_backend(f"s{index}", f"http://s{index}", slots=2, models=models, max_loaded_models=max_loaded)
        s.update_backend(f"s{index}", resident=[])
    place_models(s, frozenset(models), {f"s{index}" for index in range(servers)})
    return s


def carry_out(s: Scheduler, r: Residency, action: Load | Unload, *, ok: bool = True) -> None:
    """What the placement driver does, at once: mark, change, record, unmark."""
    r.began(action)
    backend = s.backends[action.backend]
    resident = [m for m in backend.resident if m not in (action.model, getattr(action, "evict", None))]
    if ok and isinstance(action, Load):
        resident.insert(0, action.model)
    s.update_backend(action.backend, resident=resident if ok else backend.resident, changing={})
    r.ended(action, ok=ok)


def step(s: Scheduler, r: Residency, names: list[str]) -> list[Load | Unload | Drain | Undrain]:
    actions = r.decide(s, names)
    for action in actions:
        if isinstance(action, Drain):
            r.began(action)
            reserve(s, action.backend, action.model)
        elif isinstance(action, Undrain):
            r.began(action)
            unreserve(s, action.backend, action.model)
        else:
            carry_out(s, r, action)
    return actions


def test_preload_loads_on_the_named_backends_once(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(preload=("s1",))})
    assert r.decide(s, ["s0", "s1"]) == [Load("s1", "a", "preload")]
    carry_out(s, r, Load("s1", "a", "preload"))
    assert r.decide(s, ["s0", "s1"]) == []
    s.update_backend("s1", resident=[])  # unloaded while the server stayed up: not loaded again
    assert r.decide(s, ["s0", "s1"]) == []


def test_preload_comes_back_after_the_server_restarts(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(preload=("s0",))})
    step(s, r, ["s0", "s1"])
    s.update_backend("s0", health=Health.UNHEALTHY)
    assert r.decide(s, ["s0", "s1"]) == []  # not while it is down
    s.update_backend("s0", health=Health.HEALTHY, resident=[])
    assert r.decide(s, ["s0", "s1"]) == [Load("s0", "a", "preload")]


def test_preload_anywhere_picks_one_server_and_returns_there_after_its_restart(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(preload=True)})
    assert step(s, r, ["s0", "s1"]) == [Load("s0", "a", "preload")]
    assert r.decide(s, ["s0", "s1"]) == []
    s.update_backend("s0", health=Health.UNHEALTHY)
    assert r.decide(s, ["s0", "s1"]) == []  # not to s1: it goes back where it was
    s.update_backend("s0", health=Health.HEALTHY, resident=[])
    assert r.decide(s, ["s0", "s1"]) == [Load("s0", "a", "preload")]


def test_idle_unload_waits_for_the_ttl_and_never_takes_a_model_in_use(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(preload=("s0",), idle_unload=60)})
    step(s, r, ["s0", "s1"])
    ticket = s.submit("a")
    assert ticket.grant is not None
    assert ticket.grant.backend.name == "s0"
    clock.advance(120)
    assert r.decide(s, ["s0", "s1"]) == []  # a lease holds it
    s.release(ticket.grant)  # last seen in use at the look before: idle from there
    clock.advance(59)
    assert r.decide(s, ["s0", "s1"]) == []
    clock.advance(1)
    assert r.decide(s, ["s0", "s1"]) == [Unload("s0", "a", "idle")]


def test_another_processs_lease_keeps_a_model(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(idle_unload=10)})
    s.update_backend("s0", resident=["a"], foreign_models=["a"])
    clock.advance(60)
    assert r.decide(s, ["s0"]) == []
    s.update_backend("s0", foreign_models=[])
    clock.advance(11)
    assert r.decide(s, ["s0"]) == [Unload("s0", "a", "idle")]


def test_a_placed_model_with_requests_and_no_replica_is_loaded_and_they_wait_for_it(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(idle_unload=300)})
    ticket = s.submit("a", timeout=60)
    assert ticket.grant is None  # not sent into a load by request: it waits for the pool's load
    (action,) = r.decide(s, ["s0", "s1"])
    assert action == Load("s0", "a", "demand")
    r.began(action)
    s.update_backend("s0", changing={"a": "loading"})
    assert ticket.grant is None  # still loading
    s.update_backend("s0", resident=["a"], changing={})
    r.ended(action, ok=True)
    assert ticket.grant is not None
    assert ticket.grant.backend.name == "s0"


def backlog(s: Scheduler, clock: Clock, model: str, lease: float, waiting: int) -> list[Grant]:
    """Every slot of the model's replicas busy for ``lease`` seconds so far, and ``waiting`` more."""
    grants = []
    for _ in range(sum(b.slots for b in s.table.resident_on.get(model, ()))):
        ticket = s.submit(model)
        assert ticket.grant is not None
        grants.append(ticket.grant)
    clock.advance(lease)
    s.release(grants.pop())
    ticket = s.submit(model)
    assert ticket.grant is not None
    grants.append(ticket.grant)
    for _ in range(waiting):
        s.submit(model, timeout=600)
    return grants


def test_a_backlog_longer_than_load_after_loads_a_second_replica_into_free_room(clock: Clock) -> None:
    s = fleet(clock, max_loaded=2)
    r = Residency(clock, {"a": Residence(load_after=5)})
    s.update_backend("s0", resident=["a"])
    s.update_backend("s1", resident=["b"])
    backlog(s, clock, "a", lease=4, waiting=1)  # 1 ahead of 2 busy slots: one lease, 4 s
    assert r.decide(s, ["s0", "s1"]) == []
    for _ in range(4):
        s.submit("a", timeout=600)  # 5 ahead: three rounds, 12 s
    assert r.decide(s, ["s0", "s1"]) == [Load("s1", "a", "demand")]


def test_the_least_recently_used_idle_model_makes_room(clock: Clock) -> None:
    s = fleet(clock, servers=2, max_loaded=2)
    r = Residency(clock, {"a": Residence(load_after=5)})
    s.update_backend("s0", resident=["a"])
    s.update_backend("s1", resident=["b", "c"])
    r.decide(s, ["s0", "s1"])
    clock.advance(30)
    used = s.submit("c", pin="s1")
    assert used.grant is not None
    r.decide(s, ["s0", "s1"])  # c in use now: b is the least recently used
    s.release(used.grant)
    backlog(s, clock, "a", lease=10, waiting=6)
    assert r.decide(s, ["s0", "s1"]) == [Load("s1", "a", "demand", evict="b")]


def test_a_load_that_costs_more_than_the_wait_is_not_made(clock: Clock) -> None:
    s = fleet(clock, max_loaded=2)
    r = Residency(clock, {"a": Residence(preload=("s0",), load_after=5)})
    action = r.decide(s, ["s0", "s1"])[0]
    r.began(action)
    clock.advance(40)  # the preload took 40 s: loads of a cost that much
    s.update_backend("s0", resident=["a"])
    r.ended(action, ok=True)
    assert r.load_seconds("s1", "a") == 40  # learned on s0, assumed elsewhere
    backlog(s, clock, "a", lease=4, waiting=8)  # about 20 s of wait: less than a load
    assert r.decide(s, ["s0", "s1"]) == []
    for _ in range(12):
        s.submit("a", timeout=600)  # about 44 s: now worth it
    assert r.decide(s, ["s0", "s1"]) == [Load("s1", "a", "demand")]


def test_a_changing_backend_takes_no_request_for_another_model_and_none_for_the_loading_one(
    clock: Clock,
) -> None:
    s = fleet(clock, servers=1, max_loaded=1)
    s.update_backend("s0", resident=["a"], changing={"b": "loading"})
    place_models(s, frozenset(), set())
    assert s.submit("a", timeout=5).grant is None  # a would be evicted by b's load
    assert s.submit("b", timeout=5).grant is None  # b is not loaded yet
    s.update_backend("s0", resident=["b"], changing={})
    assert s.backends["s0"].active == {"b": 1}


def test_one_action_per_backend_and_none_on_a_busy_one(clock: Clock) -> None:
    s = fleet(clock, servers=1, max_loaded=2)
    r = Residency(clock, {"a": Residence(preload=("s0",)), "b": Residence(preload=("s0",))})
    first = r.decide(s, ["s0"])
    assert len(first) == 1
    r.began(first[0])
    assert r.decide(s, ["s0"]) == []
    s.update_backend("s0", resident=[first[0].model])
    r.ended(first[0], ok=True)
    assert len(r.decide(s, ["s0"])) == 1


def test_a_backend_that_left_is_forgotten(clock: Clock) -> None:
    s = fleet(clock)
    r = Residency(clock, {"a": Residence(preload=("s0",), idle_unload=5)})
    step(s, r, ["s0", "s1"])
    s.remove_backend("s0")
    r.forget("s0")
    assert r.index_sizes() == {"residency_used": 0, "residency_load_times": 0, "residency_failed_loads": 0}


MODELS = ("a", "b", "c")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["submit", "release", "tick", "advance", "down", "up", "finish"]),
            st.integers(0, 2),
        ),
        max_size=60,
    ),
    st.integers(1, 2),
)
def test_placement_keeps_its_invariants(ops: list[tuple[str, int]], max_loaded: int) -> None:
    """Whatever the traffic and the servers do: no server holds more than it may, no model is
    unloaded under a lease or a waiting request, one change at a time per server, and no request
    goes to a server for a model that is not loaded there or while its place is changing."""
    clock = Clock()
    s = fleet(clock, servers=3, max_loaded=max_loaded)
    r = Residency(
        clock,
        {
            "a": Residence(preload=("s0",), idle_unload=20, load_after=1),
            "b": Residence(idle_unload=5, load_after=1),
            "c": Residence(preload=True, load_after=3),
        },
    )
    names = ["s0", "s1", "s2"]
    grants: list[Grant] = []
    pending: list[Load | Unload] = []

    def check_grants() -> None:
        for grant in s.grants.values():
            backend = grant.backend
            assert grant.model in backend.resident or grant.model in backend.active
            assert grant.model not in backend.changing

    for op, n in ops:
        if op == "submit":
            try:
                ticket = s.submit(MODELS[n], timeout=1000)
            except NoCapacityError:
                continue  # every server down: refused at once, as it should be
            if ticket.grant is not None:
                grants.append(ticket.grant)
        elif op == "release" and grants:
            s.release(grants.pop(n % len(grants)))
        elif op == "advance":
            clock.advance(3.0 * (n + 1))
            s.refresh()
        elif op == "down":
            s.update_backend(names[n], health=Health.UNHEALTHY)
        elif op == "up":
            s.update_backend(names[n], health=Health.HEALTHY)
        elif op == "tick":
            for action in r.decide(s, names):
                assert all(action.backend != p.backend for p in pending)
                if isinstance(action, Drain):
                    r.began(action)
                    reserve(s, action.backend, action.model)
                    continue
                if isinstance(action, Undrain):
                    r.began(action)
                    unreserve(s, action.backend, action.model)
                    continue
                backend = s.backends[action.backend]
                if isinstance(action, Unload) or (isinstance(action, Load) and action.evict):
                    victim = action.model if isinstance(action, Unload) else str(action.evict)
                    assert victim not in backend.active
                    others = [b for b in s.table.resident_on.get(victim, ()) if b is not backend]
                    assert not s.queues.by_model.get(victim) or others
                r.began(action)
                marks = {action.model: "loading" if isinstance(action, Load) else "unloading"}
                if isinstance(action, Load) and action.evict:
                    marks[action.evict] = "unloading"
                s.update_backend(action.backend, changing=marks)
                pending.append(action)
        elif op == "finish" and pending:
            action = pending.pop(0)
            backend = s.backends[action.backend]
            gone = {action.model, getattr(action, "evict", None)}
            resident = [m for m in backend.resident if m not in gone]
            if isinstance(action, Load):
                resident.insert(0, action.model)
            s.update_backend(action.backend, resident=resident, changing={})
            r.ended(action, ok=True)
        for name in names:
            backend = s.backends[name]
            assert len(set(backend.resident) | backend.active.keys()) <= max_loaded
        for grant in s.take_events().granted:
            assert grant.grant is not None
            grants.append(grant.grant)
        check_grants()


def a_on_one_b_busy_on_two(clock: Clock) -> tuple[Scheduler, dict[str, Grant | None]]:
    """Three one-model servers: ``a`` on s0, ``b`` on s1 and s2 with a lease on each."""
    s = fleet(clock, servers=3, max_loaded=1)
    s.update_backend("s0", resident=["a"])
    s.update_backend("s1", resident=["b"])
    s.update_backend("s2", resident=["b"])
    return s, {name: s.submit("b", pin=name).grant for name in ("s1", "s2")}


def test_a_backlog_with_no_place_free_drains_a_server_whose_model_runs_elsewhere_too(clock: Clock) -> None:
    s, leases = a_on_one_b_busy_on_two(clock)
    r = Residency(clock, {"a": Residence(load_after=5)})
    backlog(s, clock, "a", lease=10, waiting=6)
    (drain,) = r.decide(s, ["s0", "s1", "s2"])
    assert drain == Drain("s1", "a")
    r.began(drain)
    reserve(s, "s1", "a")
    assert (
        s.submit("b", timeout=60).grant is None or s.backends["s1"].active.get("b") == 1
    )  # s1 takes no more b
    assert r.decide(s, ["s0", "s1", "s2"]) == []  # one drain for a model at a time
    grant = leases["s1"]
    assert grant is not None
    s.release(grant)  # what ran there ended
    assert r.decide(s, ["s0", "s1", "s2"]) == [Load("s1", "a", "demand", evict="b")]


def test_a_server_whose_only_copy_of_a_waiting_model_is_not_drained(clock: Clock) -> None:
    s = fleet(clock, servers=2, max_loaded=1)
    r = Residency(clock, {"a": Residence(load_after=5)})
    s.update_backend("s0", resident=["a"])
    s.update_backend("s1", resident=["b"])
    lease = s.submit("b").grant
    assert lease is not None
    backlog(s, clock, "a", lease=10, waiting=6)
    s.submit("b", timeout=60)  # b waits too, and s1 is its only server
    assert r.decide(s, ["s0", "s1"]) == []


def test_a_reservation_the_backlog_no_longer_needs_is_lifted(clock: Clock) -> None:
    s, _ = a_on_one_b_busy_on_two(clock)
    r = Residency(clock, {"a": Residence(load_after=15)})
    backlog(s, clock, "a", lease=10, waiting=0)
    waiting = [s.submit("a", timeout=600) for _ in range(6)]  # (6 // 2 + 1) leases of 10 s: 40 s
    assert step(s, r, ["s0", "s1", "s2"]) == [Drain("s1", "a")]
    for ticket in waiting[1:]:
        s.cancel(ticket)  # one left: a wait of 10 s, below load_after
    assert s.backends["s1"].barrier == "a"
    assert step(s, r, ["s0", "s1", "s2"]) == [Undrain("s1", "a")]
    assert s.backends["s1"].barrier is None


def test_a_load_that_failed_is_tried_there_again_after_a_pause_that_doubles(clock: Clock) -> None:
    s = fleet(clock, servers=1)
    r = Residency(clock, {"a": Residence(preload=("s0",))})
    for pause in (10, 20, 40):
        (load,) = r.decide(s, ["s0"])
        r.began(load)
        r.ended(load, ok=False)  # the server could not load it
        clock.advance(pause - 1)
        assert r.decide(s, ["s0"]) == []
        clock.advance(1)
    (load,) = r.decide(s, ["s0"])
    r.began(load)
    r.ended(load, ok=False, tried=False)  # another process held the server: no failure of it
    assert r.decide(s, ["s0"]) == [load]
