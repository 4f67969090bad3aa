"""Property-based tests: random workloads against the scheduler, invariants checked at every step.

The invariants are DESIGN.md's, stated independently of the scheduler's own predicates:
1. a grant never puts a backend over its slots, or on a backend that is not healthy or does not
   list the model, or past its max_loaded_models distinct active models (the drain guard);
2. every grant is released exactly once: a second release frees nothing;
3. after quiescence every backend has zero leases and the queue is empty;
4. no waiting request could have run without a model load on a free backend (no lost wake-ups),
   unless its tenant is at its cap;
6. after a refresh, no request waits past its deadline;
7. no tenant holds more leases than its max_concurrent, or has more waiting than its max_queued;
   each model's queue holds at most queue_limit;
8. a request held for a backend's prompt cache is held for a healthy backend that lists its model,
   for at most ``cache_wait_max``, and never past it after a refresh; its holder never has a slot
   it could take while it waits (its lost wake-up).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from local_inference_pool.core.prompt_index import Prompt, prompt_of
from local_inference_pool.core.scheduler import Backend, Grant, Health, Scheduler, Ticket, TicketState
from local_inference_pool.errors import PoolError

MODELS = ["m0", "m1", "m2"]
NAMES = ["b0", "b1", "b2", "b3"]
TENANTS = {
    "t0": {"max_concurrent": 2},
    "t1": {"weight": 2.0},
    "t2": {"max_concurrent": 1, "max_queued": 3},
    "": {},
}
DOCUMENT = "".join(f"line {i} of a long shared document. " for i in range(120))
PROMPTS = [
    [DOCUMENT, "question one?"],
    [DOCUMENT, "question two?"],
    [DOCUMENT[:1500], "a short shared start"],
    ["a prompt of its own " * 40, "and its turn"],
]
CACHE_WAIT_MAX = 4.0


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.scheduler = Scheduler(
            clock=lambda: self.now,
            queue_limit=12,
            starvation_bound=10.0,
            affinity_max_sessions=3,
            affinity_ttl=50.0,
            cache_wait_max=CACHE_WAIT_MAX,
            prefix_min_tokens=64,
        )
        self.tickets: list[Ticket] = []
        self.live: list[Grant] = []
        self.released: list[Grant] = []
        for name, settings_ in TENANTS.items():
            self.scheduler.set_tenant(name, **settings_)  # type: ignore[arg-type]

    def take_events(self) -> None:
        """Check each grant the scheduler reported since the last look (every invariant looks
        first, so each rule's grants are checked before anything else is)."""
        for ticket in self.scheduler.take_events().granted:
            if ticket.state is TicketState.GRANTED:
                assert ticket.grant is not None
                self.check_grant(ticket.grant)

    def check_grant(self, grant: Grant) -> None:
        backend = grant.backend
        assert backend.active_total + backend.external_busy <= backend.slots, "over slots"
        assert backend.health is Health.HEALTHY, "granted on a backend that is not healthy"
        assert backend.models is not None
        assert grant.model in backend.models, "model not listed"
        assert len(backend.active) <= backend.max_loaded_models, "drain guard broken"
        if grant.ticket.pin is not None:
            assert grant.ticket.pin == backend.name
        self.live.append(grant)
        tenant = grant.ticket.tenant
        held = sum(1 for g in self.live if g.ticket.tenant is tenant and not g.released)
        assert tenant.max_concurrent is None or held <= tenant.max_concurrent, "over a tenant's cap"

    # --- backends --------------------------------------------------------------------------

    @initialize(slots=st.lists(st.integers(1, 2), min_size=0, max_size=2))
    def start_serving(self, slots: list[int]) -> None:
        """Most runs start with healthy backends serving, so requests meet each other's caches."""
        for name, count in zip(NAMES, slots, strict=False):
            self.scheduler.add_backend(
                name, f"http://{name}", slots=count, models=MODELS[:2], resident=["m0"]
            )

    @rule(
        name=st.sampled_from(NAMES),
        slots=st.integers(1, 3),
        models=st.none() | st.sets(st.sampled_from(MODELS), max_size=3),
        max_loaded=st.integers(1, 2),
        health=st.sampled_from(list(Health)),
    )
    def add_backend(
        self, name: str, slots: int, models: set[str] | None, max_loaded: int, health: Health
    ) -> None:
        if name in self.scheduler.backends:
            return
        self.scheduler.add_backend(
            name, f"http://{name}", slots=slots, models=models, max_loaded_models=max_loaded, health=health
        )

    @rule(name=st.sampled_from(NAMES))
    def remove_backend(self, name: str) -> None:
        if name in self.scheduler.backends:
            self.scheduler.remove_backend(name)

    @rule(
        name=st.sampled_from(NAMES),
        slots=st.none() | st.integers(1, 4),
        models=st.none() | st.sets(st.sampled_from(MODELS), max_size=3),
        health=st.none() | st.sampled_from(list(Health)),
        resident=st.none() | st.lists(st.sampled_from(MODELS), max_size=2),
        external=st.none() | st.integers(0, 2),
    )
    def update_backend(
        self,
        name: str,
        slots: int | None,
        models: set[str] | None,
        health: Health | None,
        resident: list[str] | None,
        external: int | None,
    ) -> None:
        if name not in self.scheduler.backends:
            return
        changes: dict[str, object] = {}
        if slots is not None:
            changes["slots"] = slots
        if models is not None:
            changes["models"] = models
        if health is not None:
            changes["health"] = health
        if resident is not None:
            changes["resident"] = resident
        if external is not None:
            changes["external_busy"] = external
        self.scheduler.update_backend(name, **changes)  # type: ignore[arg-type]

    # --- requests --------------------------------------------------------------------------

    @rule(
        model=st.sampled_from(MODELS),
        priority=st.integers(0, 2),
        session=st.none() | st.sampled_from(["s0", "s1", "s2", "s3"]),
        timeout=st.none() | st.floats(0.5, 30.0),
        tenant=st.sampled_from(list(TENANTS)),
        prompt=st.none() | st.sampled_from(range(len(PROMPTS))),
    )
    def submit(
        self,
        model: str,
        priority: int,
        session: str | None,
        timeout: float | None,
        tenant: str,
        prompt: int | None,
    ) -> None:
        given: Prompt | None = None if prompt is None else prompt_of(PROMPTS[prompt], model=model)
        try:
            ticket = self.scheduler.submit(
                model, priority=priority, affinity_key=session, timeout=timeout, tenant=tenant, prompt=given
            )
        except PoolError:
            return
        self.tickets.append(ticket)

    @rule(model=st.sampled_from(MODELS), name=st.sampled_from(NAMES))
    def submit_pinned(self, model: str, name: str) -> None:
        try:
            ticket = self.scheduler.submit(model, pin=name)
        except PoolError:
            return
        self.tickets.append(ticket)

    @rule(model=st.sampled_from(MODELS), tenant=st.sampled_from(list(TENANTS)))
    def try_acquire(self, model: str, tenant: str) -> None:
        grant = self.scheduler.try_acquire(model, tenant=tenant)
        if grant is not None:
            self.check_grant(grant)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        grant = data.draw(st.sampled_from(self.live))
        self.live.remove(grant)
        assert self.scheduler.release(grant) is True
        self.released.append(grant)

    @precondition(lambda self: self.live)
    @rule(
        data=st.data(),
        cached=st.integers(0, 2000),
        prefill=st.none() | st.floats(0.0, 5.0),
        evaluated=st.integers(0, 2000),
    )
    def learn(self, data: st.DataObject, cached: int, prefill: float | None, evaluated: int) -> None:
        grant = data.draw(st.sampled_from(self.live))
        self.scheduler.learn(
            grant,
            prompt_tokens=cached + evaluated,
            cached_tokens=cached,
            prefill_seconds=prefill,
            evaluated_tokens=evaluated,
        )

    @precondition(lambda self: self.released)
    @rule(data=st.data())
    def release_again(self, data: st.DataObject) -> None:
        grant = data.draw(st.sampled_from(self.released))
        before = {b.name: b.active_total for b in self.scheduler.backends.values()}
        assert self.scheduler.release(grant) is False
        assert before == {b.name: b.active_total for b in self.scheduler.backends.values()}

    @precondition(lambda self: self.tickets)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        ticket = data.draw(st.sampled_from(self.tickets))
        grant = ticket.grant if ticket.state is TicketState.GRANTED else None
        self.scheduler.cancel(ticket)
        if grant is not None:
            assert grant.released
            self.live.remove(grant)
            self.released.append(grant)

    @rule(seconds=st.floats(0.0, 20.0) | st.sampled_from([0.1, 0.5, 2.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.scheduler.refresh()
        for ticket in self.tickets:
            if ticket.state is TicketState.WAITING and ticket.deadline is not None:
                assert ticket.deadline > self.now, "a request waits past its deadline"
            if ticket.state is TicketState.WAITING and ticket.held_for is not None:
                assert ticket.hold_until is not None
                assert ticket.hold_until > self.now, "held past its hold"

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def leases_add_up(self) -> None:
        self.take_events()
        by_backend: dict[int, int] = {}
        for grant in self.live:
            assert not grant.released
            by_backend[id(grant.backend)] = by_backend.get(id(grant.backend), 0) + 1
        for backend in self.scheduler.backends.values():
            assert backend.active_total == sum(backend.active.values()) == by_backend.get(id(backend), 0)
            assert all(count > 0 for count in backend.active.values())
        assert len(self.scheduler.grants) == len(self.live)

    @invariant()
    def queue_adds_up(self) -> None:
        self.take_events()
        waiting = [t for t in self.tickets if t.state is TicketState.WAITING]
        assert self.scheduler.waiting == len(waiting)
        for model in MODELS:
            assert sum(1 for t in waiting if t.model == model) <= self.scheduler.queue_limit
        assert sorted(t.id for t in self.scheduler.waiting_tickets()) == sorted(t.id for t in waiting)

    @invariant()
    def tenants_add_up(self) -> None:
        self.take_events()
        for name, tenant in self.scheduler.tenants.items():
            held = sum(1 for g in self.live if g.ticket.tenant is tenant)
            waiting = sum(1 for t in self.tickets if t.tenant is tenant and t.state is TicketState.WAITING)
            assert tenant.active == held, name
            assert tenant.waiting == waiting, name
            assert tenant.max_concurrent is None or held <= tenant.max_concurrent, name
            assert tenant.max_queued is None or waiting <= tenant.max_queued, name

    @invariant()
    def holds_are_bounded(self) -> None:
        self.take_events()
        held = [t for t in self.tickets if t.state is TicketState.WAITING and t.held_for is not None]
        shown = self.scheduler.snapshot()["backends"]
        assert sum(b["held_for_cache"] for b in shown) == len(held)
        for ticket in self.tickets:
            holder = ticket.held_for
            if ticket.state is not TicketState.WAITING or holder is None:
                continue
            assert holder.health is Health.HEALTHY, "held for a backend that is down"
            assert not holder.removed, "held for a backend that went"
            assert holder.models is not None
            assert ticket.model in holder.models
            assert ticket.hold_started is not None
            assert ticket.hold_until is not None
            assert ticket.hold_until - ticket.hold_started <= CACHE_WAIT_MAX

    @invariant()
    def no_lost_wakeup(self) -> None:
        self.take_events()
        for ticket in self.tickets:
            if ticket.state is not TicketState.WAITING or ticket.pin is not None or ticket.tenant.capped:
                continue
            if ticket.held_for is not None:
                assert not _could_run_without_load(ticket.held_for, ticket.model), (
                    f"{ticket.model} waits for {ticket.held_for.name}'s cache while it has room"
                )
                continue
            for backend in self.scheduler.backends.values():
                assert not _could_run_without_load(backend, ticket.model), (
                    f"{ticket.model} waits while {backend.name} could run it"
                )

    def teardown(self) -> None:
        for grant in list(self.live):
            self.scheduler.release(grant)
        for ticket in self.tickets:
            self.scheduler.cancel(ticket)
        # Granting during teardown is fine, but it must be released too.
        for grant in list(self.scheduler.grants.values()):
            self.scheduler.release(grant)
        assert self.scheduler.waiting == 0
        assert not self.scheduler.grants
        for backend in self.scheduler.backends.values():
            assert backend.active_total == 0
            assert backend.active == {}


def _could_run_without_load(backend: Backend, model: str) -> bool:
    """A free, healthy backend that lists the model, has it loaded, and is not reserved for another."""
    if backend.health is not Health.HEALTHY or backend.models is None or model not in backend.models:
        return False
    if backend.slots - backend.active_total - backend.external_busy <= 0:
        return False
    if backend.barrier not in (None, model):
        return False
    if model in backend.active:
        return True
    return model in backend.resident and len(backend.active) < backend.max_loaded_models


SchedulerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase
