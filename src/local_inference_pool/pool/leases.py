"""The async facade over the scheduler: acquire a slot, hold it as a lease, release it once.

::

    async with Pool(config) as pool:
        async with pool.acquire("qwen2.5-7b", session="user-42") as lease:
            response = await client.post(f"{lease.url}/v1/chat/completions", json=...)

Waiting is cancellation-safe: every exit of a waiter (grant, timeout, cancellation, pool closing)
either hands the caller a lease or leaves no slot behind; a grant that raced with a cancellation is
released and passed on to the next waiter. A lease that is dropped without being released is
released when it is garbage-collected, with a warning in the log, so the slot is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import anyio

from local_inference_pool.config import BackendConfig, PoolConfig, shown_state
from local_inference_pool.core.fleet import Claimed, FleetView, Head, Standing
from local_inference_pool.core.prompt_index import Prompt
from local_inference_pool.core.scheduler import (
    Affinity,
    Grant,
    Health,
    LeaseRequest,
    Scheduler,
    Ticket,
    TicketState,
)
from local_inference_pool.errors import (
    NoCapacityError,
    PoolClosedError,
    StateUnavailableError,
    WrongEventLoopError,
)

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from local_inference_pool.pool.redis_state import SharedLeases

__all__ = ["Lease", "Pool", "Unleased"]

logger = logging.getLogger(__name__)

_DEFAULT: Final[Any] = object()


class Lease:
    """One slot on one backend. ``release()`` is synchronous and idempotent."""

    __slots__ = ("__weakref__", "_finalizer", "_grant", "_pool", "api_key", "queue_wait")

    def __init__(self, pool: Pool, grant: Grant, queue_wait: float) -> None:
        self._pool = pool
        self._grant = grant
        self.queue_wait = queue_wait
        # The outbound key for this backend (never the caller's), kept with the lease: a backend
        # removed while the lease runs takes its configuration with it.
        self.api_key: str | None = pool._api_keys.get(grant.backend.name)
        self._finalizer = weakref.finalize(self, pool._release_dropped, grant)
        self._finalizer.atexit = False  # a process that exits holding leases has no pool to return them to

    @property
    def url(self) -> str:
        return self._grant.backend.url

    @property
    def backend(self) -> str:
        return self._grant.backend.name

    @property
    def model(self) -> str:
        return self._grant.model

    @property
    def affinity(self) -> Affinity | None:
        return self._grant.affinity

    @property
    def loaded_model(self) -> bool:
        """True when this lease made the backend load the model (a cold start or a swap)."""
        return self._grant.loaded_model

    @property
    def released(self) -> bool:
        return self._grant.released

    def learn(
        self,
        *,
        prompt_tokens: int | None,
        cached_tokens: int | None = None,
        prefill_seconds: float | None = None,
        evaluated_tokens: int | None = None,
    ) -> None:
        """What the backend reported of this request's prompt: its tokens, how many came from its
        cache, and how long the rest took (llama.cpp's ``timings``). The pool learns its prefill
        times and cache figures from these."""
        self._pool._scheduler.learn(
            self._grant,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            prefill_seconds=prefill_seconds,
            evaluated_tokens=evaluated_tokens,
        )

    def release(self) -> None:
        """Give the slot back. From a thread other than the pool's loop, it is handed to the loop."""
        self._finalizer.detach()
        self._pool._release(self._grant)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Lease {self.model!r} on {self.backend} ({self.url}) {state}>"


class Unleased:
    """A backend chosen for a request that takes no slot (tokenize, count_tokens, reading a stored
    response): the face of a lease, with nothing to release."""

    __slots__ = ("api_key", "backend", "url")
    affinity: Affinity | None = None
    queue_wait = 0.0
    released = False

    def __init__(self, backend: str, url: str, api_key: str | None) -> None:
        self.backend = backend
        self.url = url
        self.api_key = api_key

    def release(self) -> None:
        """Nothing to give back."""


class Acquiring:
    """What ``pool.acquire()`` returns: await it for a Lease, or use it as ``async with``.

    ``at_once()`` first is the fast path of a caller that does something only when the request
    must wait (the gateway watches for a client that leaves): it submits the request and returns
    the lease when a slot was free, else None; awaiting the object then waits for that same
    submission. Once submitted, the request must be awaited: the wait withdraws it on any exit.
    """

    __slots__ = ("_granted", "_lease", "_pool", "_request", "_ticket")

    def __init__(self, pool: Pool, request: LeaseRequest) -> None:
        self._pool = pool
        self._request = request
        self._ticket: Ticket | None = None
        self._granted: Lease | None = None
        self._lease: Lease | None = None

    def at_once(self) -> Lease | None:
        """Submit the request; its lease if it needs no wait (nor a claim in the shared store)."""
        pool = self._pool
        ticket = self._ticket = pool.submit(self._request)
        lease = self._granted = pool.granted(ticket)
        return lease if lease is not None and pool._shared is None else None

    async def _wait(self) -> Lease:
        if self._ticket is None:
            lease = self.at_once()
            if lease is not None:
                return lease
        assert self._ticket is not None
        return await self._pool.settle(self._ticket, self._granted)

    def __await__(self) -> Generator[Any, None, Lease]:
        return self._wait().__await__()

    async def __aenter__(self) -> Lease:
        self._lease = await self._wait()
        return self._lease

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lease is not None:
            self._lease.release()


class Pool:
    """Slot accounting for a fleet of inference servers, for one event loop at a time."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        initial_health: Health = Health.HEALTHY,
    ) -> None:
        """``initial_health``: what backends count as before anything probed them. The app starts
        them as LOADING (requests wait for the first probe); a library user without probes, HEALTHY."""
        self.config = config
        self._clock = clock
        self._scheduler = Scheduler(
            clock=clock,
            queue_limit=config.queue_limit,
            starvation_bound=config.starvation_bound,
            affinity=config.affinity,
            affinity_ttl=config.affinity_ttl,
            affinity_max_sessions=config.affinity_max_sessions,
            cache_wait_max=config.cache_wait_max,
            prefill_seconds_per_token=config.prefill_ms_per_token / 1000,
            prefix_min_tokens=config.prefix_min_tokens,
            prefix_index_blocks=config.prefix_index_blocks,
        )
        self._backend_configs: dict[str, BackendConfig] = {}
        self._api_keys: dict[str, str | None] = {}
        self._warm: dict[str, dict[str, float]] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self._waiters: dict[int, anyio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = False
        self._drained: anyio.Event | None = None
        # Shared state (``config.state``): the fleet's leases in Redis; made on ``async with``.
        self._shared: SharedLeases | None = None
        self._shared_tasks: AsyncExitStack | None = None
        self._fleet_releases: list[str] = []
        self._fleet_release_wanted: anyio.Event | None = None
        self._fleet_external: dict[str, int] = {}
        self._views: dict[str, FleetView] = {}  # the last each backend's fleet was seen
        self._heads_wanted: anyio.Event | None = None  # set when this process's queue heads changed
        self._published_heads: dict[str, tuple[int, float]] = {}  # model -> (priority, arrival)
        self._claims: dict[str, int] = dict.fromkeys((c.name.lower() for c in Claimed), 0)
        self._responses: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> backend, expiry
        self._probe_external: dict[str, int] = {}
        self.state_reachable = True
        for index in range(len(config.api_keys)):
            self._scheduler.set_tenant(f"api_keys[{index}]")
        for key in config.keys:
            self._scheduler.set_tenant(
                key.name,
                weight=key.weight,
                max_concurrent=key.max_concurrent,
                max_queued=key.max_queued,
            )
        for backend in config.backends:
            self.add_backend(backend, health=initial_health)
        self._deliver()

    # --- backends --------------------------------------------------------------------------

    def add_backend(self, backend: BackendConfig, *, health: Health = Health.HEALTHY) -> None:
        """Add a server. Until its slot count is detected or configured it counts as one slot."""
        self._backend_configs[backend.name] = backend
        self._api_keys[backend.name] = backend.api_key
        self._scheduler.add_backend(
            backend.name,
            backend.url,
            slots=backend.slots or 1,
            models=backend.models,
            max_loaded_models=backend.max_loaded_models,
            weight=backend.weight,
            health=health,
            cache_tokens=backend.cache_tokens,
        )
        self._deliver()

    def remove_backend(self, name: str) -> None:
        """Take a server out of the pool. Its requests pinned to it fail, those waiting for its
        cache go elsewhere; leases still held on it stay valid (and, with shared state, renewed
        fleet-wide) until they are released. Nothing else of it is kept: a server added again
        under its name starts anew."""
        self._scheduler.remove_backend(name)
        del self._backend_configs[name]
        for per_backend in (self._warm, self._info, self._probe_external, self._fleet_external, self._views):
            per_backend.pop(name, None)
        self._api_keys.pop(name, None)
        self._deliver()

    def update_backend(
        self,
        name: str,
        *,
        slots: int | None = None,
        models: Iterable[str] | None = None,
        resident: Sequence[str] | None = None,
        health: Health | None = None,
        external_busy: int | None = None,
        server_busy: int | None = None,
        trial: bool | None = None,
        context: int | None = None,
    ) -> None:
        """Apply what a probe found; queued requests that can now run are granted at once.

        A configured slot count or model list wins over a detected one. ``server_busy`` is what the
        server says is running, ours included: the rest is outside work that takes our capacity.
        """
        configured = self._backend_configs[name]
        changes: dict[str, Any] = {}
        if slots is not None and configured.slots is None:
            changes["slots"] = slots
        if models is not None and configured.models is None:
            changes["models"] = list(models)
        if resident is not None:
            changes["resident"] = list(resident)
        if health is not None:
            changes["health"] = health
        if external_busy is not None:
            changes["external_busy"] = external_busy
        if server_busy is not None:
            ours = self._scheduler.backends[name].active_total
            self._probe_external[name] = max(0, server_busy - ours)
            changes["external_busy"] = max(self._probe_external[name], self._fleet_external.get(name, 0))
        if trial is not None:
            changes["trial"] = trial
        if context is not None:
            changes["context"] = context
        self.override_backend(name, **changes)

    def override_backend(self, name: str, **changes: Any) -> None:
        """Apply changes as given (an operator's word: a configured value does not win), and
        grant what they make possible. The keywords are the scheduler's ``update_backend``'s."""
        self._scheduler.update_backend(name, **changes)
        self._deliver()

    def backend_kind(self, name: str) -> str:
        """The backend's kind: configured, else as detected (``auto`` until a probe says)."""
        configured = self._backend_configs.get(name)
        if configured is not None and configured.kind != "auto":
            return configured.kind
        return str(self._info.get(name, {}).get("detected_kind", "auto"))

    def annotate(self, name: str, **info: Any) -> None:
        """Facts for the snapshot that the scheduler does not use (detected kind, circuit, errors)."""
        if name in self._backend_configs:  # a probe that ends after its backend went adds nothing
            self._info.setdefault(name, {}).update(info)

    # --- leases ----------------------------------------------------------------------------

    def acquire(
        self,
        model: str | LeaseRequest,
        *,
        priority: int = 0,
        session: str | None = None,
        timeout: float | None = _DEFAULT,
        tenant: str = "",
        prompt: Prompt | None = None,
    ) -> Acquiring:
        """Wait for a slot for ``model``: ``lease = await pool.acquire(m)`` or ``async with``.

        The one entry point for a lease: the library, the v0.7 layer and the gateway all come
        through here. ``model`` is a model name with the keywords below, or a whole ``LeaseRequest``
        (its ``timeout`` is then as given; None waits forever).

        ``priority``: higher is served first. ``session``: an affinity key; the same key goes back to
        the same backend while it has room. ``timeout``: seconds to wait (None: forever); the
        default is ``config.queue_timeout``. ``tenant``: whose request it is (a ``[[keys]]`` name):
        its share, caps and counts. ``prompt``: what the request will send (``prompt_of``), for
        placement by prompt cache. Raises ModelNotFoundError, NoCapacityError, QueueFullError
        (TenantQueueFullError for a key's own limit), QueueTimeoutError or PoolClosedError.
        """
        if isinstance(model, LeaseRequest):
            return Acquiring(self, model)
        if timeout is _DEFAULT:
            timeout = self.config.queue_timeout
        return Acquiring(
            self,
            LeaseRequest(
                model, priority=priority, session=session, timeout=timeout, tenant=tenant, prompt=prompt
            ),
        )

    @property
    def shared(self) -> bool:
        """Whether leases are shared with other processes (``config.state``): then a grant is only
        a candidate until ``settle`` has claimed it fleet-wide."""
        return self.config.state is not None

    async def settle(self, ticket: Ticket, lease: Lease | None = None) -> Lease:
        """The ticket's lease once it is granted and, with shared state, claimed fleet-wide.

        A claim that loses (other processes hold the backend's slots, another model is active
        there, or the free slots belong to requests that came earlier to other processes) hands the
        grant back, takes what the claim saw as outside load, and queues the request again in its
        place, with what is left of its deadline. A request whose session the fleet last served on
        another backend (a turn that went to another process) is placed again preferring that
        backend, once. Cancelled at any point, nothing is held.
        """
        check_session = True
        while True:
            if lease is None:
                lease = await self.wait(ticket)
            shared = self._shared
            if shared is None:
                if self.config.state is not None:
                    lease.release()
                    raise StateUnavailableError(
                        "this pool shares its state: use it as 'async with Pool(config) as pool' "
                        "(the app's lifespan does), so that it connects and renews its leases"
                    )
                return lease
            grant = lease._grant
            ticket = grant.ticket
            name = grant.backend.name
            try:
                tenant = ticket.tenant
                outcome, session_backend, key_others, view = await shared.claim(
                    shared.lease_id(grant.id),
                    name,
                    grant.model,
                    self._standing(name),
                    priority=ticket.priority,
                    waited=self._clock() - ticket.arrival,
                    queued=ticket.pin is None,  # a pinned retry already waited its turn
                    session=ticket.affinity_key,
                    check_session=check_session,
                    key=tenant.name,
                    key_cap=tenant.max_concurrent,
                )
            except BaseException:
                lease.release()  # also gives back a claim that may have reached the store
                raise
            # On a loss to earlier waiters elsewhere, the view holds the free slots for them, so
            # the request is not granted here again until the fleet changes.
            self._claims[outcome.name.lower()] += 1
            if tenant.max_concurrent is not None:
                # Taken as the key's outside leases before this lease goes back: a key at its cap
                # across the fleet parks its requests here until one of its leases ends somewhere.
                self._scheduler.update_tenant(tenant.name, external=key_others)
                self._deliver()
            self._apply_fleet(name, view)
            if outcome is Claimed.WON:
                return lease
            if outcome is Claimed.SESSION_ELSEWHERE and ticket.affinity_key and session_backend:
                self._scheduler.remember_affinity(ticket.affinity_key, session_backend)
                check_session = False  # placed again preferring it; wherever that lands, it stays
            lease.release()
            deadline = ticket.deadline
            ticket = self.submit(
                LeaseRequest(
                    ticket.model,
                    priority=ticket.priority,
                    session=ticket.affinity_key,
                    timeout=None if deadline is None else max(0.0, deadline - self._clock()),
                    pin=ticket.pin,
                    tenant=ticket.tenant.name,
                    prompt=ticket.prompt,
                    arrival=ticket.arrival,
                    tag=ticket.tag,
                )
            )
            lease = self.granted(ticket)

    def submit(self, request: LeaseRequest) -> Ticket:
        """Queue a request without waiting: it may come back granted (``granted``), else ``wait`` for it.

        Raises when it can never be served now. A waiting ticket is always waited for: ``wait``
        withdraws it on any exit, so a ticket that is abandoned unwaited holds its place until its
        deadline. ``acquire`` does all of this; this is its first step.
        """
        self._bind_loop()
        if self._closed:
            raise PoolClosedError("the pool is closed")
        if not isinstance(request.model, str) or not request.model:
            raise ValueError(f"model must be a non-empty string, not {request.model!r}")
        try:
            ticket = self._scheduler.submit(request)
        finally:
            self._deliver()
        if ticket.state is TicketState.WAITING:
            self._queue_changed()
        return ticket

    async def wait(self, ticket: Ticket) -> Lease:
        """Wait for a queued ticket's grant. Whatever ends the wait, no slot is left behind."""
        scheduler = self._scheduler
        taken = False
        try:
            while ticket.state is TicketState.WAITING:
                # Woken when it is granted or ends, and when it is held for a cache (whose end is
                # another time to look again); a new event each time round.
                event = self._waiters[ticket.id] = anyio.Event()
                ends = [
                    t
                    for t in (ticket.deadline, ticket.hold_until if ticket.held_for else None)
                    if t is not None
                ]
                delay = max(0.0, min(ends) - self._clock()) if ends else math.inf
                with anyio.move_on_after(delay):
                    await event.wait()
                if ticket.state is TicketState.WAITING:
                    scheduler.refresh()
                    self._deliver()
            lease = self._take(ticket)
            taken = True
            return lease
        finally:
            self._waiters.pop(ticket.id, None)
            if not taken:
                # Cancelled, timed out or failed: withdraw, and pass on a grant we never took.
                scheduler.cancel(ticket)
                self._deliver()
                self._queue_changed()

    def try_acquire(self, model: str) -> Lease | None:
        """A lease now if a backend has a free slot for ``model``, else None; never queues, never
        waits (the v0.7 layer's ``find_and_acquire``). Not with shared state: a fleet-wide claim
        takes a round trip."""
        self.bind_running_loop()
        if self._closed:
            raise PoolClosedError("the pool is closed")
        grant = self._scheduler.try_acquire(model)
        self._deliver()
        return None if grant is None else Lease(self, grant, 0.0)

    def granted(self, ticket: Ticket) -> Lease | None:
        """The lease of a ticket granted at submission, None while it waits; raises if it failed."""
        return None if ticket.state is TicketState.WAITING else self._take(ticket)

    def pick(self, model: str, *, avoid: Iterable[str] = (), backend: str | None = None) -> Unleased:
        """A healthy backend for a request that takes no slot: ``backend`` itself, or the best one
        serving ``model`` other than ``avoid``. Raises as ``submit`` does when there is none."""
        if self._closed:
            raise PoolClosedError("the pool is closed")
        if backend is None:
            self._scheduler.check_servable(model)
            backend = self._scheduler.alternative(model, avoid)
            if backend is None:
                raise NoCapacityError(f"no healthy backend for model {model!r} now; retry later", model=model)
        found = self._scheduler.backends.get(backend)
        if found is None or found.health is not Health.HEALTHY:
            raise NoCapacityError(f"the backend {backend!r} is not available now; retry later", model=model)
        return Unleased(found.name, found.url, self._api_keys.get(found.name))

    def models(self) -> list[str]:
        """Every model some backend lists, sorted."""
        return self._scheduler.models()

    async def remember_response(self, response_id: str, backend: str) -> None:
        """Which backend stores a response (OpenAI Responses API), for ``response_ttl``: here, and
        fleet-wide with shared state. Bounded by ``response_max_ids`` here (oldest first out)."""
        responses = self._responses
        responses[response_id] = (backend, self._clock() + self.config.response_ttl)
        responses.move_to_end(response_id)
        while len(responses) > self.config.response_max_ids:
            responses.popitem(last=False)
        if self._shared is not None:
            try:
                await self._shared.remember(f"response:{response_id}", backend, self.config.response_ttl)
            except StateUnavailableError as exc:
                self._reachable(False, str(exc))  # remembered here; other processes will not know it

    async def response_backend(self, response_id: str) -> str | None:
        """The backend that stores ``response_id``, if this pool (or its fleet) saw it made."""
        entry = self._responses.get(response_id)
        if entry is not None and entry[1] > self._clock():
            return entry[0]
        if self._shared is None:
            return None
        return await self._shared.recall(f"response:{response_id}")

    def another_backend(self, model: str, avoid: Iterable[str]) -> str | None:
        """The best healthy backend for ``model`` other than ``avoid``: where a retry may be pinned."""
        return self._scheduler.alternative(model, avoid)

    def _take(self, ticket: Ticket) -> Lease:
        if ticket.state is TicketState.FAILED and ticket.error is not None:
            raise ticket.error
        grant = ticket.grant
        assert grant is not None, ticket.state
        return Lease(self, grant, grant.granted_at - ticket.arrival)

    def _deliver(self) -> None:
        """Act on what the scheduler's calls since the last delivery did: wake the waiters of the
        tickets they granted, failed or held (a held one looks again when its hold ends)."""
        events = self._scheduler.take_events()
        if not events:
            return
        waiters = self._waiters
        for ticket in events.tickets():
            event = waiters.get(ticket.id)
            if event is not None:
                event.set()
        self._queue_changed()

    def release_threadsafe(self, lease: Lease) -> None:
        """Release a lease from any thread (a worker thread, a sync library's callback).

        ``lease.release()`` does the same; this name documents the intent at the call site.
        """
        lease.release()

    def _release(self, grant: Grant) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() == self._loop_thread:
            self._release_on_loop(grant)
        else:
            # The scheduler is not thread-safe: the release runs on the pool's own loop.
            loop.call_soon_threadsafe(self._release_on_loop, grant)

    def _release_on_loop(self, grant: Grant) -> None:
        shared = self._shared
        if shared is not None and self._fleet_release_wanted is not None:
            lease_id = shared.lease_id(grant.id)
            backend = shared.releasing(lease_id)
            if backend is not None:
                # The slot stays taken here until the store has the release: granted again sooner,
                # its next claim would only lose to this very lease.
                self._fleet_releases.append(lease_id)
                self._fleet_release_wanted.set()
                view = self._views.get(backend)
                if view is not None:
                    self._apply_fleet(backend, view)
        released = self._scheduler.release(grant)
        self._deliver()
        if released and self._drained is not None and not self._scheduler.grants:
            self._drained.set()

    def _release_dropped(self, grant: Grant) -> None:
        # The garbage collector may run this in the middle of any scheduler call, on any thread:
        # never touch the scheduler here, hand the release to the loop.
        if grant.released:
            return
        logger.warning(
            "a lease for model %r on %s was dropped without release(); releasing it now",
            grant.model,
            grant.backend.name,
        )
        loop = self._loop
        if loop is None or loop.is_closed():
            self._release_on_loop(grant)
        else:
            loop.call_soon_threadsafe(self._release_on_loop, grant)

    def bind_running_loop(self) -> None:
        """Bind to the running event loop, if any (synchronous callers may have none)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._bind_loop()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        idle = not self._scheduler.grants and not self._waiters
        if self._loop is None or self._loop.is_closed() or idle:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            return
        raise WrongEventLoopError(
            "this Pool is in use on another event loop; create one Pool per event loop "
            "(slots are counted per pool, so share the loop, not the pool)"
        )

    # --- warm-up, state, shutdown ----------------------------------------------------------

    def has_backend(self, name: str) -> bool:
        return name in self._backend_configs

    def backend_configs(self) -> list[BackendConfig]:
        """The configuration of every backend in the pool now."""
        return list(self._backend_configs.values())

    def warm_candidates(self, model: str) -> list[str]:
        """The backends that serve ``model`` and are not down, best to warm first: where the model
        is loaded already, then the least loaded."""
        serving = [
            b
            for b in self._scheduler.backends.values()
            if b.models is not None and model in b.models and b.health is not Health.UNHEALTHY
        ]
        serving.sort(key=lambda b: (b.needs_load(model), b.load_ratio, b.index))
        return [b.name for b in serving]

    def note_warm(self, name: str, model: str, when: float) -> None:
        """A model was warmed on a backend (wall-clock time): shown as ``warm_models``."""
        if name in self._backend_configs:
            self._warm.setdefault(name, {})[model] = when

    async def acquire_on(self, name: str, model: str) -> Lease:
        """A lease on one named backend, waiting as long as it takes (warm-up)."""
        return await Acquiring(self, LeaseRequest(model, timeout=None, pin=name))

    def serves(self, model: str) -> bool:
        """Whether any backend lists ``model`` now (healthy or not)."""
        return self._scheduler.serves(model)

    def snapshot(self) -> dict[str, Any]:
        """The whole state, JSON-ready: backends, slots, leases per model, queue by model."""
        state = self._scheduler.snapshot()
        for backend in state["backends"]:
            configured = self._backend_configs.get(backend["name"])
            backend["kind"] = configured.kind if configured else "auto"
            backend["warm_models"] = sorted(self._warm.get(backend["name"], {}))
            if self.config.state is not None:
                backend["fleet_leases"] = self._fleet_external.get(backend["name"], 0)
                view = self._views.get(backend["name"])
                backend["fleet_reserved"] = 0 if view is None else view.reserved
            backend.update(self._info.get(backend["name"], {}))
        state["closed"] = self._closed
        shared = self._shared
        state["shared_state"] = (
            None
            if self.config.state is None
            else {
                "store": shown_state(self.config.state),
                "reachable": self.state_reachable and shared is not None,
                "process": None if shared is None else shared.process,
                "leases_held": 0 if shared is None else len(shared.held),
                "claims": dict(self._claims),
                "lease_ttl": self.config.lease_ttl,
            }
        )
        return state

    async def fleet(self) -> list[dict[str, Any]] | None:
        """With shared state: every live process of the fleet and its leases (None: no shared
        state; a list with only an error when the store cannot be reached)."""
        shared = self._shared
        if shared is None:
            return None
        try:
            return await shared.processes()
        except StateUnavailableError as exc:
            return [{"error": str(exc)}]

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    async def aclose(self, grace: float = 0.0) -> None:
        """Refuse new requests, fail waiting ones, then wait up to ``grace`` s for leases to end."""
        if not self._closed:
            self._closed = True
            for ticket in list(self._scheduler.waiting_tickets()):
                self._scheduler.fail(ticket, PoolClosedError("the pool is shutting down"))
            self._deliver()
        if grace > 0 and self._scheduler.grants:
            self._drained = anyio.Event()
            with anyio.move_on_after(grace):
                await self._drained.wait()

    async def __aenter__(self) -> Self:
        """With ``config.state``: connect to the shared store and start renewing leases, listening
        for releases in other processes and sending this one's releases."""
        if self.config.state is not None and self._shared_tasks is None:
            from local_inference_pool.pool.redis_state import SharedLeases

            self._bind_loop()
            stack = AsyncExitStack()
            shared = SharedLeases(
                self.config.state,
                lease_ttl=self.config.lease_ttl,
                starvation_bound=self.config.starvation_bound,
                affinity_ttl=self.config.affinity_ttl,
            )
            stack.push_async_callback(shared.aclose)
            group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(group.cancel_scope.cancel)
            self._fleet_release_wanted = anyio.Event()
            self._heads_wanted = anyio.Event()
            self._shared, self._shared_tasks = shared, stack
            await group.start(self._keep_shared, shared)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
        stack, self._shared_tasks = self._shared_tasks, None
        if stack is not None:
            shared = self._shared
            with anyio.move_on_after(2, shield=True):
                await self._send_fleet_releases(shared)  # the last ones, while the store is there
                await self._publish_heads(shared)  # nothing waits here any more
            self._shared = None
            await stack.aclose()

    # --- shared state ----------------------------------------------------------------------

    async def _keep_shared(self, shared: SharedLeases, *, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._renew_leases, shared)
            group.start_soon(self._hear_releases, shared)
            group.start_soon(self._release_leases, shared)
            group.start_soon(self._publish_queue, shared)
            task_status.started()

    def _outside_load(self, name: str) -> int:
        """Slots busy with work from outside the pool: what the server reports busy beyond this
        process's leases, less what the other pool processes hold (the store counts those)."""
        return max(0, self._probe_external.get(name, 0) - self._fleet_external.get(name, 0))

    def _apply_fleet(self, name: str, view: FleetView) -> None:
        """What the other processes hold on a backend, as the scheduler's outside load and the
        models its drain guard must respect; this process's releases still on their way count too."""
        shared = self._shared
        if shared is None or name not in self._scheduler.backends:
            return
        self._views[name] = view
        self._fleet_external[name] = view.leases  # the others' (the store tells ours from theirs)
        self._scheduler.update_backend(
            name,
            external_busy=max(view.leases, self._probe_external.get(name, 0))
            + shared.releasing_on(name)
            + view.reserved,
            foreign_models=[m for m, n in view.models.items() if n > 0],
        )
        if view.newest_age is not None:
            self._scheduler.passed_over(self._clock() - view.newest_age)
        self._deliver()

    def _standing(self, name: str) -> Standing:
        """A backend as this process sees it, and its best waiter here (priority, then the longest
        wait): what the fleet's scripts need to tell which free slots are held for earlier waiters."""
        backend = self._scheduler.backends.get(name)
        if backend is None:  # removed here, still leased
            return Standing(capacity=1, max_models=1, models=())
        models = tuple(sorted(backend.models or ()))
        best: tuple[int, float] | None = None
        now = self._clock()
        for model in self._scheduler.waiting_models():
            head = self._scheduler.head(model) if model in models else None
            if head is not None and (best is None or (head.priority, now - head.arrival) > best):
                best = (head.priority, now - head.arrival)
        priority, waited = best or (0, 0.0)
        return Standing(
            capacity=max(1, backend.slots - self._outside_load(name)),
            max_models=backend.max_loaded_models,
            models=models,
            priority=priority,
            waited=waited,
        )

    def _standings(self, names: Iterable[str] | None = None) -> dict[str, Standing]:
        return {name: self._standing(name) for name in (self._scheduler.backends if names is None else names)}

    def _queue_changed(self) -> None:
        if self._heads_wanted is not None:
            self._heads_wanted.set()

    def _heads(self) -> tuple[dict[str, Head], dict[str, tuple[int, float]]]:
        """This process's head of each model queue, and what identifies each: (priority, arrival)."""
        now = self._clock()
        heads: dict[str, Head] = {}
        places: dict[str, tuple[int, float]] = {}
        for model in self._scheduler.waiting_models():
            head = self._scheduler.head(model)
            if head is not None:
                heads[model] = Head(head.priority, now - head.arrival, self._scheduler.waiting_for(model))
                places[model] = (head.priority, head.arrival)
        return heads, places

    def _reachable(self, reachable: bool, why: str = "") -> None:
        if reachable != self.state_reachable:
            self.state_reachable = reachable
            if reachable:
                logger.info("shared state store reachable again")
            else:
                logger.warning("shared state store unreachable (new requests get 503): %s", why)

    async def _renew_leases(self, shared: SharedLeases) -> None:
        """Every ``lease_ttl / 3`` or 2 s, whichever is sooner: extend this process's leases and
        queue heads, and re-read every backend (a safety net for a lost notification, and how the
        leases and heads of a dead process stop counting here)."""
        while True:
            try:
                # Leases still held on a backend removed here are renewed too: they run until
                # released, and other processes must go on counting them.
                leased = {held.backend for held in shared.held.values()}
                views = await shared.renew(self._standings(self._scheduler.backends.keys() | leased))
                self._apply_views(views)
                await self._read_key_leases(shared, self._capped_keys())  # keys of processes that died
                await self._publish_heads(shared, everything=True)
                await shared.heartbeat(len(shared.held), self._scheduler.waiting)
            except StateUnavailableError as exc:
                self._reachable(False, str(exc))
            else:
                self._reachable(True)
            # Renewal needs a third of the ttl; re-reading the fleet, at most 2 s: the leases of a
            # process that died expire without a release to announce them.
            await anyio.sleep(min(self.config.lease_ttl / 3, 2.0))

    def _apply_views(self, views: dict[str, FleetView]) -> None:
        for name, view in views.items():
            self._apply_fleet(name, view)

    def _held_for_others(self) -> list[str]:
        """Backends whose free slots this process last saw held for earlier waiters elsewhere."""
        return [
            name for name, view in self._views.items() if view.reserved and name in self._scheduler.backends
        ]

    async def _hear_releases(self, shared: SharedLeases) -> None:
        """Wake waiters here when a lease is released anywhere, or another process's queue
        changes (slots held for its waiters may be free now): the backends are read again at once."""
        while True:
            try:
                async for notice in shared.notices():
                    key = ""
                    if notice is None:  # a queue elsewhere: what it held may be ours now
                        names = (
                            list(self._scheduler.backends)
                            if self._scheduler.waiting
                            else self._held_for_others()
                        )
                    else:
                        name, key = notice
                        names = [name] if name in self._scheduler.backends else []
                    if names:
                        self._apply_views(await shared.view(self._standings(names)))
                    if key and key in self._capped_keys():
                        await self._read_key_leases(shared, [key])
            except StateUnavailableError as exc:
                self._reachable(False, str(exc))
                await anyio.sleep(1.0)  # then subscribe again; renewal re-reads meanwhile

    def _capped_keys(self) -> list[str]:
        """Client keys with a fleet-wide cap that other processes' leases may hold at it now."""
        return [
            name
            for name, tenant in self._scheduler.tenants.items()
            if tenant.max_concurrent is not None and (tenant.external or self._scheduler.has_parked(name))
        ]

    async def _read_key_leases(self, shared: SharedLeases, keys: list[str]) -> None:
        for key, others in (await shared.key_leases(keys)).items():
            self._scheduler.update_tenant(key, external=others)
        self._deliver()

    async def _publish_queue(self, shared: SharedLeases) -> None:
        """Put this process's queue heads in the fleet's queue as they change, coalesced."""
        wanted = self._heads_wanted
        assert wanted is not None
        while True:
            await wanted.wait()
            self._heads_wanted = wanted = anyio.Event()
            try:
                if await self._publish_heads(shared):
                    # A better head here may own slots this process saw held for others.
                    held = self._held_for_others()
                    if held:
                        self._apply_views(await shared.view(self._standings(held)))
            except StateUnavailableError as exc:
                self._reachable(False, str(exc))
                await anyio.sleep(1.0)
                wanted.set()

    async def _publish_heads(self, shared: SharedLeases | None, *, everything: bool = False) -> bool:
        """Send the heads that changed since last sent, telling the other processes; with
        ``everything``, the others too (renewing them). True when a head changed. Raises
        ``StateUnavailableError``."""
        if shared is None:
            return False
        heads, places = self._heads()
        published = self._published_heads
        changed: dict[str, Head | None] = {m: None for m in published if m not in places}
        changed.update((m, heads[m]) for m, place in places.items() if published.get(m) != place)
        sent = {**heads, **changed} if everything else changed
        if not sent:
            return False
        await shared.publish_heads(sent, tell=bool(changed))
        self._published_heads = places
        return bool(changed)

    async def _release_leases(self, shared: SharedLeases) -> None:
        wanted = self._fleet_release_wanted
        assert wanted is not None
        while True:
            await wanted.wait()
            self._fleet_release_wanted = wanted = anyio.Event()
            if not await self._send_fleet_releases(shared):
                await anyio.sleep(1.0)  # the store is away: the leases stay listed, tried again
                wanted.set()

    async def _send_fleet_releases(self, shared: SharedLeases | None) -> bool:
        """Send the releases made since the last time; True when all reached the store."""
        if shared is None:
            return True
        pending, self._fleet_releases = self._fleet_releases, []
        try:
            backends = {held.backend for lease_id in pending if (held := shared.held.get(lease_id))}
            released = await shared.release(pending, self._standings(backends))  # one round trip
        except StateUnavailableError as exc:
            self._reachable(False, str(exc))
            self._fleet_releases = pending + self._fleet_releases
            return False
        latest = dict(released)  # in order: the last view of each backend counts
        for backend, view in latest.items():
            self._apply_fleet(backend, view)  # the slots are free here now too
        return True
