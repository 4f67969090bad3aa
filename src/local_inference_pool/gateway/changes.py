"""The one path for changes to a running fleet: the config file read again (SIGHUP, ``--watch``, the
admin API's reload), the admin API's own changes, and servers that register themselves.

The config file is the base. What the admin API changes (backends added, changed, removed or
drained) and what servers register are overlays on it (``gateway.overlay``): a reload replaces the
base and keeps the overlays, unless it is asked to reset them (``POST /pool/admin/reload?reset=true``).
Every change is validated whole, as the file is, before anything of it applies: an invalid one is
refused and the fleet serves on as it was.

With shared state (``[pool] state``) the overlays live in Redis (``pool.shared_overlay``): a change
is written there first (compare and set, so concurrent changes through two processes both hold),
and every process applies it as soon as it hears of it, within a second at worst; a process that
starts later starts with them. An admin reload asks every process to read its own file again.

Applying a configuration never drops a queued request nor cuts a running one: a backend that is
removed is drained first (``gateway.retirements``), a changed one is changed in place, and the
pool's settings hold from its next decision on. The few settings that cannot change while serving
are named in one warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from local_inference_pool.config import (
    BackendConfig,
    ConfigSource,
    PoolConfig,
    backend_from_dict,
    backend_with,
)
from local_inference_pool.errors import ConfigError, StateUnavailableError
from local_inference_pool.gateway.applying import annotate, apply_fleet
from local_inference_pool.gateway.overlay import PATCHABLE, Overlay, effective
from local_inference_pool.gateway.retirements import Retirements
from local_inference_pool.gateway.runtime import Runtime

if TYPE_CHECKING:
    from local_inference_pool.pool.shared_overlay import SharedOverlay

__all__ = ["PATCHABLE", "RESTART_KEYS", "ChangeRefused", "FleetChanges"]

logger = logging.getLogger(__name__)

# What a running gateway cannot take from a reload: the store it joined, the lease time the other
# processes renew by, the size of an index allocated as it fills, and what uvicorn was started with.
RESTART_KEYS = (
    "state",
    "lease_ttl",
    "prefix_index_blocks",
    "max_header_size",
    "max_headers",
    "header_timeout",
)
MAX_RUNTIME_BACKENDS = 1024  # added or registered at runtime, at most
MAX_TTL = 86_400.0
POLL = 0.5  # with shared state: how often the version of the overlays is read besides notices
EXPIRY_RETRY = 5.0  # seconds before trying again to end a registration the store did not take
COMMIT_TRIES = 16  # a change that loses this many races in a row is refused (409), never lost


class ChangeRefused(Exception):
    """A change that is not applied, with the HTTP status that says why (400, 404, 409, 503)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class FleetChanges:
    def __init__(
        self,
        runtime: Runtime,
        source: ConfigSource | None,
        install_routes: Callable[[PoolConfig], None],
        *,
        store: SharedOverlay | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``store``: the fleet's shared overlays (with ``[pool] state``), or None for one process."""
        self._runtime = runtime
        self._source = source
        self._install_routes = install_routes
        self._store = store
        self._wall = wall
        self._base = runtime.config
        self._overlay = Overlay()
        self._version = 0  # of the shared overlay this process applied
        self._retirements = Retirements(runtime)
        self._group: TaskGroup | None = None
        self._expiry_changed = anyio.Event()
        self._reloading = anyio.Lock()
        self._committing = anyio.Lock()
        for backend in runtime.config.backends:
            annotate(runtime, backend.name, self._overlay)

    @property
    def base(self) -> PoolConfig:
        """The configuration as the file (or the host) gave it, without the runtime overlays."""
        return self._base

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run drains and retirements, follow the fleet's shared overlays (from their current
        state: read before this is started) and end registrations that are not renewed; until
        cancelled."""
        async with anyio.create_task_group() as group:
            self._group = group
            self._retirements.run_in(group)
            try:
                if self._store is not None:
                    await self._join(self._store)
                    group.start_soon(self._follow, self._store)
                task_status.started()
                await self._expire_registrations()
            finally:
                self._group = None
                self._retirements.run_in(None)

    # --- the config file -------------------------------------------------------------------

    async def reload(
        self, *, reset: bool = False, who: str = "SIGHUP", fleet_wide: bool = False
    ) -> dict[str, Any]:
        """Read the config file again and apply it; ``reset`` drops the runtime overlays too (for
        the whole fleet, with shared state). ``fleet_wide`` (the admin API's reload) asks every
        process of the fleet to read its file too. Raises ``ChangeRefused`` (the old configuration
        keeps serving) when it is invalid."""
        source = self._source
        if source is None:
            raise ChangeRefused(
                409,
                "this pool was not started from a config file: there is nothing to reload "
                "(create_pool_app(config, source=ConfigSource.at(path)) names one)",
                "no_config_file",
            )
        async with self._reloading:
            try:
                new = await anyio.to_thread.run_sync(source.load)
                effective(new, Overlay() if reset else self._overlay)
            except ConfigError as exc:
                logger.error("reload of %s refused: %s; the running configuration keeps serving", source, exc)
                raise ChangeRefused(400, f"{source}: {exc}", "invalid_config") from None
            if reset or (fleet_wide and self._store is not None):
                await self.commit(lambda o: Overlay(reloads=o.reloads + 1) if reset else o.with_reload())
            return self._reload_with(new, reset, who)

    def _reload_with(self, new: PoolConfig, reset: bool, who: str) -> dict[str, Any]:
        try:
            wanted = effective(new, self._overlay)
        except ConfigError as exc:  # the overlay changed meanwhile, and does not fit the new file
            raise ChangeRefused(400, f"{self._source}: {exc}", "invalid_config") from None
        restart = [key for key in RESTART_KEYS if getattr(new, key) != getattr(self._base, key)]
        old_base, self._base = self._base, new
        summary = self._apply(wanted)
        logger.info(
            "%s: reloaded %s%s: %s",
            who,
            self._source,
            " (runtime changes reset)" if reset else "",
            _summary_line(summary, old_base != new),
        )
        if restart:
            logger.warning(
                "reload of %s: %s changed but take effect only after a restart",
                self._source,
                ", ".join(restart),
            )
        return {**summary, "restart_needed": restart, "reset": reset}

    # --- the admin API ---------------------------------------------------------------------

    async def add(self, entry: Any, *, ttl: Any = None, who: str) -> dict[str, Any]:
        """Add a backend (or, for a registration, renew it): ``entry`` has the keys of a
        ``[[backends]]`` entry; ``ttl`` seconds for a registration that must be renewed."""
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL
        ):
            raise ChangeRefused(
                400, f"ttl: expected seconds from 1 to {MAX_TTL:g}, or none", "invalid_backend"
            )
        backend: BackendConfig = self._checked(lambda: backend_from_dict(entry, "backend"))
        name = backend.name
        stored = {**(entry if isinstance(entry, Mapping) else {"url": entry}), "name": name}

        def change(overlay: Overlay) -> Overlay | None:
            if name in {b.name for b in self._base.backends} or backend.url in {
                b.url for b in self._base.backends
            }:
                raise ChangeRefused(
                    409,
                    f"the backend {name!r} ({backend.url}) is in the config file, or its URL is: "
                    "change it there, or with PATCH",
                    "backend_configured",
                )
            if name not in overlay.added and len(overlay.added) >= MAX_RUNTIME_BACKENDS:
                raise ChangeRefused(
                    409,
                    f"at most {MAX_RUNTIME_BACKENDS} backends may be added at runtime",
                    "too_many_backends",
                )
            expires = None if ttl is None else self._wall() + float(ttl)
            return self._validated(overlay.with_added(name, stored, expires))

        renewal = self._overlay.added.get(name) == stored
        await self.commit(change)
        self._expiry_changed.set()
        if not renewal:
            what = "registered" if ttl is not None else "added"
            logger.info("%s %s backend %s (%s)%s", who, what, name, backend.url, _ttl(ttl))
        return self.describe(name)

    async def patch(self, name: str, changes: Any, *, who: str) -> dict[str, Any]:
        """Change a backend's slots, weight, models, kind or key (and its other patchable keys)."""

        def change(overlay: Overlay) -> Overlay:
            current = self._wanted(name, overlay)
            self._checked(lambda: backend_with(current, changes, "backend", PATCHABLE))
            return self._validated(overlay.with_patch(name, dict(changes)))

        await self.commit(change)
        logger.info("%s changed backend %s: %s", who, name, ", ".join(sorted(changes)))
        return self.describe(name)

    async def drain(self, name: str, *, who: str) -> dict[str, Any]:
        await self.commit(lambda overlay: self._known(name, overlay).with_drained(name, True))
        logger.info("%s drains backend %s", who, name)
        return self.describe(name)

    async def undrain(self, name: str, *, who: str) -> dict[str, Any]:
        await self.commit(lambda overlay: self._known(name, overlay).with_drained(name, False))
        logger.info("%s returned backend %s to service", who, name)
        return self.describe(name)

    async def remove(self, name: str, *, who: str) -> dict[str, Any]:
        """Take a backend out: drained first; answers once it is gone from this process (at most
        ``drain_timeout`` and a short grace for the requests cut then). With shared state every
        other process drains and removes it the same way."""
        await self.commit(lambda overlay: self._known(name, overlay).without(name))
        logger.info("%s removes backend %s", who, name)
        await self._retirements.removed(name)  # a caller that leaves stops its wait, not the removal
        return {"name": name, "removed": name not in self._runtime.pool.backends}

    def backends(self) -> list[dict[str, Any]]:
        """Every backend with its state: what ``GET /pool/admin/backends`` answers."""
        return [_described(shown) for shown in self._runtime.pool.snapshot()["backends"]]

    def describe(self, name: str) -> dict[str, Any]:
        shown = next((b for b in self._runtime.pool.snapshot()["backends"] if b["name"] == name), None)
        return {"name": name, "admin_state": "removed"} if shown is None else _described(shown)

    # --- committing a change ---------------------------------------------------------------

    async def commit(self, change: Callable[[Overlay], Overlay | None]) -> None:
        """Make ``change`` of the overlay (None: nothing to change), validated, and apply it. With
        shared state it is written to the store first, against the version this process holds;
        when another process wrote meanwhile, its overlay is applied here and ``change`` made
        again on it. Raises ``ChangeRefused``."""
        store = self._store
        async with self._committing:
            if store is None:
                wanted = change(self._overlay)
                if wanted is not None:
                    self._adopt(wanted)
                return
            for _ in range(COMMIT_TRIES):
                wanted = change(self._overlay)
                if wanted is None:
                    return
                try:
                    written, version, doc = await store.write(self._version, wanted.to_json())
                except StateUnavailableError as exc:
                    raise ChangeRefused(503, str(exc), "state_unavailable") from None
                except ValueError as exc:
                    raise ChangeRefused(409, str(exc), "too_many_changes") from None
                if written:
                    if version > self._version:  # else a newer one, ours in it, is applied already
                        self._version = version
                        self._adopt(wanted)
                    return
                self._take_shared(version, doc)
        raise ChangeRefused(
            409, "the fleet was changed concurrently too often to apply this change; try again", "conflict"
        )

    def _validated(self, overlay: Overlay) -> Overlay:
        self.configuration(overlay)
        return overlay

    def configuration(self, overlay: Overlay, code: str = "invalid_backend") -> PoolConfig:
        """The configuration ``overlay`` makes of the base, validated whole (else ``ChangeRefused``)."""
        config: PoolConfig = self._checked(lambda: effective(self._base, overlay), code)
        return config

    @property
    def overlay(self) -> Overlay:
        """The runtime changes applied here now."""
        return self._overlay

    def _wanted(self, name: str, overlay: Overlay) -> BackendConfig:
        """The backend's configuration as wanted now; 404 when there is no such backend."""
        for backend in effective(self._base, overlay).backends:
            if backend.name == name:
                return backend
        raise ChangeRefused(404, f"no backend named {name[:128]!r}", "backend_not_found")

    def _known(self, name: str, overlay: Overlay) -> Overlay:
        """``overlay``, once the backend is known to be in it; 404 when not."""
        self._wanted(name, overlay)
        return overlay

    def _checked(self, make: Callable[[], Any], code: str = "invalid_backend") -> Any:
        try:
            return make()
        except (ConfigError, TypeError, ValueError) as exc:
            raise ChangeRefused(400, str(exc), code) from None

    # --- the fleet's shared overlays -------------------------------------------------------

    async def catch_up(self) -> None:
        """Apply the fleet's shared overlays as the store has them now: what following them does
        by itself within ``POLL`` seconds, for a caller that must know it is done (the admin API's
        reads, tests). Raises ``ChangeRefused`` (503) when the store cannot be reached."""
        if self._store is None:
            return
        try:
            self._take_shared(*await self._store.read())
        except StateUnavailableError as exc:
            raise ChangeRefused(503, str(exc), "state_unavailable") from None

    async def _join(self, store: SharedOverlay) -> None:
        """Start with the fleet's current overlays; without the store, with none (logged)."""
        try:
            with anyio.fail_after(5):
                version, doc = await store.read()
        except (StateUnavailableError, TimeoutError) as exc:
            logger.warning("the fleet's runtime changes cannot be read now (%s); following them later", exc)
            return
        self._take_shared(version, doc)

    async def _follow(self, store: SharedOverlay) -> None:
        """Apply every version of the shared overlays another process writes; write ours back to
        a store that lost it (restarted without persistence)."""
        reachable = True
        while True:
            try:
                async for version in store.versions(POLL):
                    if version > self._version:
                        self._take_shared(*await store.read())
                    elif version < self._version:
                        await self._restore(store)
                    if not reachable:
                        logger.warning("the fleet's runtime changes are followed again")
                        reachable = True
            except StateUnavailableError as exc:
                if reachable:
                    logger.warning("the fleet's runtime changes cannot be followed now: %s", exc)
                    reachable = False
            await anyio.sleep(POLL)  # a pause before connecting again, not a synchronisation

    async def _restore(self, store: SharedOverlay) -> None:
        async with self._committing:
            written, version, doc = await store.write(0, self._overlay.to_json())
            if written:
                logger.warning("the store had lost the fleet's runtime changes: written back")
                self._version = version
            else:
                self._take_shared(version, doc)

    def _take_shared(self, version: int, doc: str | None) -> None:
        """Apply the shared overlay at ``version`` (one this process did not write)."""
        if version <= self._version:
            return
        self._version = version
        try:
            overlay = Overlay() if doc is None else Overlay.from_json(doc)
            wanted = effective(self._base, overlay)
        except (ConfigError, TypeError, ValueError) as exc:
            logger.error(
                "the fleet's runtime changes (version %d) do not apply here: %s; serving as before",
                version,
                exc,
            )
            return
        previous, self._overlay = self._overlay, overlay
        summary = self._apply(wanted)
        self._expiry_changed.set()
        for name in sorted(overlay.drained ^ previous.drained):
            summary.setdefault("drained" if name in overlay.drained else "undrained", []).append(name)
        # A renewed registration writes a version that changes nothing here: not worth a line.
        logger.log(
            logging.INFO if any(summary.values()) else logging.DEBUG,
            "applied the fleet's runtime changes (version %d): %s",
            version,
            _summary_line(summary, False),
        )
        reload_asked = overlay.reloads > previous.reloads
        if reload_asked and self._group is not None and self._source is not None:
            self._group.start_soon(self._reload_asked)

    async def _reload_asked(self) -> None:
        # A refused reload is logged by ``reload``; this process serves on as it was.
        with contextlib.suppress(ChangeRefused):
            await self.reload(who="a reload asked through another process")

    # --- applying --------------------------------------------------------------------------

    def _adopt(self, overlay: Overlay) -> None:
        self._overlay = overlay
        self._apply(effective(self._base, overlay))

    def _apply(self, wanted: PoolConfig) -> dict[str, list[str]]:
        """Make the running fleet what ``wanted`` says. Synchronous: no request sees half of it."""
        summary = apply_fleet(self._runtime, self._retirements, wanted, self._overlay)
        self._install_routes(wanted)
        return summary

    # --- registrations ---------------------------------------------------------------------

    async def _expire_registrations(self) -> None:
        """End the registrations that were not renewed in time (any process of the fleet may: the
        first one's change holds, the others find nothing left to do)."""
        while True:
            pause = 0.0
            now = self._wall()
            for name in [n for n, until in self._overlay.expires.items() if until <= now]:

                def change(overlay: Overlay, name: str = name) -> Overlay | None:
                    expired = overlay.expires.get(name, math.inf) <= self._wall()
                    return overlay.without(name) if expired else None

                try:
                    await self.commit(change)
                except ChangeRefused as refused:  # the store is away: tried again a little later
                    logger.warning("registration of backend %s could not be ended: %s", name, refused)
                    pause = EXPIRY_RETRY
                    continue
                if name not in self._overlay.added:
                    logger.warning(
                        "registration of backend %s was not renewed: draining and removing it", name
                    )
            soonest = min(self._overlay.expires.values(), default=math.inf)
            with anyio.move_on_after(max(pause, soonest - self._wall())):
                await self._expiry_changed.wait()
            self._expiry_changed = anyio.Event()


_DESCRIBED = (
    "name",
    "url",
    "kind",
    "admin_state",
    "health",
    "source",
    "registered_until",
    "slots",
    "busy",
    "weight",
    "models",
    "max_loaded_models",
)


def _described(shown: Mapping[str, Any]) -> dict[str, Any]:
    """A backend as the admin API shows it: its status, never its key."""
    return {key: shown.get(key) for key in _DESCRIBED}


def _summary_line(summary: Mapping[str, list[str]], settings_changed: bool) -> str:
    parts = [f"{what} {', '.join(names)}" for what, names in summary.items() if names]
    if settings_changed and not parts:
        parts.append("settings changed")
    return "; ".join(parts) or "nothing changed"


def _ttl(ttl: Any) -> str:
    return "" if ttl is None else f" for {ttl:g}s (renewable)"
