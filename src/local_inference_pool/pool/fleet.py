"""The fleet a pool coordinates with: nobody (one process), or the other processes through Redis.

A pool grants slots from its own scheduler. With ``[pool] state``, a grant is only a candidate
until it is claimed in the shared store, where every process's leases are counted; a claim that
loses hands the grant back and the request queues again in its place (``Pool.lease_for``). Both kinds
of fleet answer the same small interface, so the pool has one path for both:

- ``claim(grant, check_session)``: whether the grant holds fleet-wide;
- ``releasing(grant)``: a lease is about to be released here (the store is told off the request's
  path, in batches);
- ``queue_changed()``: this process's queue heads changed (the fleet orders queues across
  processes);
- ``outside_busy(name, server_busy)``: a probe says how busy a server is; how much of that is work
  from outside the pool;
- ``forget(name)``: a backend left the pool;
- ``remember``/``recall``: a fact shared for a while (which backend stores a response id);
- views for the status page.

``RedisFleet`` runs four loops while the pool is open: renewing this process's leases (and
re-reading every backend), hearing releases and queue changes elsewhere, sending this process's
releases, and publishing its queue heads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio

from local_inference_pool.config import PoolConfig, shown_state
from local_inference_pool.core.fleet import Claimed, FleetView, Head, Standing, granted_elsewhere
from local_inference_pool.core.scheduler import Grant, Scheduler
from local_inference_pool.errors import StateUnavailableError

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from local_inference_pool.pool.redis_state import SharedLeases

__all__ = ["LocalFleet", "RedisFleet"]

logger = logging.getLogger(__name__)


class LocalFleet:
    """One process: every grant holds, and there is nobody to tell anything."""

    shared = False
    reachable = True

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def claim(self, grant: Grant, *, check_session: bool) -> tuple[Claimed, str | None]:
        return Claimed.WON, None

    def releasing(self, grant: Grant) -> None:
        """Nobody to tell."""

    def queue_changed(self) -> None:
        """Nobody to tell."""

    def outside_busy(self, name: str, server_busy: int) -> int:
        """What the server reports busy beyond this process's leases is all outside work."""
        return server_busy

    def forget(self, name: str) -> None:
        """Nothing kept per backend."""

    async def remember(self, key: str, value: str, ttl: float) -> None:
        """Nobody to share it with."""

    async def recall(self, key: str) -> str | None:
        return None

    async def processes(self) -> list[dict[str, Any]] | None:
        return None

    def backend_view(self, name: str) -> dict[str, Any]:
        return {}

    def status(self) -> dict[str, Any] | None:
        return None


class RedisFleet:
    """The processes that share ``config.state``: leases, queue heads and sessions in Redis."""

    shared = True

    def __init__(
        self,
        config: PoolConfig,
        scheduler: Scheduler,
        clock: Callable[[], float],
        deliver: Callable[[], None],
    ) -> None:
        """``deliver``: the pool's hand-off of the scheduler's events, run after every scheduler
        call made here."""
        assert config.state is not None
        self.config = config
        self.scheduler = scheduler
        self.clock = clock
        self.deliver = deliver
        self.reachable = True
        self._shared: SharedLeases | None = None
        self._tasks: AsyncExitStack | None = None
        self._releases: list[str] = []  # lease ids released here, not yet sent to the store
        self._release_wanted = anyio.Event()
        self._external: dict[str, int] = {}  # backend -> leases the other processes hold there
        self._probe_busy: dict[str, int] = {}  # backend -> busy beyond this process's leases, probed
        self._views: dict[str, FleetView] = {}  # the last each backend's fleet was seen
        self._heads_wanted = anyio.Event()  # set when this process's queue heads changed
        self._published_heads: dict[str, tuple[int, float]] = {}  # model -> (priority, arrival)
        self._claims: dict[str, int] = dict.fromkeys((c.name.lower() for c in Claimed), 0)

    async def start(self) -> None:
        """Connect to the store and start the loops that keep this process's part of the fleet."""
        if self._tasks is not None:
            return
        from local_inference_pool.pool.redis_state import SharedLeases

        assert self.config.state is not None
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
        self._shared, self._tasks = shared, stack
        await group.start(self._keep_shared, shared)

    async def stop(self) -> None:
        """Send the last releases and queue heads while the store is there, then close."""
        stack, self._tasks = self._tasks, None
        if stack is None:
            return
        shared = self._shared
        with anyio.move_on_after(2, shield=True):
            await self._send_fleet_releases(shared)
            await self._publish_heads(shared)  # nothing waits here any more
        self._shared = None
        await stack.aclose()

    async def claim(self, grant: Grant, *, check_session: bool) -> tuple[Claimed, str | None]:
        """Claim a grant's slot in the store: how it ended, and the backend that last served the
        request's session when that is why it lost. Raises ``StateUnavailableError``."""
        shared = self._shared
        if shared is None:
            raise StateUnavailableError(
                "this pool shares its state: use it as 'async with Pool(config) as pool' "
                "(the app's lifespan does), so that it connects and renews its leases"
            )
        ticket = grant.ticket
        tenant = ticket.tenant
        name = grant.backend.name
        outcome, session_backend, key_others, view = await shared.claim(
            shared.lease_id(grant.id),
            name,
            grant.model,
            self._standing(name),
            priority=ticket.priority,
            waited=self.clock() - ticket.arrival,
            queued=ticket.pin is None,  # a pinned retry already waited its turn
            session=ticket.affinity_key,
            check_session=check_session,
            key=tenant.name,
            key_cap=tenant.max_concurrent,
        )
        # On a loss to earlier waiters elsewhere, the view holds the free slots for them, so the
        # request is not granted here again until the fleet changes.
        self._claims[outcome.name.lower()] += 1
        if tenant.max_concurrent is not None:
            # Taken as the key's outside leases before this lease goes back: a key at its cap
            # across the fleet parks its requests here until one of its leases ends somewhere.
            self.scheduler.update_tenant(tenant.name, external=key_others)
            self.deliver()
        self._apply_fleet(name, view)
        return outcome, session_backend

    def releasing(self, grant: Grant) -> None:
        """A lease is about to be released here: the store is told in the next batch. The slot stays
        taken here until the store has the release: granted again sooner, its next claim would only
        lose to this very lease."""
        shared = self._shared
        if shared is None:
            return
        lease_id = shared.lease_id(grant.id)
        backend = shared.releasing(lease_id)
        if backend is not None:
            self._releases.append(lease_id)
            self._release_wanted.set()
            view = self._views.get(backend)
            if view is not None:
                self._apply_fleet(backend, view)

    def outside_busy(self, name: str, server_busy: int) -> int:
        """A probe says ``server_busy`` slots beyond this process's leases are busy: the outside
        load the scheduler counts, at least what the other pool processes hold there."""
        self._probe_busy[name] = server_busy
        return max(server_busy, self._external.get(name, 0))

    def forget(self, name: str) -> None:
        for per_backend in (self._probe_busy, self._external, self._views):
            per_backend.pop(name, None)

    async def remember(self, key: str, value: str, ttl: float) -> None:
        """Share a fact for ``ttl`` seconds; when the store is away it is not shared (logged)."""
        if self._shared is None:
            return
        try:
            await self._shared.remember(key, value, ttl)
        except StateUnavailableError as exc:
            self._reachable(False, str(exc))

    async def recall(self, key: str) -> str | None:
        return None if self._shared is None else await self._shared.recall(key)

    async def processes(self) -> list[dict[str, Any]] | None:
        """Every live process of the fleet and its leases (a list with only an error when the
        store cannot be reached)."""
        if self._shared is None:
            return None
        try:
            return await self._shared.processes()
        except StateUnavailableError as exc:
            return [{"error": str(exc)}]

    def backend_view(self, name: str) -> dict[str, Any]:
        view = self._views.get(name)
        return {
            "fleet_leases": self._external.get(name, 0),
            "fleet_reserved": 0 if view is None else view.reserved,
        }

    def status(self) -> dict[str, Any] | None:
        shared = self._shared
        assert self.config.state is not None
        return {
            "store": shown_state(self.config.state),
            "reachable": self.reachable and shared is not None,
            "process": None if shared is None else shared.process,
            "leases_held": 0 if shared is None else len(shared.held),
            "claims": dict(self._claims),
            "lease_ttl": self.config.lease_ttl,
        }

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
        return max(0, self._probe_busy.get(name, 0) - self._external.get(name, 0))

    def _apply_fleet(self, name: str, view: FleetView) -> None:
        """What the other processes hold on a backend, as the scheduler's outside load and the
        models its drain guard must respect; this process's releases still on their way count too."""
        shared = self._shared
        if shared is None or name not in self.scheduler.backends:
            return
        self._views[name] = view
        self._external[name] = view.leases  # the others' (the store tells ours from theirs)
        self.scheduler.update_backend(
            name,
            external_busy=max(view.leases, self._probe_busy.get(name, 0))
            + shared.releasing_on(name)
            + view.reserved,
            foreign_models=[m for m, n in view.models.items() if n > 0],
        )
        if view.newest_age is not None:
            granted_elsewhere(self.scheduler, self.clock() - view.newest_age)
        self.deliver()

    def _standing(self, name: str) -> Standing:
        """A backend as this process sees it, and its best waiter here (priority, then the longest
        wait): what the fleet's scripts need to tell which free slots are held for earlier waiters."""
        backend = self.scheduler.backends.get(name)
        if backend is None:  # removed here, still leased
            return Standing(capacity=1, max_models=1, models=())
        models = tuple(sorted(backend.models or ()))
        best: tuple[int, float] | None = None
        now = self.clock()
        for model in self.scheduler.waiting_models():
            head = self.scheduler.head(model) if model in models else None
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
        return {name: self._standing(name) for name in (self.scheduler.backends if names is None else names)}

    def queue_changed(self) -> None:
        self._heads_wanted.set()

    def _heads(self) -> tuple[dict[str, Head], dict[str, tuple[int, float]]]:
        """This process's head of each model queue, and what identifies each: (priority, arrival)."""
        now = self.clock()
        heads: dict[str, Head] = {}
        places: dict[str, tuple[int, float]] = {}
        for model in self.scheduler.waiting_models():
            head = self.scheduler.head(model)
            if head is not None:
                heads[model] = Head(head.priority, now - head.arrival, self.scheduler.waiting_for(model))
                places[model] = (head.priority, head.arrival)
        return heads, places

    def _reachable(self, reachable: bool, why: str = "") -> None:
        if reachable != self.reachable:
            self.reachable = reachable
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
                views = await shared.renew(self._standings(self.scheduler.backends.keys() | leased))
                self._apply_views(views)
                await self._read_key_leases(shared, self._capped_keys())  # keys of processes that died
                await self._publish_heads(shared, everything=True)
                await shared.heartbeat(len(shared.held), self.scheduler.waiting)
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
            name for name, view in self._views.items() if view.reserved and name in self.scheduler.backends
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
                            list(self.scheduler.backends)
                            if self.scheduler.waiting
                            else self._held_for_others()
                        )
                    else:
                        name, key = notice
                        names = [name] if name in self.scheduler.backends else []
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
            for name, tenant in self.scheduler.tenants.items()
            if tenant.max_concurrent is not None and (tenant.external or self.scheduler.has_parked(name))
        ]

    async def _read_key_leases(self, shared: SharedLeases, keys: list[str]) -> None:
        for key, others in (await shared.key_leases(keys)).items():
            self.scheduler.update_tenant(key, external=others)
        self.deliver()

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
        wanted = self._release_wanted
        assert wanted is not None
        while True:
            await wanted.wait()
            self._release_wanted = wanted = anyio.Event()
            if not await self._send_fleet_releases(shared):
                await anyio.sleep(1.0)  # the store is away: the leases stay listed, tried again
                wanted.set()

    async def _send_fleet_releases(self, shared: SharedLeases | None) -> bool:
        """Send the releases made since the last time; True when all reached the store."""
        if shared is None:
            return True
        pending, self._releases = self._releases, []
        try:
            backends = {held.backend for lease_id in pending if (held := shared.held.get(lease_id))}
            released = await shared.release(pending, self._standings(backends))  # one round trip
        except StateUnavailableError as exc:
            self._reachable(False, str(exc))
            self._releases = pending + self._releases
            return False
        latest = dict(released)  # in order: the last view of each backend counts
        for backend, view in latest.items():
            self._apply_fleet(backend, view)  # the slots are free here now too
        return True
