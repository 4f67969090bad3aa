"""The async face of the scheduler: acquire a slot, hold it as a lease, release it once.

::

    async with Pool(config) as pool:
        async with pool.acquire("qwen2.5-7b", session="user-42") as lease:
            response = await client.post(f"{lease.url}/v1/chat/completions", json=...)

Waiting is cancellation-safe: every exit of a waiter (grant, timeout, cancellation, pool closing)
either hands the caller a lease or leaves no slot behind; a grant that raced with a cancellation is
released and passed on to the next waiter. A lease that is dropped without being released is
released when it is garbage-collected, with a warning in the log, so the slot is never lost.

The pool acts on what the scheduler reports after each call (``_deliver``): it wakes the waiters of
the tickets granted, failed or held. With shared state, a grant is claimed fleet-wide before it is
handed out (``fleet``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import anyio

from local_inference_pool.config import BackendConfig, PoolConfig
from local_inference_pool.core.fleet import Claimed, remember_affinity
from local_inference_pool.core.prompt_index import Prompt
from local_inference_pool.core.scheduler import (
    Grant,
    Health,
    LeaseRequest,
    Scheduler,
    Ticket,
    TicketState,
)
from local_inference_pool.errors import NoCapacityError, PoolClosedError
from local_inference_pool.pool.directory import BackendDirectory
from local_inference_pool.pool.drains import Draining, Drains
from local_inference_pool.pool.fleet import LocalFleet, RedisFleet
from local_inference_pool.pool.leases import Acquiring, Lease, Unleased
from local_inference_pool.pool.loop_binding import LoopBinding
from local_inference_pool.pool.placing import Placing
from local_inference_pool.pool.settings import apply_settings, scheduler_for

__all__ = ["Pool"]


_DEFAULT: Final[Any] = object()


class Pool(Draining):
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
        self._scheduler = scheduler_for(config, clock)
        self.backends = BackendDirectory()  # configuration, keys and status facts per backend
        self._waiters: dict[int, anyio.Event] = {}
        self._binding = LoopBinding()
        self._closed = False
        self._drained: anyio.Event | None = None
        self._drains = Drains()
        # The other processes of the fleet (``config.state``), or nobody; connected on ``async with``.
        self.fleet: LocalFleet | RedisFleet = (
            LocalFleet()
            if config.state is None
            else RedisFleet(config, self._scheduler, clock, self._deliver)
        )
        # What the placement driver changes (``[[models]]`` preload, idle_unload, load_after).
        self.placing = Placing(self._scheduler, clock, self._deliver)
        for backend in config.backends:
            self.add_backend(backend, health=initial_health)
        self._deliver()

    def reconfigure(self, config: PoolConfig) -> None:
        """A new configuration's settings and keys, from the next decision on (its backends are
        the caller's to add, change and remove: ``gateway.changes`` does it for the app)."""
        apply_settings(self._scheduler, self.config, config)
        self.config = config
        self._deliver()

    # --- backends --------------------------------------------------------------------------

    def add_backend(self, backend: BackendConfig, *, health: Health = Health.HEALTHY) -> None:
        """Add a server. Until its slot count is detected or configured it counts as one slot."""
        self.backends.add(backend)
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
        self.backends.remove(name)
        self.fleet.forget(name)
        self._drains.forget(name)
        self.placing.forget(name)
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
        probed_at: float | None = None,
    ) -> None:
        """Apply what a probe found; queued requests that can now run are granted at once.

        A configured slot count or model list wins over a detected one. ``server_busy`` is what the
        server says is running, ours included: the rest is outside work that takes our capacity.
        ``probed_at``: when the probe began (the pool's clock); its ``resident`` is dropped when the
        pool loaded or unloaded a model there since (``placing.set_resident``): it may predate the change.
        """
        if resident is not None and self.placing.stale(name, probed_at):
            resident = None
        if server_busy is not None:
            ours = self._scheduler.backends[name].active_total
            external_busy = self.fleet.outside_busy(name, max(0, server_busy - ours))
        given = {
            "resident": None if resident is None else list(resident),
            "health": health,
            "external_busy": external_busy,
            "trial": trial,
            "context": context,
        }
        changes = {key: value for key, value in given.items() if value is not None}
        self.override_backend(name, **changes, **self.backends.detected(name, slots=slots, models=models))

    def override_backend(self, name: str, **changes: Any) -> None:
        """Apply changes as given (an operator's word: a configured value does not win), and
        grant what they make possible. The keywords are the scheduler's ``update_backend``'s."""
        self._scheduler.update_backend(name, **changes)
        self._deliver()

    def annotate(self, name: str, **info: Any) -> None:
        """Facts for the snapshot that the scheduler does not use (detected kind, circuit, errors)."""
        self.backends.annotate(name, **info)

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
        a candidate until ``lease_for`` has claimed it fleet-wide."""
        return self.config.state is not None

    async def lease_for(self, ticket: Ticket, lease: Lease | None = None) -> Lease:
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
            if not self.fleet.shared:
                return lease
            try:
                outcome, session_backend = await self.fleet.claim(lease._grant, check_session=check_session)
            except BaseException:
                lease.release()  # also gives back a claim that may have reached the store
                raise
            ticket = lease._grant.ticket
            if outcome is Claimed.WON:
                return lease
            if outcome is Claimed.SESSION_ELSEWHERE and ticket.affinity_key and session_backend:
                remember_affinity(self._scheduler, ticket.affinity_key, session_backend)
                check_session = False  # placed again preferring it; wherever that lands, it stays
            lease.release()
            deadline = ticket.deadline
            ticket = self.submit(
                _queued_again(ticket, None if deadline is None else deadline - self._clock())
            )
            lease = self.granted(ticket)

    def submit(self, request: LeaseRequest) -> Ticket:
        """Queue a request without waiting: it may come back granted (``granted``), else ``wait`` for it.

        Raises when it can never be served now. A waiting ticket is always waited for: ``wait``
        withdraws it on any exit, so a ticket that is abandoned unwaited holds its place until its
        deadline. ``acquire`` does all of this; this is its first step.
        """
        self._binding.bind(idle=self._idle)
        if self._closed:
            raise PoolClosedError("the pool is closed")
        if not isinstance(request.model, str) or not request.model:
            raise ValueError(f"model must be a non-empty string, not {request.model!r}")
        try:
            ticket = self._scheduler.submit(request)
        finally:
            self._deliver()
        if ticket.state is TicketState.WAITING:
            self.fleet.queue_changed()
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
                self.fleet.queue_changed()

    def try_acquire(self, model: str) -> Lease | None:
        """A lease now if a backend has a free slot for ``model``, else None; never queues, never
        waits (the v0.7 layer's ``find_and_acquire``). Not with shared state: a fleet-wide claim
        takes a round trip."""
        self._binding.bind_if_running(idle=self._idle)
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
        return Unleased(found.name, found.url, self.backends.api_key(found.name))

    def models(self) -> list[str]:
        """Every model some backend lists, sorted."""
        return self._scheduler.models()

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
        if not self._scheduler.has_events:
            return
        events = self._scheduler.take_events()
        waiters = self._waiters
        for ticket in events.tickets():
            event = waiters.get(ticket.id)
            if event is not None:
                event.set()
        self.fleet.queue_changed()

    def release_threadsafe(self, lease: Lease) -> None:
        """Release a lease from any thread (a worker thread, a sync library's callback).

        ``lease.release()`` does the same; this name documents the intent at the call site.
        """
        lease.release()

    def _release(self, grant: Grant) -> None:
        # The scheduler is not thread-safe: the release runs on the pool's own loop.
        self._binding.call(lambda: self._release_on_loop(grant))

    def _release_on_loop(self, grant: Grant) -> None:
        if not grant.released:
            self.fleet.releasing(grant)
        released = self._scheduler.release(grant)
        self._deliver()
        if released and grant.backend.draining:
            self._drains.released(grant.backend)
        if released and self._drained is not None and not self._scheduler.grants:
            self._drained.set()

    def _release_later(self, grant: Grant) -> None:
        # From the garbage collector, which may run in the middle of a scheduler call on any thread:
        # never touch the scheduler here, hand the release to the loop.
        self._binding.call(lambda: self._release_on_loop(grant), always_hand_off=True)

    def bind_running_loop(self) -> None:
        """Bind to the running event loop, if any (synchronous callers may have none)."""
        self._binding.bind_if_running(idle=self._idle)

    def _idle(self) -> bool:
        return not self._scheduler.grants and not self._waiters

    # --- warm-up, state, shutdown ----------------------------------------------------------

    def serves(self, model: str) -> bool:
        """Whether any backend lists ``model`` now (healthy or not)."""
        return self._scheduler.serves(model)

    def snapshot(self) -> dict[str, Any]:
        """The whole state, JSON-ready: backends, slots, leases per model, queue by model."""
        state = self._scheduler.snapshot()
        for backend in state["backends"]:
            backend.update(self.backends.describe(backend["name"]))
            backend.update(self.fleet.backend_view(backend["name"]))
            if backend["admin_state"] == "drained" and backend.get("fleet_leases"):
                backend["admin_state"] = "draining"  # drained here, but other processes still run on it
        state["closed"] = self._closed
        state["shared_state"] = self.fleet.status()
        return state

    async def processes(self) -> list[dict[str, Any]] | None:
        """With shared state: every live process of the fleet and its leases (None: no shared
        state; a list with only an error when the store cannot be reached)."""
        return await self.fleet.processes()

    @property
    def state_reachable(self) -> bool:
        return self.fleet.reachable

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
        if self.fleet.shared:
            self._binding.bind(idle=self._idle)
        await self.fleet.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
        await self.fleet.stop()


def _queued_again(ticket: Ticket, left: float | None) -> LeaseRequest:
    """The request of a ticket whose claim lost, queued again in its place (its arrival and fair
    tag kept) with what is left of its deadline."""
    return LeaseRequest(
        ticket.model,
        priority=ticket.priority,
        session=ticket.affinity_key,
        timeout=None if left is None else max(0.0, left),
        pin=ticket.pin,
        tenant=ticket.tenant.name,
        prompt=ticket.prompt,
        arrival=ticket.arrival,
        tag=ticket.tag,
    )
