"""The scheduler's vocabulary: backends, tenants, tickets, grants, and the events a call reports.

- a *ticket* is one request waiting for (or holding) a slot for one model;
- a *grant* is a slot handed to a ticket on one backend; releasing it frees the slot (once);
- a backend's *resident* models are what it has loaded (most recent first); sending a model that is
  not resident costs a *load* (a VRAM swap when another model has to go);
- the *drain guard*: a backend busy with model A takes no model B unless it may hold both
  (``max_loaded_models``); a model being loaded or unloaded there (``changing``) counts as busy,
  and takes no request until it is loaded;
- a *drain barrier* reserves one backend for a starving model: it admits no other model until the
  starving model gets a slot there;
- a *tenant* is who sent a request (an API key): its share of contended slots and its caps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from local_inference_pool.core.prompt_index import Ewma, Prompt
from local_inference_pool.errors import PoolError

__all__ = [
    "Affinity",
    "Backend",
    "Events",
    "Grant",
    "Health",
    "LeaseRequest",
    "Tenant",
    "Ticket",
    "TicketState",
]


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """What a request asks of the pool: one value instead of a bundle of keywords in every signature.

    ``priority``: higher is served first. ``session``: an affinity key; the same key goes back to
    the same backend while it has room. ``timeout``: seconds to wait for a slot (None: forever).
    ``pin``: the one backend that may serve it (ahead of that backend's queue). ``tenant``: whose
    request it is (a ``[[keys]]`` name). ``prompt``: what it will send, for placement by prompt
    cache. ``arrival`` (on the scheduler's clock) and ``tag`` keep the place of a request queued
    again.
    """

    model: str
    priority: int = 0
    session: str | None = None
    timeout: float | None = None
    pin: str | None = None
    tenant: str = ""
    prompt: Prompt | None = None
    arrival: float | None = None
    tag: float | None = None


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
    # Models being loaded or unloaded here now (model -> "loading" or "unloading"): each holds a
    # place among ``max_loaded_models``, and no request goes to one until it is loaded.
    changing: dict[str, str] = field(default_factory=dict)
    # The models the pool itself loads here (``core/residency.py``): on a server that loads and
    # unloads on request, one of them goes only where it is loaded, never into a load by request.
    placed: frozenset[str] = frozenset()
    residency_known: bool = False  # reported by the backend, or learned from a grant
    trial: bool = False  # half-open after failures: admits one lease until the trial decides
    barrier: str | None = None
    loads: int = 0
    granted: int = 0
    removed: bool = False
    draining: bool = False  # an operator's drain: no new lease but a pinned one, until undrained
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

    @property
    def admin_state(self) -> str:
        """``active``; ``draining`` while leases of this process run on it; then ``drained``."""
        if not self.draining:
            return "active"
        return "draining" if self.active_total else "drained"

    def can_take(self, model: str, *, pinned: bool = False) -> bool:
        """Healthy, lists the model, not reserved for another, and the drain guard allows it; not
        draining, unless the request is pinned here (as HAProxy's drain still admits sticky ones:
        a stored response or a stream's own continuation lives on this backend only)."""
        if (self.draining and not pinned) or self.health is not Health.HEALTHY:
            return False
        if self.models is None or model not in self.models:
            return False
        if self.barrier is not None and self.barrier != model:
            return False
        if self.changing:  # a load or an unload here: its model waits, and it holds a place
            if model in self.changing:
                return False
            places = self.active.keys() | self.foreign_models | self.changing.keys()
            if model in self.placed and model not in self.resident and model not in self.active:
                return False
            return model in self.active or len(places) < self.max_loaded_models
        if model in self.active:
            return True
        if model in self.placed and model not in self.resident:
            return False
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
    declared: bool = False  # set_tenant made it; an undeclared one is forgotten when idle

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
    # Why it last had to wait (slots, drain_guard, cache_hold, tenant_share): None when it was
    # granted without waiting.
    waited_for: str | None = None
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


@dataclass(slots=True)
class Events:
    """What a scheduler call did to waiting tickets, for the caller to act on after the call (the
    pool wakes their waiters): granted a slot, failed with an error, or held for a backend's cache
    (a hold ends at ``hold_until``, another time for its waiter to look again)."""

    granted: list[Ticket] = field(default_factory=list)
    failed: list[Ticket] = field(default_factory=list)
    held: list[Ticket] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.granted or self.failed or self.held)

    def tickets(self) -> list[Ticket]:
        """Every ticket these events touched, granted first."""
        return [*self.granted, *self.failed, *self.held]
