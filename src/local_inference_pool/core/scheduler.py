"""The scheduling core: a pure, synchronous state machine with an injected clock and no I/O.

Every decision happens inside one synchronous call, so "check a slot is free and take it" can never
be split by an await, and the same object can be driven by a discrete-event simulator.

The scheduler never calls back. A call that grants, fails or holds waiting tickets records it as
``Events``; the caller takes them with ``take_events()`` once the call has returned and acts on them
(the pool wakes their waiters), as h11 hands back events instead of calling a handler. So nothing
outside runs in the middle of a scheduler call, and the call's own state is consistent when it does.

The scheduler is a coordinator over parts that each own their indexes (``model`` has the
vocabulary): ``backends`` (the backends and which serve and hold which model), ``queues`` (waiting
tickets, their orders and the tenants' fair shares), ``placement`` (which backend, waiting for a
cache, starvation), ``learning`` (prompt caches, prefill and lease times), ``sessions`` (affinity),
and ``status`` (the JSON view), and ``dispatch`` (handing slots to tickets).

Dispatch (``dispatch``) runs after every change that can free capacity and grants everything it
can in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from local_inference_pool.core.backends import BackendTable
from local_inference_pool.core.dispatch import Dispatch
from local_inference_pool.core.learning import CacheModel
from local_inference_pool.core.model import (
    Affinity,
    Backend,
    Events,
    Grant,
    Health,
    LeaseRequest,
    Tenant,
    Ticket,
    TicketState,
)
from local_inference_pool.core.placement import Placement
from local_inference_pool.core.prompt_index import CacheStats
from local_inference_pool.core.queues import Queues
from local_inference_pool.core.sessions import SessionMemory
from local_inference_pool.core.status import index_sizes, snapshot
from local_inference_pool.core.views import SchedulerViews
from local_inference_pool.errors import (
    NoCapacityError,
    PoolError,
    QueueFullError,
    TenantQueueFullError,
)

__all__ = [
    "Affinity",
    "Backend",
    "Events",
    "Grant",
    "Health",
    "LeaseRequest",
    "Scheduler",
    "Tenant",
    "Ticket",
    "TicketState",
]

_UNSET: Final[Any] = object()


class Scheduler(SchedulerViews):
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        queue_limit: int = 1000,
        starvation_bound: float = 30.0,
        affinity: bool = True,
        affinity_ttl: float = 1800.0,
        affinity_max_sessions: int = 10_000,
        cache_wait_max: float = 10.0,
        prefill_seconds_per_token: float = 0.0005,
        prefix_min_tokens: int = 256,
        prefix_index_blocks: int = 65_536,
    ) -> None:
        self.clock = clock
        self.queue_limit = queue_limit
        self.table = BackendTable()
        self.backends = self.table.backends
        self.queues = Queues()
        self.tenants = self.queues.tenants
        self.grants: dict[int, Grant] = {}
        self.sessions = SessionMemory(
            clock, enabled=affinity, ttl=affinity_ttl, max_sessions=affinity_max_sessions
        )
        self.learning = CacheModel(
            clock,
            self.backends,
            prefill_seconds_per_token=prefill_seconds_per_token,
            prefix_index_blocks=prefix_index_blocks,
        )
        self.placement = Placement(
            clock,
            self.table,
            self.queues,
            self.learning,
            self.sessions,
            self.grants,
            starvation_bound=starvation_bound,
            cache_wait_max=cache_wait_max,
            prefix_min_tokens=prefix_min_tokens,
        )
        self.dispatch = Dispatch(
            clock, self.table, self.queues, self.placement, self.learning, self.sessions, self.grants
        )
        self.stats = self.dispatch.stats

    @property
    def cache_stats(self) -> dict[tuple[str, str], CacheStats]:
        return self.learning.stats

    @property
    def has_events(self) -> bool:
        """Whether calls since the last ``take_events`` did anything to waiting tickets."""
        return bool(self.dispatch.events)

    def take_events(self) -> Events:
        """What the calls since the last ``take_events`` did to waiting tickets."""
        dispatch = self.dispatch
        events, dispatch.events = dispatch.events, Events()
        return events

    def configure(
        self,
        *,
        queue_limit: int,
        starvation_bound: float,
        affinity: bool,
        affinity_ttl: float,
        affinity_max_sessions: int,
        cache_wait_max: float,
        prefill_seconds_per_token: float,
        prefix_min_tokens: int,
    ) -> None:
        """New settings (a reloaded configuration), from the next decision on; what they make
        possible at once (a raised queue limit, a shorter starvation bound) is dispatched now."""
        self.queue_limit = queue_limit
        self.placement.starvation_bound = starvation_bound
        self.placement.cache_wait_max = cache_wait_max
        self.placement.prefix_min_tokens = prefix_min_tokens
        self.learning.prefill_seconds_per_token = prefill_seconds_per_token
        sessions = self.sessions
        sessions.enabled, sessions.ttl, sessions.max_sessions = affinity, affinity_ttl, affinity_max_sessions
        self.dispatch.after_change([])

    # --- backends --------------------------------------------------------------------------

    def add_backend(
        self,
        name: str,
        url: str,
        *,
        slots: int = 1,
        models: Iterable[str] | None = None,
        max_loaded_models: int = 1,
        weight: float = 1.0,
        health: Health = Health.HEALTHY,
        resident: Sequence[str] = (),
        cache_tokens: int | None = None,
    ) -> Backend:
        backend = self.table.add(
            name,
            url,
            slots=slots,
            models=models,
            max_loaded_models=max_loaded_models,
            weight=weight,
            health=health,
            resident=resident,
            cache_tokens=cache_tokens,
        )
        self.dispatch.after_change([backend])
        return backend

    def remove_backend(self, name: str) -> None:
        """Forget a backend, and everything known of it. Its grants stay valid and releasing them
        is harmless; its pinned requests fail, and those held for its cache go back to queue."""
        backend = self.table.remove(name)
        self.dispatch.clear_barrier(backend)
        self.learning.forget(name)
        self.learning.forget_stats(name)
        self.dispatch.release_holds(backend)
        for ticket in self.queues.forget_backend(name):
            self.dispatch.fail(ticket, NoCapacityError(f"backend {name!r} was removed", model=ticket.model))
        self.dispatch.after_change([])

    def update_backend(
        self,
        name: str,
        *,
        slots: int = _UNSET,
        models: Iterable[str] | None = _UNSET,
        resident: Sequence[str] = _UNSET,
        health: Health = _UNSET,
        external_busy: int = _UNSET,
        foreign_models: Iterable[str] = _UNSET,
        weight: float = _UNSET,
        max_loaded_models: int = _UNSET,
        trial: bool = _UNSET,
        context: int | None = _UNSET,
        draining: bool = _UNSET,
        cache_tokens: int | None = _UNSET,
        url: str = _UNSET,
        changing: Mapping[str, str] = _UNSET,
    ) -> None:
        """Apply what a probe (or the operator) says; dispatch what the change makes possible.

        ``changing``: the models being loaded or unloaded on it now (model -> ``loading`` or
        ``unloading``), as the placement driver says.

        ``draining``: the operator's drain. A draining backend takes no new lease but a pinned one;
        requests held for its cache go elsewhere at once, and a barrier it held for a starving
        model moves to another backend."""
        backend = self.backends[name]
        if url is not _UNSET and url != backend.url:  # another server under the name: nothing holds
            backend.url = url
            self.learning.forget(name)
        if cache_tokens is not _UNSET:
            backend.cache_tokens = cache_tokens
        if draining is not _UNSET and draining is not backend.draining:
            backend.draining = draining
            if draining:
                self.dispatch.clear_barrier(backend)
                self.dispatch.release_holds(backend)
        if slots is not _UNSET:
            backend.slots = max(1, slots)
        if weight is not _UNSET:
            backend.weight = weight
        if max_loaded_models is not _UNSET:
            backend.max_loaded_models = max(1, max_loaded_models)
            self.dispatch.set_resident(backend, backend.resident)
        if external_busy is not _UNSET:
            backend.external_busy = max(0, external_busy)
        if foreign_models is not _UNSET:
            backend.foreign_models = frozenset(foreign_models)
        if changing is not _UNSET:
            backend.changing = dict(changing)
        if trial is not _UNSET:
            backend.trial = trial
        if context is not _UNSET:
            backend.context = context
        if models is not _UNSET:
            self.table.set_models(backend, None if models is None else frozenset(models))
        if resident is not _UNSET:
            self.dispatch.set_resident(backend, resident)
            backend.residency_known = True
        if health is not _UNSET and health is not backend.health:
            backend.health = health
            if health is not Health.HEALTHY:
                self.dispatch.clear_barrier(backend)
            if health is Health.UNHEALTHY:  # down: whatever it comes back with, its cache is gone
                self.learning.forget(name)
        if backend.health is not Health.HEALTHY or models is not _UNSET:
            self.dispatch.release_holds(backend)
        self.table.touch(backend)
        self.dispatch.after_change([backend])

    # --- tenants ---------------------------------------------------------------------------

    def set_tenant(
        self,
        name: str,
        *,
        weight: float = 1.0,
        max_concurrent: int | None = None,
        max_queued: int | None = None,
    ) -> Tenant:
        """Declare (or change) a tenant's weight and caps; an undeclared one has weight 1, no caps."""
        tenant = self.queues.declare(
            name, weight=weight, max_concurrent=max_concurrent, max_queued=max_queued
        )
        self.dispatch.unpark(tenant)
        return tenant

    def undeclare_tenant(self, name: str) -> None:
        """A key that left the configuration: its requests run on, with weight 1 and no caps, and
        the tenant is forgotten once it has none."""
        tenant = self.tenants.get(name)
        if tenant is not None:
            tenant.declared = False
            tenant.weight, tenant.max_concurrent, tenant.max_queued = 1.0, None, None
            self.dispatch.unpark(tenant)
            self.queues.forget_if_idle(tenant)

    def update_tenant(self, name: str, *, external: int) -> None:
        """What other processes of the fleet hold for a tenant (its cap counts them)."""
        tenant = self.queues.tenant(name)
        tenant.external = max(0, external)
        self.dispatch.unpark(tenant)
        self.queues.forget_if_idle(tenant)

    def has_parked(self, name: str) -> bool:
        """Whether requests of the tenant wait for one of its leases to end (it is at its cap)."""
        tenant = self.tenants.get(name)
        return tenant is not None and self.queues.has_parked(tenant)

    # --- tickets ---------------------------------------------------------------------------

    def submit(self, request: LeaseRequest | str, **fields: Any) -> Ticket:
        """Queue a request; it may come back already granted. Raises when it can never be served now.

        ``request`` is a ``LeaseRequest``, or a model name with the request's other fields as
        keywords (``submit("m", priority=1)``; ``affinity_key`` is accepted for ``session``).
        ``queue_limit`` bounds each model's queue (a backlog for one model refuses no other), and a
        tenant's ``max_queued`` its own waiting requests.
        """
        if isinstance(request, str):
            if "affinity_key" in fields:
                fields["session"] = fields.pop("affinity_key")
            request = LeaseRequest(request, **fields)
        model, queues = request.model, self.queues
        self.table.check_servable(model, request.pin)
        owner = queues.tenant(request.tenant)
        free = bool(self.table.free)
        if owner.max_queued is not None and owner.waiting >= owner.max_queued and not free:
            raise self._refused(_key_queue_full(owner), owner)
        if queues.by_model.get(model, 0) >= self.queue_limit and not free:
            raise self._refused(_queue_full(model, queues.by_model.get(model, 0), self.queue_limit), owner)
        finish = owner.finish
        tag = request.tag
        if tag is None:
            tag = queues.start_tag(owner)
            owner.finish = tag + 1.0 / owner.weight
        ticket = self._ticket(request, owner, tag)
        if request.pin is not None:
            queues.enqueue(ticket)
            self.dispatch.fill(self.backends[request.pin])
        elif not (self.table.free and model not in queues.by_model and self.dispatch.grant_new(ticket)):
            queues.enqueue(ticket)  # it waits, unless a free backend takes it now
            if self.table.free:
                self.dispatch.place(model)
        if ticket.state is TicketState.GRANTED and queues.total:
            self.dispatch.serve_starving()  # granting a newcomer may pass over an older request
        if ticket.state is TicketState.WAITING:
            error: PoolError | None = None
            if queues.by_model.get(model, 0) > self.queue_limit:
                error = _queue_full(model, queues.by_model.get(model, 0), self.queue_limit)
            elif owner.max_queued is not None and owner.waiting > owner.max_queued:
                error = _key_queue_full(owner)
            if error is not None:
                self.dispatch.withdraw(ticket, TicketState.FAILED)
                owner.finish = finish  # refused: its fair share is not charged
                raise self._refused(error, owner)
        return ticket

    def _refused(self, error: PoolError, tenant: Tenant) -> PoolError:
        self.stats["rejected"] += 1
        self.queues.forget_if_idle(tenant)
        return error

    def _ticket(self, request: LeaseRequest, owner: Tenant, tag: float) -> Ticket:
        now = self.clock()
        return Ticket(
            id=next(self.dispatch.ids),
            model=request.model,
            priority=request.priority,
            arrival=now if request.arrival is None else min(request.arrival, now),
            deadline=None if request.timeout is None else now + request.timeout,
            affinity_key=request.session if self.sessions.enabled else None,
            pin=request.pin,
            tenant=owner,
            tag=tag,
            prompt=request.prompt,
        )

    def try_acquire(self, model: str, *, affinity_key: str | None = None, tenant: str = "") -> Grant | None:
        """Take a slot now if any eligible backend has one, else None; never queues.

        Unlike a queued ticket it does not defer to a backend where the model is already loaded:
        a caller that polls would otherwise never reach the starvation bound.
        """
        owner = self.queues.tenant(tenant)
        if self.queues.by_model.get(model, 0) > 0 or owner.capped:
            self.queues.forget_if_idle(owner)
            return None
        candidates = [b for b in self.table.free_serving(model) if b.can_take(model)]
        if not candidates:
            self.queues.forget_if_idle(owner)
            return None
        ticket = self._ticket(LeaseRequest(model, session=affinity_key), owner, self.queues.start_tag(owner))
        backend, affinity = self.placement.choose_backend(ticket, candidates)
        grant = self.dispatch.grant(ticket, backend, affinity, queued=False)
        if self.queues.total:
            self.dispatch.serve_starving()
        return grant

    def alternative(self, model: str, avoid: Iterable[str]) -> str | None:
        """The backend to pin a retry to: healthy, serving ``model``, not in ``avoid``."""
        return self.table.alternative(model, avoid)

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a ticket. A grant its waiter never took is released and passed on."""
        if ticket.state is TicketState.WAITING:
            self.dispatch.withdraw(ticket, TicketState.CANCELLED)
            self.stats["cancelled"] += 1
            self.queues.forget_if_idle(ticket.tenant)
        elif ticket.state is TicketState.GRANTED and ticket.grant is not None:
            self.release(ticket.grant)

    def release(self, grant: Grant) -> bool:
        """Free the grant's slot. Idempotent: only the first call frees anything."""
        return self.dispatch.release(grant)

    def fail(self, ticket: Ticket, error: PoolError) -> None:
        """End a waiting ticket with an error (its waiter raises it)."""
        self.dispatch.fail(ticket, error)

    def refresh(self) -> None:
        """Apply what time alone changes: deadlines pass, holds run out, affinities expire."""
        now = self.clock()
        self.sessions.expire(now)
        self.dispatch.expire(now)

    def next_wakeup(self) -> float | None:
        """When ``refresh`` next has something to do (the earliest deadline or end of a hold), or None.

        Starvation needs no timer: it is caused by a grant, and every grant path checks for it.
        """
        return self.queues.next_due()

    def learn(
        self,
        grant: Grant,
        *,
        prompt_tokens: int | None,
        cached_tokens: int | None = None,
        prefill_seconds: float | None = None,
        evaluated_tokens: int | None = None,
    ) -> None:
        """What a backend reported of one answer (see ``learning.CacheModel.learn``)."""
        self.learning.learn(
            grant,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            prefill_seconds=prefill_seconds,
            evaluated_tokens=evaluated_tokens,
        )

    def chars_per_token(self, model: str) -> float:
        return self.learning.chars_per_token(model)

    def index_sizes(self) -> dict[str, int]:
        """How many entries each of the scheduler's indexes holds (the soak benchmark's figures)."""
        return index_sizes(self)

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self)


def _key_queue_full(tenant: Tenant) -> TenantQueueFullError:
    return TenantQueueFullError(
        f"the key {tenant.name!r} has {tenant.waiting} requests waiting, its limit "
        f"(max_queued {tenant.max_queued}); retry later"
    )


def _queue_full(model: str, waiting: int, limit: int) -> QueueFullError:
    return QueueFullError(
        f"the queue for model {model!r} is full ({waiting} waiting, limit {limit}); "
        "retry later or raise pool.queue_limit"
    )
