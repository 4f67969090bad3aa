"""The scheduling core: a pure, synchronous state machine with an injected clock and no I/O.

Every decision happens inside one synchronous call, so "check a slot is free and take it" can never
be split by an await, and the same object can be driven by a discrete-event simulator.

Vocabulary:
- a *ticket* is one request waiting for (or holding) a slot for one model;
- a *grant* is a slot handed to a ticket on one backend; releasing it frees the slot (once);
- a backend's *resident* models are what it has loaded (most recent first); sending a model that is
  not resident costs a *load* (a VRAM swap when another model has to go);
- the *drain guard*: a backend busy with model A takes no model B unless it may hold both
  (``max_loaded_models``);
- a *drain barrier* reserves one backend for a starving model: it admits no other model until the
  starving model gets a slot there, so a cold model is served in bounded time;
- a *tenant* is who sent a request (an API key): within a priority, tenants share contended slots in
  proportion to their weights (start-time fair queueing: each ticket is tagged with a virtual start
  time, ``max(now's virtual time, the tenant's previous finish)``, and a tenant's tags advance by
  ``1 / weight`` per request, so a flood of one tenant queues behind itself, not in front of the
  others, and a tenant alone gets every slot). A tenant at its ``max_concurrent`` has its tickets
  *parked*: out of the queues until one of its leases ends.

Why start-time fair queueing rather than deficit round robin: every request costs one slot, tags fit the
per-model heaps the queues already are (no round over tenants per grant), and a tenant that arrives
joins at the current virtual time, so it neither waits behind a backlog nor jumps a fair turn.

Dispatch runs after every change that can free capacity and grants everything it can in one pass.
Placement prefers no load, then the backend likely to hold the most of the prompt in its cache (a
prefix of at least ``prefix_min_tokens``), then the session's affinity backend, then the lowest
weighted load.

*Waiting for a cache*: when a slot is offered to a request on one backend while a busy one likely
holds more of its prompt, the request compares the prefill time the cache saves (the uncached
tokens on each side times that backend's learned prefill time per token, once more for each lease
running beside it) with the expected wait for a slot there (the time left of its leases, learned per
backend, and the requests already waiting for it). When waiting is cheaper it is *held* for that
backend, and meanwhile the offered slot goes to the next request; else it moves at once (see
``_placement`` for how long it may wait). A held request is first in line at its holder, behind
only a higher priority or a starving request; once its hold runs out it goes wherever there is
room, and is never held again.
A free slot prefers, per priority, a request whose model is already loaded over an older one that
would force a swap: batching by model. Batching is bounded by overtaking, not by waiting: once a slot
has gone to a request that arrived ``starvation_bound`` seconds or more after a waiting one, the
waiting one *starves* and may force a swap or a drain barrier. With spare capacity, new requests
are served as they arrive, so this is a wait of at most the bound; when the whole fleet is saturated
and everyone waits, nobody is being passed over, so no server is drained for nothing.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from local_inference_pool.core.prompt_index import (
    BLOCK_CHARS,
    DEFAULT_CHARS_PER_TOKEN,
    CacheStats,
    Ewma,
    PrefixIndex,
    Prompt,
)
from local_inference_pool.errors import (
    ModelNotFoundError,
    NoCapacityError,
    PoolError,
    QueueFullError,
    QueueTimeoutError,
    TenantQueueFullError,
)

__all__ = [
    "Affinity",
    "Backend",
    "Grant",
    "Health",
    "Scheduler",
    "Tenant",
    "Ticket",
    "TicketState",
]


class Health(StrEnum):
    HEALTHY = "healthy"
    LOADING = "loading"  # reachable but not ready (model loading): requests wait for it
    UNHEALTHY = "unhealthy"


class TicketState(StrEnum):
    WAITING = "waiting"
    GRANTED = "granted"
    RELEASED = "released"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Affinity(StrEnum):
    """Why a request with a session or a prompt went where it did (the ``x-session-affinity`` header)."""

    HIT = "hit"  # back to the backend that served its session (or conversation) before, at once
    WAITED = "waited"  # waited for the busy backend that holds its prompt, and got it
    MOVED = "moved"  # its cache holder was busy and waiting cost more: moved, remembered there
    PREFIX = "prefix"  # a new session, placed where a long prefix of its prompt is cached
    MISS = "miss"  # nothing of it cached anywhere the pool knows


@dataclass(eq=False, slots=True)
class Backend:
    name: str
    url: str
    slots: int
    models: frozenset[str] | None  # None: not discovered yet
    max_loaded_models: int
    weight: float
    health: Health
    index: int
    external_busy: int = 0  # slots busy with work that did not come through this pool
    foreign_models: frozenset[str] = frozenset()  # models other pool processes have active here
    active: dict[str, int] = field(default_factory=dict)  # model -> leases, only counts > 0
    active_total: int = 0
    resident: list[str] = field(default_factory=list)  # most recent first
    residency_known: bool = False  # reported by the backend, or learned from a grant
    trial: bool = False  # half-open after failures: admits one lease until the trial decides
    barrier: str | None = None
    loads: int = 0
    granted: int = 0
    removed: bool = False
    pinned: deque[Ticket] = field(default_factory=deque)
    held: list[tuple[tuple[int, float, int], Ticket]] = field(default_factory=list)  # waiting for its cache
    context: int | None = None  # context per slot, in tokens, when the server says
    cache_tokens: int | None = None  # what its prompt cache holds, when configured
    lease_seconds: Ewma = field(default_factory=Ewma)  # how long a lease here lasts
    prefill_seconds: Ewma = field(default_factory=Ewma)  # prefill time per uncached prompt token

    @property
    def free(self) -> int:
        capacity = 1 if self.trial else self.slots
        return max(0, capacity - self.active_total - self.external_busy)

    @property
    def load_ratio(self) -> float:
        return (self.active_total + self.external_busy) / (self.slots * self.weight)

    def can_take(self, model: str) -> bool:
        """Healthy, lists the model, not reserved for another, and the drain guard allows it."""
        if self.health is not Health.HEALTHY or self.models is None or model not in self.models:
            return False
        if self.barrier is not None and self.barrier != model:
            return False
        if model in self.active:
            return True
        if not self.foreign_models:  # one process, or nothing of others' here: the hot path
            return len(self.active) < self.max_loaded_models
        return (
            model in self.foreign_models
            or len(self.foreign_models | self.active.keys()) < self.max_loaded_models
        )

    def needs_load(self, model: str) -> bool:
        return model not in self.active and model not in self.resident

    def known_cold(self, model: str) -> bool:
        """Known not to have the model loaded (an unprobed, unused backend is not known cold)."""
        return self.residency_known and self.needs_load(model)

    def needs_swap(self, model: str) -> bool:
        """Loading the model here would evict another one (a load into free room evicts nothing)."""
        return self.needs_load(model) and len(self.resident) >= self.max_loaded_models


@dataclass(eq=False, slots=True)
class Tenant:
    """Who sends requests (an API key's name): its share of contended slots and its caps."""

    name: str
    weight: float = 1.0
    max_concurrent: int | None = None  # leases at once, counting other processes' (``external``)
    max_queued: int | None = None  # waiting requests
    active: int = 0
    external: int = 0  # leases other processes of the fleet hold for it
    waiting: int = 0
    granted: int = 0
    finish: float = 0.0  # the virtual finish tag of its latest request
    parked: list[tuple[tuple[int, float, int], Ticket]] = field(default_factory=list)

    @property
    def capped(self) -> bool:
        return self.max_concurrent is not None and self.active + self.external >= self.max_concurrent


@dataclass(eq=False, slots=True)
class Ticket:
    id: int
    model: str
    priority: int
    arrival: float
    deadline: float | None
    affinity_key: str | None
    pin: str | None
    tenant: Tenant
    tag: float = 0.0  # virtual start time: the fair order between tenants within a priority
    prompt: Prompt | None = None
    held_for: Backend | None = None  # waiting for this backend's cache
    hold_started: float | None = None  # set once: a ticket is held for a cache at most once
    hold_until: float | None = None
    moved_from: str | None = None  # the busy backend holding its cache, that it did not wait for
    state: TicketState = TicketState.WAITING
    grant: Grant | None = None
    error: PoolError | None = None

    @property
    def order(self) -> tuple[int, float, int]:
        return (-self.priority, self.tag, self.id)


@dataclass(eq=False, slots=True)
class Grant:
    id: int
    ticket: Ticket
    backend: Backend
    model: str
    granted_at: float
    loaded_model: bool  # this grant made the backend load the model
    affinity: Affinity | None
    released: bool = False


_UNSET: Final[Any] = object()


class Scheduler:
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
        on_ticket_done: Callable[[Ticket], None] | None = None,
        on_ticket_held: Callable[[Ticket], None] | None = None,
    ) -> None:
        self.clock = clock
        self.queue_limit = queue_limit
        self.starvation_bound = starvation_bound
        self.affinity_enabled = affinity
        self.affinity_ttl = affinity_ttl
        self.affinity_max_sessions = affinity_max_sessions
        self.on_ticket_done = on_ticket_done
        self.on_ticket_held = on_ticket_held  # its waiter wakes on the hold's end (``hold_until``)
        self.cache_wait_max = cache_wait_max
        self.prefill_seconds_per_token = prefill_seconds_per_token  # before a backend reports its own
        self.prefix_min_tokens = prefix_min_tokens
        self.prefix_index_blocks = prefix_index_blocks  # per backend and model, whatever it holds
        self.backends: dict[str, Backend] = {}
        self.grants: dict[int, Grant] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("granted", "released", "loads", "cancelled", "timed_out", "failed", "rejected",
             "affinity_hit", "affinity_miss", "affinity_waited", "affinity_moved", "affinity_prefix",
             "barriers"),
            0,
        )  # fmt: skip
        self._ids = itertools.count(1)
        self._backend_order = itertools.count()
        self._queues: dict[str, list[tuple[tuple[int, float, int], Ticket]]] = {}
        self._arrivals: dict[str, deque[Ticket]] = {}  # arrival order, for the oldest wait
        self._waiting: dict[str, int] = {}  # model -> waiting tickets (pinned included)
        self._waiting_total = 0
        self._deadlines: list[tuple[float, int, Ticket]] = []
        self._serving: dict[str, set[Backend]] = {}
        self._resident_on: dict[str, set[Backend]] = {}
        self._free: set[Backend] = set()
        self._undiscovered = 0
        self._barriers: dict[str, Backend] = {}
        self._affinity: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._newest_granted = float("-inf")  # arrival time of the most recently arrived grant
        self.tenants: dict[str, Tenant] = {}
        self._virtual = 0.0  # fair queueing's virtual time: the largest start tag granted
        self._prefixes: dict[tuple[str, str], PrefixIndex] = {}  # (backend, model) -> what it was sent
        self._chars_per_token: dict[str, Ewma] = {}  # per model, learned from reported prompt tokens
        self._holds: list[tuple[float, int, Ticket]] = []  # (hold_until, id): holds that run out
        self._held: dict[str, int] = {}  # model -> waiting tickets held for a cache
        self.cache_stats: dict[tuple[str, str], CacheStats] = {}  # (backend, model)

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
        if name in self.backends:
            raise ValueError(f"backend {name!r} already exists")
        backend = Backend(
            name=name,
            url=url,
            slots=slots,
            models=None,
            max_loaded_models=max_loaded_models,
            weight=weight,
            health=health,
            index=next(self._backend_order),
            cache_tokens=cache_tokens,
        )
        self.backends[name] = backend
        self._undiscovered += 1  # models=None so far; _set_models counts it discovered if given
        self._set_models(backend, None if models is None else frozenset(models))
        self._set_resident(backend, resident)
        backend.residency_known = bool(resident)
        self._touch(backend)
        self._after_change([backend])
        return backend

    def remove_backend(self, name: str) -> None:
        """Forget a backend. Its grants stay valid and releasing them is harmless."""
        backend = self.backends.pop(name)
        self._set_models(backend, frozenset())
        self._set_resident(backend, ())
        backend.removed = True
        self._free.discard(backend)
        self._clear_barrier(backend)
        self._forget_cache(backend)
        while backend.pinned:
            ticket = backend.pinned.popleft()
            if ticket.state is TicketState.WAITING:
                self.fail(ticket, NoCapacityError(f"backend {name!r} was removed", model=ticket.model))
        self._after_change([])

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
    ) -> None:
        """Apply what a probe (or the operator) says; dispatch what the change makes possible."""
        backend = self.backends[name]
        if slots is not _UNSET:
            backend.slots = max(1, slots)
        if weight is not _UNSET:
            backend.weight = weight
        if max_loaded_models is not _UNSET:
            backend.max_loaded_models = max(1, max_loaded_models)
            self._set_resident(backend, backend.resident)
        if external_busy is not _UNSET:
            backend.external_busy = max(0, external_busy)
        if foreign_models is not _UNSET:
            backend.foreign_models = frozenset(foreign_models)
        if trial is not _UNSET:
            backend.trial = trial
        if context is not _UNSET:
            backend.context = context
        if models is not _UNSET:
            self._set_models(backend, None if models is None else frozenset(models))
        if resident is not _UNSET:
            self._set_resident(backend, resident)
            backend.residency_known = True
        if health is not _UNSET and health is not backend.health:
            backend.health = health
            if health is not Health.HEALTHY:
                self._clear_barrier(backend)
            if health is Health.UNHEALTHY:  # down: whatever it comes back with, its cache is gone
                self._forget_cache(backend)
        if backend.held and (backend.health is not Health.HEALTHY or models is not _UNSET):
            self._release_holds(backend)
        self._touch(backend)
        self._after_change([backend])

    # --- tickets ---------------------------------------------------------------------------

    def submit(
        self,
        model: str,
        *,
        priority: int = 0,
        affinity_key: str | None = None,
        timeout: float | None = None,
        pin: str | None = None,
        tenant: str = "",
        arrival: float | None = None,
        tag: float | None = None,
        prompt: Prompt | None = None,
    ) -> Ticket:
        """Queue a request; it may come back already granted. Raises when it can never be served now.

        ``prompt``: what of the request the backends' prompt caches may hold (see ``prompt_cache``).

        ``queue_limit`` bounds each model's queue (a backlog for one model refuses no other), and a
        tenant's ``max_queued`` its own waiting requests. ``arrival`` and ``tag``: where a request
        queued again stood (its place is kept).
        """
        now = self.clock()
        self.check_servable(model, pin)
        owner = self.tenants.get(tenant) or self.set_tenant(tenant)
        if owner.max_queued is not None and owner.waiting >= owner.max_queued and not self._free:
            raise self._key_queue_full(owner)
        if self._waiting.get(model, 0) >= self.queue_limit and not self._free:
            raise self._queue_full(model)
        if tag is None:
            tag = max(self._virtual, owner.finish)
            owner.finish = tag + 1.0 / owner.weight
        ticket = Ticket(
            id=next(self._ids),
            model=model,
            priority=priority,
            arrival=now if arrival is None else min(arrival, now),
            deadline=None if timeout is None else now + timeout,
            affinity_key=affinity_key if self.affinity_enabled else None,
            pin=pin,
            tenant=owner,
            tag=tag,
            prompt=prompt,
        )
        self._enqueue(ticket)
        if pin is not None:
            self._fill(self.backends[pin])
        elif self._free:
            self._place(model)
        if ticket.state is TicketState.GRANTED and self._waiting_total:
            self._serve_starving()  # granting a newcomer may pass over an older request
        if ticket.state is TicketState.WAITING and self._waiting.get(model, 0) > self.queue_limit:
            self._remove_waiting(ticket)
            ticket.state = TicketState.FAILED
            raise self._queue_full(model)
        if (
            ticket.state is TicketState.WAITING
            and owner.max_queued is not None
            and owner.waiting > owner.max_queued
        ):
            self._remove_waiting(ticket)
            ticket.state = TicketState.FAILED
            raise self._key_queue_full(owner)
        return ticket

    def _key_queue_full(self, tenant: Tenant) -> TenantQueueFullError:
        self.stats["rejected"] += 1
        return TenantQueueFullError(
            f"the key {tenant.name!r} has {tenant.waiting} requests waiting, its limit "
            f"(max_queued {tenant.max_queued}); retry later"
        )

    def _queue_full(self, model: str) -> QueueFullError:
        self.stats["rejected"] += 1
        return QueueFullError(
            f"the queue for model {model!r} is full ({self._waiting.get(model, 0)} waiting, limit "
            f"{self.queue_limit}); retry later or raise pool.queue_limit"
        )

    def set_tenant(
        self,
        name: str,
        *,
        weight: float = 1.0,
        max_concurrent: int | None = None,
        max_queued: int | None = None,
    ) -> Tenant:
        """Declare (or change) a tenant's weight and caps; an undeclared one has weight 1, no caps."""
        tenant = self.tenants.get(name)
        if tenant is None:
            tenant = self.tenants[name] = Tenant(name)
        tenant.weight = max(1e-6, weight)
        tenant.max_concurrent = max_concurrent
        tenant.max_queued = max_queued
        self._unpark(tenant)
        return tenant

    def update_tenant(self, name: str, *, external: int) -> None:
        """What other processes of the fleet hold for a tenant (its cap counts them)."""
        tenant = self.tenants.get(name) or self.set_tenant(name)
        tenant.external = max(0, external)
        self._unpark(tenant)

    def _unpark(self, tenant: Tenant) -> None:
        """Put a tenant's parked tickets back in their queues once it has room under its cap. All of
        them: a ticket is parked only when it reaches the head of its queue, so few are, and those
        that still cannot go are parked again when they next come up."""
        if not tenant.parked or tenant.capped:
            return
        parked, tenant.parked = tenant.parked, []
        models: set[str] = set()
        for order, ticket in parked:
            if ticket.state is TicketState.WAITING:
                heapq.heappush(self._queues.setdefault(ticket.model, []), (order, ticket))
                models.add(ticket.model)
        for model in sorted(models):
            if self._free:
                self._place(model)

    def try_acquire(self, model: str, *, affinity_key: str | None = None, tenant: str = "") -> Grant | None:
        """Take a slot now if any eligible backend has one, else None; never queues.

        Unlike a queued ticket it does not defer to a backend where the model is already loaded:
        a caller that polls would otherwise never reach the starvation bound.
        """
        owner = self.tenants.get(tenant) or self.set_tenant(tenant)
        if self._waiting.get(model, 0) > 0 or owner.capped:
            return None
        candidates = [b for b in self._free_serving(model) if b.can_take(model)]
        if not candidates:
            return None
        ticket = Ticket(
            id=next(self._ids),
            model=model,
            priority=0,
            arrival=self.clock(),
            deadline=None,
            affinity_key=affinity_key if self.affinity_enabled else None,
            pin=None,
            tenant=owner,
            tag=max(self._virtual, owner.finish),
        )
        backend, affinity = self._choose_backend(ticket, candidates)
        grant = self._grant(ticket, backend, affinity, queued=False)
        if self._waiting_total:
            self._serve_starving()
        return grant

    def alternative(self, model: str, avoid: Iterable[str]) -> str | None:
        """The backend to pin a retry to: healthy, serving ``model``, not in ``avoid``; one that can
        take the model now (drain guard) first, then one that has it loaded, then the least loaded."""
        excluded = set(avoid)
        others = [
            b for b in self._serving.get(model, ()) if b.name not in excluded and b.health is Health.HEALTHY
        ]
        if not others:
            return None
        return min(
            others, key=lambda b: (not b.can_take(model), b.needs_load(model), b.load_ratio, b.index)
        ).name

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a ticket. A grant its waiter never took is released and passed on."""
        if ticket.state is TicketState.WAITING:
            self._remove_waiting(ticket)
            ticket.state = TicketState.CANCELLED
            self.stats["cancelled"] += 1
        elif ticket.state is TicketState.GRANTED and ticket.grant is not None:
            self.release(ticket.grant)

    def release(self, grant: Grant) -> bool:
        """Free the grant's slot. Idempotent: only the first call frees anything."""
        if grant.released:
            return False
        grant.released = True
        grant.ticket.state = TicketState.RELEASED
        del self.grants[grant.id]
        self.stats["released"] += 1
        backend = grant.backend
        backend.lease_seconds.add(max(0.0, self.clock() - grant.granted_at))
        remaining = backend.active[grant.model] - 1
        if remaining:
            backend.active[grant.model] = remaining
        else:
            del backend.active[grant.model]
        backend.active_total -= 1
        tenant = grant.ticket.tenant
        was_capped = tenant.capped
        tenant.active -= 1
        if not backend.removed:
            self._touch(backend)
        if was_capped:  # its parked and pinned requests may go now, wherever there is room
            self._unpark(tenant)
            self._dispatch_all()
        if not backend.removed:
            self._fill(backend)
        if self._waiting:
            self._serve_starving()
        return True

    def refresh(self) -> None:
        """Apply what time alone changes: deadlines pass, waiters starve, affinities expire."""
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, ticket = heapq.heappop(self._deadlines)
            if ticket.state is TicketState.WAITING:
                waited = now - ticket.arrival
                self.stats["timed_out"] += 1
                self.fail(
                    ticket,
                    QueueTimeoutError(
                        f"no slot for model {ticket.model!r} within {waited:.1f}s; "
                        f"{self._waiting.get(ticket.model, 0)} more waiting for it",
                        model=ticket.model,
                        waited=waited,
                    ),
                )
        while self._affinity:
            key, (_, expires) = next(iter(self._affinity.items()))
            if expires > now:
                break
            del self._affinity[key]
        models: set[str] = set()
        while self._holds and self._holds[0][0] <= now:
            _, _, ticket = heapq.heappop(self._holds)
            if ticket.held_for is not None and ticket.state is TicketState.WAITING:
                self._unhold(ticket)
                models.add(ticket.model)
        for model in sorted(models):
            if self._free:
                self._place(model)
        self._serve_starving()

    def next_wakeup(self) -> float | None:
        """When ``refresh`` next has something to do (the earliest deadline or end of a hold), or None.

        Starvation needs no timer: it is caused by a grant, and every grant path checks for it.
        """
        while self._deadlines and self._deadlines[0][2].state is not TicketState.WAITING:
            heapq.heappop(self._deadlines)
        while self._holds and (
            self._holds[0][2].held_for is None or self._holds[0][2].state is not TicketState.WAITING
        ):
            heapq.heappop(self._holds)
        times = [entries[0][0] for entries in (self._deadlines, self._holds) if entries]
        return min(times) if times else None

    @property
    def waiting(self) -> int:
        return self._waiting_total

    def waiting_tickets(self) -> Iterator[Ticket]:
        for arrivals in self._arrivals.values():
            yield from (t for t in arrivals if t.state is TicketState.WAITING)

    def head(self, model: str) -> Ticket | None:
        """The model's next waiting ticket in queue order (priority, then arrival); pinned ones aside."""
        return self._head(model)

    def waiting_models(self) -> list[str]:
        """The models with waiting tickets (pinned included)."""
        return list(self._waiting)

    def waiting_for(self, model: str) -> int:
        return self._waiting.get(model, 0)

    def passed_over(self, arrival: float) -> None:
        """A request that arrived at ``arrival`` was granted elsewhere (another process of the
        fleet): waiters here that arrived ``starvation_bound`` before it starve, as if it were here."""
        if arrival > self._newest_granted:
            self._newest_granted = arrival
            if self._waiting:
                self._serve_starving()

    def remember_affinity(self, key: str, backend: str) -> None:
        """Where a session was last served (another process of the fleet says): its next grant
        prefers that backend."""
        if self.affinity_enabled and backend in self.backends:
            self._remember_affinity(key, self.backends[backend])

    def oldest_waiting(self, model: str) -> Ticket | None:
        arrivals = self._arrivals.get(model)
        while arrivals:
            if arrivals[0].state is TicketState.WAITING:
                return arrivals[0]
            arrivals.popleft()
        return None

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        oldest: dict[str, float] = {}
        for model in self._waiting:
            ticket = self.oldest_waiting(model)
            if ticket is not None:
                oldest[model] = now - ticket.arrival
        return {
            "backends": [
                {
                    "name": b.name,
                    "url": b.url,
                    "health": b.health.value,
                    "slots": b.slots,
                    "busy": b.active_total + b.external_busy,
                    "active": b.active_total,
                    "external_busy": b.external_busy,
                    "active_by_model": dict(sorted(b.active.items())),
                    "resident_models": list(b.resident),
                    "models": None if b.models is None else sorted(b.models),
                    "max_loaded_models": b.max_loaded_models,
                    "weight": b.weight,
                    "draining_for": b.barrier,
                    "trial": b.trial,
                    "model_loads": b.loads,
                    "granted": b.granted,
                    "held_for_cache": sum(
                        t.held_for is b and t.state is TicketState.WAITING for _, t in b.held
                    ),
                    "prefill_ms_per_token": _rounded(b.prefill_seconds.value, 1000),
                    "mean_lease_s": _rounded(b.lease_seconds.value, 1),
                }
                for b in self.backends.values()
            ],
            "prompt_cache": [
                {
                    "backend": backend,
                    "model": model,
                    "prompt_tokens": c.prompt_tokens,
                    "cached_tokens": c.cached_tokens,
                    "cached_share": round(c.cached_tokens / c.prompt_tokens, 3) if c.prompt_tokens else None,
                    "prefill_saved_s": round(c.saved_seconds, 3),
                    "waits": c.waits,
                    "wait_s": round(c.wait_seconds, 3),
                    "moved": c.moved,
                }
                for (backend, model), c in sorted(self.cache_stats.items())
            ],
            "queue": {
                "waiting": self._waiting_total,
                "limit": self.queue_limit,
                "by_model": {
                    model: {"waiting": count, "oldest_wait_s": round(oldest.get(model, 0.0), 3)}
                    for model, count in sorted(self._waiting.items())
                },
                "oldest_wait_s": round(max(oldest.values(), default=0.0), 3),
            },
            "active_leases": len(self.grants),
            "tenants": {
                name or "-": {
                    "weight": t.weight,
                    "active": t.active,
                    "fleet_active": t.external,
                    "waiting": t.waiting,
                    "granted": t.granted,
                    "max_concurrent": t.max_concurrent,
                    "max_queued": t.max_queued,
                }
                for name, t in sorted(self.tenants.items())
            },
            "stats": dict(self.stats),
        }

    # --- dispatch --------------------------------------------------------------------------

    def _after_change(self, changed: Iterable[Backend]) -> None:
        self._fail_unservable()
        for backend in sorted(changed, key=lambda b: b.index):
            self._fill(backend)
        self._dispatch_all()
        self._serve_starving()

    def _dispatch_all(self) -> None:
        for backend in sorted(self._free, key=lambda b: b.index):
            self._fill(backend)

    def _place(self, model: str) -> None:
        """Give waiting tickets of one model the best free backends, head first."""
        while (head := self._head(model)) is not None:
            may_swap = self._starving(head) or self._swap_worthwhile(model)
            candidates = [
                b
                for b in self._free_serving(model)
                if b.can_take(model) and (may_swap or not b.needs_swap(model))
            ]
            if not candidates:
                return
            backend, _ = self._choose_backend(head, candidates)
            target = self._placement(head, backend)
            if target is not None:
                self._remove_waiting(head)
                self._grant(head, target, self._affinity_outcome(head, target), queued=True)

    def _fill(self, backend: Backend) -> None:
        """Give a backend's free slots to the best waiting tickets."""
        while backend.free and backend.health is Health.HEALTHY and not backend.removed:
            ticket = self._choose_ticket(backend)
            if ticket is None:
                return
            target = self._placement(ticket, backend)
            if target is not None:
                self._remove_waiting(ticket)
                self._grant(ticket, target, self._affinity_outcome(ticket, target), queued=True)

    def _placement(self, ticket: Ticket, offered: Backend) -> Backend | None:
        """Where a ticket offered a slot on ``offered`` goes: there; to a backend that likely
        caches more of its prompt and has a slot free too; or nowhere yet (None: it is held for a
        busy one, because the prefill that backend saves outweighs the wait expected for it).

        A prefill costs its time to the request and as much again to each request running beside
        it, whose tokens wait while the server evaluates the prompt (llama.cpp and vLLM batch the
        two): so the saving weighs each side's prefill by the leases it would run beside.

        How long to wait: when nothing else waits for the offered slot, the wait is lost time, so at
        most the saving. When other requests wait that it can serve, the slot is not lost: it goes to
        one of them, who starts that much sooner, and the wait only reorders them; the fleet gains
        the whole saving. Then the request may wait what the holder is expected to take plus the
        saving. Both at most ``cache_wait_max``."""
        prompt = ticket.prompt
        if prompt is None or ticket.pin is not None or ticket.held_for is offered or not prompt.cacheable:
            return offered
        model = ticket.model
        tokens = prompt.chars / self.chars_per_token(model)
        offered_cost = self._prefill(offered, tokens - self._cached_tokens(ticket, offered)) * (
            1 + offered.active_total
        )
        holder: Backend | None = None
        saving = 0.0
        session_backend = self._affinity_backend(ticket.affinity_key)
        for backend in self._serving.get(model, ()):
            if backend is offered or backend.health is not Health.HEALTHY or not backend.can_take(model):
                continue
            cached = self._cached_tokens(ticket, backend)
            if cached < self.prefix_min_tokens and backend.name != session_backend:
                continue  # a short shared prefix steers nothing; a conversation's own history does
            beside = backend.active_total if backend.free else backend.slots - 1
            gain = offered_cost - self._prefill(backend, tokens - cached) * (1 + beside)
            if gain > saving or (gain == saving and holder is not None and backend.free > holder.free):
                holder, saving = backend, gain
        if holder is None:
            return offered
        if holder.free:
            return holder
        expected = self._expected_wait(holder, ticket)
        budget = min(self.cache_wait_max, expected + saving if self._backlog(offered, ticket) else saving)
        if ticket.hold_started is not None or self._starving(ticket) or expected >= budget:
            ticket.moved_from = holder.name
            return offered
        self._hold(ticket, holder, budget)
        return None

    def _backlog(self, offered: Backend, ticket: Ticket) -> bool:
        """Whether another waiting request (not one held for a cache) could take the offered slot."""
        models = offered.models or frozenset()
        held = self._held
        return any(
            model in models
            and offered.can_take(model)
            and count - held.get(model, 0) > (1 if model == ticket.model else 0)
            for model, count in self._waiting.items()
        )

    def _cached_tokens(self, ticket: Ticket, backend: Backend) -> float:
        """How many of the ticket's prompt tokens the backend likely holds: the leading blocks its
        index has, or, when it has none of them, the conversation's history where its session
        was last served (another process of the fleet may have sent that). Not the larger of the
        two: where the index knows the prompt, it knows what was evicted since (bench/cache_sim.py
        measured the larger one costing 0.08 of the cached share)."""
        prompt = ticket.prompt
        if prompt is None or not prompt.cacheable:
            return 0.0
        index = self._prefixes.get((backend.name, ticket.model))
        chars = index.match(prompt.blocks) * BLOCK_CHARS if index is not None else 0
        if not chars and self._affinity_backend(ticket.affinity_key) == backend.name:
            chars = prompt.history_chars
        return min(chars, prompt.chars) / self.chars_per_token(ticket.model)

    def chars_per_token(self, model: str) -> float:
        """Characters of a rendered prompt per token the backends count, as learned for the model."""
        learned = self._chars_per_token.get(model)
        return DEFAULT_CHARS_PER_TOKEN if learned is None else learned.get(DEFAULT_CHARS_PER_TOKEN)

    def _prefill(self, backend: Backend, tokens: float) -> float:
        return max(0.0, tokens) * backend.prefill_seconds.get(self.prefill_seconds_per_token)

    def _expected_wait(self, holder: Backend, ticket: Ticket) -> float:
        """Until a slot on a full backend comes to this ticket: the requests ahead of it there go
        first, each taking the next lease to end. A lease is expected to last the backend's mean
        (0 before one has ended), an overdue one a quarter of it more; past the leases running now,
        each further turn is a mean lease over the backend's slots."""
        ahead = sum(t.state is TicketState.WAITING for t in holder.pinned)
        ahead += sum(
            1
            for order, held in holder.held
            if held.held_for is holder and held.state is TicketState.WAITING and order < ticket.order
        )
        mean = holder.lease_seconds.get(0.0)
        now = self.clock()
        ending = sorted(
            mean - elapsed if (elapsed := now - g.granted_at) < mean else mean / 4
            for g in self.grants.values()
            if g.backend is holder
        )
        if ahead < len(ending):
            return ending[ahead]
        last = ending[-1] if ending else 0.0
        return last + (ahead - len(ending) + 1) * mean / max(1, holder.slots)

    def _hold(self, ticket: Ticket, holder: Backend, budget: float) -> None:
        now = self.clock()
        queue = self._queues.get(ticket.model)
        if queue and queue[0][1] is ticket:
            heapq.heappop(queue)  # else it is dropped from its queue when it comes up
        ticket.held_for = holder
        self._held[ticket.model] = self._held.get(ticket.model, 0) + 1
        ticket.hold_started = now
        ticket.hold_until = now + budget
        heapq.heappush(holder.held, (ticket.order, ticket))
        heapq.heappush(self._holds, (ticket.hold_until, ticket.id, ticket))
        if self.on_ticket_held is not None:
            self.on_ticket_held(ticket)

    def _unhold(self, ticket: Ticket) -> None:
        """A held ticket's hold ran out (or its holder went): back in its queue, in its place."""
        holder = ticket.held_for
        if holder is None or ticket.state is not TicketState.WAITING:
            return
        ticket.held_for = None
        self._unheld(ticket.model)
        ticket.moved_from = holder.name
        heapq.heappush(self._queues.setdefault(ticket.model, []), (ticket.order, ticket))

    def _unheld(self, model: str) -> None:
        remaining = self._held[model] - 1
        if remaining:
            self._held[model] = remaining
        else:
            del self._held[model]

    def _held_head(self, backend: Backend) -> Ticket | None:
        held = backend.held
        while held:
            ticket = held[0][1]
            if ticket.held_for is backend and ticket.state is TicketState.WAITING:
                return ticket
            heapq.heappop(held)
        return None

    def _forget_cache(self, backend: Backend) -> None:
        """A backend that went down, or away, has no prompt cache the pool knows of: its held
        tickets go back to their queues."""
        for key in [key for key in self._prefixes if key[0] == backend.name]:
            del self._prefixes[key]
        self._release_holds(backend)

    def _release_holds(self, backend: Backend) -> None:
        """Tickets held for a backend that cannot serve them now go back to their queues."""
        serves = backend.health is Health.HEALTHY and not backend.removed and backend.models is not None
        models = set()
        for _, ticket in backend.held:
            if ticket.held_for is not backend or ticket.state is not TicketState.WAITING:
                continue
            if not serves or ticket.model not in (backend.models or ()):
                self._unhold(ticket)
                models.add(ticket.model)
        backend.held = [(order, t) for order, t in backend.held if t.held_for is backend]
        heapq.heapify(backend.held)
        for model in sorted(models):
            if self._free:
                self._place(model)

    def _choose_ticket(self, backend: Backend) -> Ticket | None:
        while backend.pinned and backend.pinned[0].state is not TicketState.WAITING:
            backend.pinned.popleft()
        if (
            backend.pinned
            and backend.can_take(backend.pinned[0].model)
            and not backend.pinned[0].tenant.capped
        ):
            return backend.pinned[0]
        if backend.models is None:
            return None
        held = self._held_head(backend)
        if held is not None and (not backend.can_take(held.model) or held.tenant.capped):
            held = None
        waiting = self._waiting
        models: Iterable[str] = (
            (m for m in waiting if m in backend.models)
            if len(waiting) <= len(backend.models)
            else (m for m in backend.models if m in waiting)
        )
        best: Ticket | None = None
        best_key: tuple[bool, int, bool, float, int] | None = None
        for model in models:
            if not backend.can_take(model):
                continue
            head = self._head(model)
            if head is None:
                continue
            starving = self._starving(head)
            if backend.needs_swap(model) and not starving and not self._swap_worthwhile(model):
                continue
            key = (not starving, -head.priority, backend.needs_load(model), head.tag, head.id)
            if best_key is None or key < best_key:
                best, best_key = head, key
        if held is not None and (
            best is None or (best_key is not None and best_key[0] and held.priority >= best.priority)
        ):
            return held  # it waits for this backend's cache: first in line here but for those
        return best

    def _choose_backend(self, ticket: Ticket, candidates: list[Backend]) -> tuple[Backend, Affinity | None]:
        pinned_to = self._affinity_backend(ticket.affinity_key)
        if len(candidates) == 1:
            best = candidates[0]
        elif ticket.prompt is None or not ticket.prompt.cacheable:
            best = min(
                candidates,
                key=lambda b: (b.known_cold(ticket.model), b.name != pinned_to, b.load_ratio, b.index),
            )
        else:  # a short cached prefix counts for nothing: load spreads
            least = self.prefix_min_tokens

            def cached(b: Backend) -> float:
                tokens = self._cached_tokens(ticket, b)
                return tokens if tokens >= least else 0.0

            best = min(
                candidates,
                key=lambda b: (
                    b.known_cold(ticket.model),
                    -cached(b),
                    b.name != pinned_to,
                    b.load_ratio,
                    b.index,
                ),
            )
        return best, self._affinity_outcome(ticket, best)

    def _starving(self, ticket: Ticket) -> bool:
        """Passed over: a slot went to a request that arrived at least the bound after this one."""
        return self._newest_granted - ticket.arrival >= self.starvation_bound

    def _swap_worthwhile(self, model: str) -> bool:
        """Evict a model for this one only if its backlog outgrows where it is already loaded."""
        loaded_slots = sum(b.slots for b in self._resident_on.get(model, ()) if b.health is Health.HEALTHY)
        return self._waiting.get(model, 0) >= loaded_slots

    def _serve_starving(self) -> None:
        """Starving heads may force a swap; if nothing is free for one, drain a backend for it."""
        for model in [m for m in self._waiting if m not in self._barriers]:
            head = self._head(model)
            if head is None or not self._starving(head):
                continue
            self._place(model)
            serving = self._serving.get(model, ())
            if self._head(model) is None or any(model in b.active for b in serving):
                continue  # already being served somewhere: it waits for load, not for a swap
            candidates = [
                b
                for b in serving
                if b.health is Health.HEALTHY and b.barrier is None and b.slots > b.external_busy
            ]
            if not candidates:
                continue
            target = min(candidates, key=lambda b: self._drain_cost(b, model))
            target.barrier = model
            self._barriers[model] = target
            self.stats["barriers"] += 1
            self._fill(target)

    def _drain_cost(self, backend: Backend, model: str) -> tuple[float, float, int]:
        """How much draining this backend for ``model`` holds up: first the work waiting for the
        models it runs now (they lose this backend), then the leases it must finish first."""
        stranded = sum(self._waiting.get(m, 0) for m in backend.active if m != model)
        finishing = sum(n for m, n in backend.active.items() if m != model)
        return (stranded / backend.slots, finishing / backend.slots, backend.index)

    def _grant(self, ticket: Ticket, backend: Backend, affinity: Affinity | None, *, queued: bool) -> Grant:
        model = ticket.model
        load = backend.needs_load(model)
        if load:
            backend.loads += 1
            self.stats["loads"] += 1
        if not backend.resident or backend.resident[0] != model:
            self._set_resident(backend, [model, *(m for m in backend.resident if m != model)])
        backend.residency_known = True
        backend.active[model] = backend.active.get(model, 0) + 1
        backend.active_total += 1
        backend.granted += 1
        ticket.tenant.active += 1
        ticket.tenant.granted += 1
        if ticket.tag > self._virtual:
            self._virtual = ticket.tag
        self._newest_granted = max(self._newest_granted, ticket.arrival)
        if backend.barrier == model:
            self._clear_barrier(backend)
        if ticket.prompt is not None and (ticket.prompt.blocks or ticket.hold_started or ticket.moved_from):
            self._cached_on(ticket, backend, affinity)
        grant = Grant(
            id=next(self._ids),
            ticket=ticket,
            backend=backend,
            model=model,
            granted_at=self.clock(),
            loaded_model=load,
            affinity=affinity,
        )
        self.grants[grant.id] = grant
        ticket.state = TicketState.GRANTED
        ticket.grant = grant
        self.stats["granted"] += 1
        if affinity is not None:
            self.stats[f"affinity_{affinity.value}"] += 1
            self._remember_affinity(ticket.affinity_key, backend)
        self._touch(backend)
        if queued and self.on_ticket_done is not None:
            self.on_ticket_done(ticket)
        return grant

    def _cached_on(self, ticket: Ticket, backend: Backend, affinity: Affinity | None) -> None:
        """The backend is sent the ticket's prompt: its index holds it now; count a wait or a move."""
        assert ticket.prompt is not None
        key = (backend.name, ticket.model)
        index = self._prefixes.get(key)
        capacity = self._index_capacity(backend, ticket.model)
        if index is None:
            index = self._prefixes[key] = PrefixIndex(capacity)
        elif index.capacity != capacity:
            index.resize(capacity)
        index.record(ticket.prompt.blocks)
        if affinity is Affinity.WAITED and ticket.hold_started is not None:
            stats = self._cache_stats(backend.name, ticket.model)
            stats.waits += 1
            stats.wait_seconds += self.clock() - ticket.hold_started
        elif affinity is Affinity.MOVED and ticket.moved_from in self.backends:
            self._cache_stats(ticket.moved_from, ticket.model).moved += 1
        ticket.held_for = None

    def _index_capacity(self, backend: Backend, model: str) -> int:
        """In blocks: what the backend can hold (``cache_tokens``, else its slots times its context,
        8192 tokens when unknown), at most ``prefix_index_blocks``."""
        tokens = backend.cache_tokens or backend.slots * (backend.context or 8192)
        return max(1, min(self.prefix_index_blocks, int(tokens * self.chars_per_token(model) / BLOCK_CHARS)))

    def _cache_stats(self, backend: str, model: str) -> CacheStats:
        stats = self.cache_stats.get((backend, model))
        if stats is None:
            stats = self.cache_stats[(backend, model)] = CacheStats()
        return stats

    def learn(
        self,
        grant: Grant,
        *,
        prompt_tokens: int | None,
        cached_tokens: int | None = None,
        prefill_seconds: float | None = None,
        evaluated_tokens: int | None = None,
    ) -> None:
        """What a backend reported of one answer: its prompt's tokens, how many it served from its
        cache, and (llama.cpp's ``timings``) how long it took to evaluate the rest."""
        backend, model = grant.backend, grant.model
        if prompt_tokens is None or prompt_tokens <= 0 or backend.removed:
            return
        cached = max(0, min(cached_tokens or 0, prompt_tokens))
        if prefill_seconds is not None and evaluated_tokens is not None and evaluated_tokens >= 16:
            per_token = prefill_seconds / evaluated_tokens  # a 1-token hit says nothing of prefill
            if 0.0 <= per_token <= 1.0:  # a broken or hostile report (NaN, infinite, absurd): ignored
                backend.prefill_seconds.add(per_token)
        prompt = grant.ticket.prompt
        if prompt is not None and prompt_tokens >= 16:
            ratio = min(16.0, max(0.5, prompt.chars / prompt_tokens))  # a broken count moves it little
            self._chars_per_token.setdefault(model, Ewma()).add(ratio)
        stats = self._cache_stats(backend.name, model)
        stats.reports += 1
        stats.prompt_tokens += prompt_tokens
        stats.cached_tokens += cached
        stats.saved_seconds += self._prefill(backend, cached)

    # --- bookkeeping -----------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every model some backend lists (healthy or not), sorted."""
        return sorted(self._serving)

    def check_servable(self, model: str, pin: str | None = None) -> None:
        """Raise as ``submit`` would when the model cannot be served now (unknown, or no healthy
        backend; waiting for discovery counts as servable)."""
        if pin is not None:
            backend = self.backends.get(pin)
            if backend is None:
                raise NoCapacityError(f"no backend named {pin!r}", model=model)
            if backend.models is not None and model not in backend.models:
                raise ModelNotFoundError(f"backend {pin!r} does not serve model {model!r}", model=model)
            if backend.health is Health.UNHEALTHY:
                raise NoCapacityError(f"backend {pin!r} is unhealthy; retry later", model=model)
            return
        serving = self._serving.get(model)
        if not serving:
            if self._discovery_pending():
                return  # a reachable backend's model list is not known yet: wait for discovery
            if not self.backends:
                raise NoCapacityError("the pool has no backends configured", model=model)
            known = sorted(self._serving)
            listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise ModelNotFoundError(
                f"model {model!r} is not served by any backend; available: {listed or 'none'}",
                model=model,
            )
        if all(b.health is Health.UNHEALTHY for b in serving):
            names = ", ".join(sorted(b.name for b in serving))
            raise NoCapacityError(
                f"no healthy backend for model {model!r} (unhealthy: {names}); retry later",
                model=model,
            )

    def _fail_unservable(self) -> None:
        """Once every model list is known, tickets for a model nobody serves fail at once."""
        if self._discovery_pending():
            return
        for model in [m for m in self._waiting if not self._serving.get(m)]:
            error_text = f"model {model!r} is no longer served by any backend"
            parked = [t for tenant in self.tenants.values() for _, t in tenant.parked if t.model == model]
            held = [t for b in self.backends.values() for _, t in b.held if t.model == model]
            for ticket in [*(t for _, t in self._queues.get(model, ())), *parked, *held]:
                if ticket.state is TicketState.WAITING:
                    self.fail(ticket, ModelNotFoundError(error_text, model=model))

    def _discovery_pending(self) -> bool:
        return self._undiscovered > 0 and any(
            b.models is None and b.health is not Health.UNHEALTHY for b in self.backends.values()
        )

    def fail(self, ticket: Ticket, error: PoolError) -> None:
        """End a waiting ticket with an error (its waiter raises it)."""
        if ticket.state is not TicketState.WAITING:
            return
        self._remove_waiting(ticket)
        ticket.state = TicketState.FAILED
        ticket.error = error
        self.stats["failed"] += 1
        if self.on_ticket_done is not None:
            self.on_ticket_done(ticket)

    def _enqueue(self, ticket: Ticket) -> None:
        if ticket.pin is not None:
            self.backends[ticket.pin].pinned.append(ticket)
        else:
            heapq.heappush(self._queues.setdefault(ticket.model, []), (ticket.order, ticket))
        arrivals = self._arrivals.setdefault(ticket.model, deque())
        if arrivals and arrivals[-1].arrival > ticket.arrival:  # queued again: back in its place
            arrivals.insert(bisect.bisect(arrivals, ticket.arrival, key=lambda t: t.arrival), ticket)
        else:
            arrivals.append(ticket)
        self._waiting[ticket.model] = self._waiting.get(ticket.model, 0) + 1
        self._waiting_total += 1
        ticket.tenant.waiting += 1
        if ticket.deadline is not None:
            heapq.heappush(self._deadlines, (ticket.deadline, ticket.id, ticket))

    def _remove_waiting(self, ticket: Ticket) -> None:
        """Account a waiting ticket as gone; heaps drop it lazily when it reaches the top."""
        model = ticket.model
        if ticket.held_for is not None:
            self._unheld(model)
        remaining = self._waiting[model] - 1
        self._waiting_total -= 1
        ticket.tenant.waiting -= 1
        ticket.state = TicketState.CANCELLED  # callers set the final state
        if remaining:
            self._waiting[model] = remaining
        else:
            del self._waiting[model]
            self._queues.pop(model, None)
            self._arrivals.pop(model, None)
            barrier = self._barriers.get(model)
            if barrier is not None:
                self._clear_barrier(barrier)

    def _head(self, model: str) -> Ticket | None:
        queue = self._queues.get(model)
        while queue:
            ticket = queue[0][1]
            if ticket.state is TicketState.WAITING and ticket.held_for is None:
                tenant = ticket.tenant
                if tenant.max_concurrent is None or not tenant.capped:
                    return ticket
                heapq.heappush(tenant.parked, heapq.heappop(queue))  # back when a lease of its ends
                continue
            heapq.heappop(queue)
        return None

    def serves(self, model: str) -> bool:
        """Whether any backend lists the model (healthy or not)."""
        return bool(self._serving.get(model))

    def _free_serving(self, model: str) -> Iterable[Backend]:
        serving = self._serving.get(model, set())
        return (
            (b for b in self._free if b in serving)
            if len(self._free) <= len(serving)
            else (b for b in serving if b in self._free)
        )

    def _touch(self, backend: Backend) -> None:
        if backend.free and backend.health is Health.HEALTHY and not backend.removed:
            self._free.add(backend)
        else:
            self._free.discard(backend)

    def _set_models(self, backend: Backend, models: frozenset[str] | None) -> None:
        if (backend.models is None) != (models is None):
            self._undiscovered += 1 if models is None else -1
        for model in backend.models or ():
            self._serving[model].discard(backend)
            if not self._serving[model]:
                del self._serving[model]
        backend.models = models
        for model in models or ():
            self._serving.setdefault(model, set()).add(backend)

    def _set_resident(self, backend: Backend, resident: Sequence[str]) -> None:
        # Loaded beyond capacity means the oldest idle ones were evicted; active models stay.
        kept: list[str] = []
        for model in dict.fromkeys(resident):
            if len(kept) < backend.max_loaded_models or model in backend.active:
                kept.append(model)
        for model in backend.resident:
            self._resident_on[model].discard(backend)
            if not self._resident_on[model]:
                del self._resident_on[model]
            if model not in kept:  # unloaded: its prompts went with it
                self._prefixes.pop((backend.name, model), None)
        backend.resident = kept
        for model in kept:
            self._resident_on.setdefault(model, set()).add(backend)

    def _clear_barrier(self, backend: Backend) -> None:
        if backend.barrier is not None:
            self._barriers.pop(backend.barrier, None)
            backend.barrier = None

    def _affinity_backend(self, key: str | None) -> str | None:
        if key is None:
            return None
        entry = self._affinity.get(key)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def _affinity_outcome(self, ticket: Ticket, backend: Backend) -> Affinity | None:
        if ticket.affinity_key is None and ticket.prompt is None:
            return None
        if ticket.held_for is backend:
            return Affinity.WAITED
        if ticket.moved_from is not None and ticket.moved_from != backend.name:
            return Affinity.MOVED
        pinned_to = self._affinity_backend(ticket.affinity_key)
        if pinned_to is not None:
            return Affinity.HIT if pinned_to == backend.name else Affinity.MOVED
        if ticket.prompt is not None and self._cached_tokens(ticket, backend) >= self.prefix_min_tokens:
            return Affinity.PREFIX
        return Affinity.MISS

    def _remember_affinity(self, key: str | None, backend: Backend) -> None:
        if key is None:
            return
        self._affinity[key] = (backend.name, self.clock() + self.affinity_ttl)
        self._affinity.move_to_end(key)
        while len(self._affinity) > self.affinity_max_sessions:
            self._affinity.popitem(last=False)


def _rounded(value: float | None, scale: float) -> float | None:
    return None if value is None else round(value * scale, 3)
