"""The one path for changes to a running fleet: the config file read again (SIGHUP, ``--watch``, the
admin API's reload), the admin API's own changes, and servers that register themselves.

The config file is the base. What the admin API changes (backends added, changed, removed or
drained) and what servers register are overlays on it: a reload replaces the base and keeps the
overlays, unless it is asked to reset them (``POST /pool/admin/reload?reset=true``). Every change
is validated whole, as the file is, before anything of it applies: an invalid one is refused and
the fleet serves on as it was.

Applying a configuration never drops a queued request nor cuts a running one: a backend that is
removed is drained first (no new lease; its running requests finish, within ``drain_timeout``, after
which they are cut and their streams continued elsewhere), a changed one is changed in place, and
the pool's settings hold from its next decision on. The few settings that cannot change while
serving are named in one warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from local_inference_pool.config import (
    BackendConfig,
    ConfigSource,
    PoolConfig,
    backend_from_dict,
    backend_with,
)
from local_inference_pool.core.scheduler import Health
from local_inference_pool.errors import ConfigError
from local_inference_pool.gateway.runtime import Runtime

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
PATCHABLE = ("slots", "weight", "models", "kind", "api_key", "max_loaded_models", "cache_tokens")
MAX_RUNTIME_BACKENDS = 1024  # added or registered at runtime, at most
MAX_TTL = 86_400.0
CUT_GRACE = 5.0  # after a drain's end, how long the leases it cut get to be released


class ChangeRefused(Exception):
    """A change that is not applied, with the HTTP status that says why (400, 404, 409)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Overlay:
    """The runtime changes on top of the config file."""

    added: dict[str, BackendConfig] = field(default_factory=dict)  # through the admin API
    expires: dict[str, float] = field(default_factory=dict)  # registrations: name -> monotonic end
    patched: dict[str, dict[str, Any]] = field(default_factory=dict)  # config backends' changes
    removed: set[str] = field(default_factory=set)  # config backends removed through the admin API
    drained: set[str] = field(default_factory=set)


@dataclass
class _Retiring:
    scope: anyio.CancelScope
    done: anyio.Event = field(default_factory=anyio.Event)


class FleetChanges:
    def __init__(
        self,
        runtime: Runtime,
        source: ConfigSource | None,
        install_routes: Callable[[PoolConfig], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._runtime = runtime
        self._source = source
        self._install_routes = install_routes
        self._clock = clock
        self._wall = wall
        self._base = runtime.config
        self._overlay = Overlay()
        self._retiring: dict[str, _Retiring] = {}
        self._drain_ends: dict[str, anyio.CancelScope] = {}
        self._group: TaskGroup | None = None
        self._expiry_changed = anyio.Event()
        self._reloading = anyio.Lock()
        for backend in runtime.config.backends:
            self._annotate(backend.name)

    @property
    def base(self) -> PoolConfig:
        """The configuration as the file (or the host) gave it, without the runtime overlays."""
        return self._base

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run drains and retirements, and end registrations that are not renewed; until cancelled."""
        async with anyio.create_task_group() as group:
            self._group = group
            task_status.started()
            await self._expire_registrations()

    # --- the config file -------------------------------------------------------------------

    async def reload(self, *, reset: bool = False, who: str = "SIGHUP") -> dict[str, Any]:
        """Read the config file again and apply it; ``reset`` drops the runtime overlays too.
        Raises ``ChangeRefused`` (the old configuration keeps serving) when it is invalid."""
        if self._source is None:
            raise ChangeRefused(
                409,
                "this pool was not started from a config file: there is nothing to reload "
                "(create_pool_app(config, source=ConfigSource.at(path)) names one)",
                "no_config_file",
            )
        async with self._reloading:
            try:
                new = await anyio.to_thread.run_sync(self._source.load)
                overlay = Overlay() if reset else self._overlay
                effective = self._effective(new, overlay)
            except ConfigError as exc:
                logger.error(
                    "reload of %s refused: %s; the running configuration keeps serving", self._source, exc
                )
                raise ChangeRefused(400, f"{self._source}: {exc}", "invalid_config") from None
            restart = [key for key in RESTART_KEYS if getattr(new, key) != getattr(self._base, key)]
            old_base, self._base = self._base, new
            if reset:
                self._overlay = overlay
                for scope in self._drain_ends.values():
                    scope.cancel()
                self._expiry_changed.set()
            summary = self._apply(effective)
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

    def add(self, entry: Any, *, ttl: Any = None, who: str) -> dict[str, Any]:
        """Add a backend (or, for a registration, renew it): ``entry`` has the keys of a
        ``[[backends]]`` entry; ``ttl`` seconds for a registration that must be renewed."""
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL
        ):
            raise ChangeRefused(
                400, f"ttl: expected seconds from 1 to {MAX_TTL:g}, or none", "invalid_backend"
            )
        backend = self._checked(lambda: backend_from_dict(entry, "backend"))
        name, overlay = backend.name, self._overlay
        configured = {b.name: b for b in self._base.backends}
        if name in configured or backend.url in {b.url for b in self._base.backends}:
            raise ChangeRefused(
                409,
                f"the backend {name!r} ({backend.url}) is in the config file, or its URL is: "
                "change it there, or with PATCH",
                "backend_configured",
            )
        renewal = overlay.added.get(name)
        if renewal is None and len(overlay.added) >= MAX_RUNTIME_BACKENDS:
            raise ChangeRefused(
                409, f"at most {MAX_RUNTIME_BACKENDS} backends may be added at runtime", "too_many_backends"
            )
        added = {**overlay.added, name: backend}
        effective = self._checked(
            lambda: self._effective(self._base, dataclasses.replace(overlay, added=added))
        )
        overlay.added[name] = backend
        if ttl is None:
            overlay.expires.pop(name, None)
        else:
            overlay.expires[name] = self._clock() + float(ttl)
            self._expiry_changed.set()
        self._apply(effective)
        if renewal is None or renewal != backend:
            what = "registered" if ttl is not None else "added"
            logger.info("%s %s backend %s (%s)%s", who, what, name, backend.url, _ttl(ttl))
        return self.describe(name)

    def patch(self, name: str, changes: Any, *, who: str) -> dict[str, Any]:
        """Change a backend's slots, weight, models, kind or key (and its other patchable keys)."""
        overlay = self._overlay
        current = self._wanted(name)
        backend = self._checked(lambda: backend_with(current, changes, "backend", PATCHABLE))
        patched = dict(overlay.patched)
        added = dict(overlay.added)
        if name in added:
            added[name] = backend
        else:
            patched[name] = {**patched.get(name, {}), **dict(changes)}
        trial = dataclasses.replace(overlay, added=added, patched=patched)
        effective = self._checked(lambda: self._effective(self._base, trial))
        overlay.added, overlay.patched = added, patched
        self._apply(effective)
        logger.info("%s changed backend %s: %s", who, name, ", ".join(sorted(changes)))
        return self.describe(name)

    def drain(self, name: str, *, who: str) -> dict[str, Any]:
        self._wanted(name)
        self._overlay.drained.add(name)
        self._apply(self._effective(self._base, self._overlay))
        logger.info("%s drains backend %s", who, name)
        return self.describe(name)

    def undrain(self, name: str, *, who: str) -> dict[str, Any]:
        self._wanted(name)
        self._overlay.drained.discard(name)
        self._apply(self._effective(self._base, self._overlay))
        logger.info("%s returned backend %s to service", who, name)
        return self.describe(name)

    async def remove(self, name: str, *, who: str) -> dict[str, Any]:
        """Take a backend out: drained first; answers once it is gone (at most ``drain_timeout``
        and a short grace for the requests cut then)."""
        self._wanted(name)
        self._unlist(name)
        retiring = self._retiring.get(name)
        logger.info("%s removes backend %s", who, name)
        if retiring is not None:  # a caller that leaves stops only its wait: the removal goes on
            await retiring.done.wait()
        return {"name": name, "removed": name not in self._runtime.pool.backends}

    def backends(self) -> list[dict[str, Any]]:
        """Every backend with its state: what ``GET /pool/admin/backends`` answers."""
        return [self.describe(b["name"]) for b in self._runtime.pool.snapshot()["backends"]]

    def describe(self, name: str) -> dict[str, Any]:
        shown = next((b for b in self._runtime.pool.snapshot()["backends"] if b["name"] == name), None)
        if shown is None:
            return {"name": name, "admin_state": "removed"}
        keys = (
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
        return {key: shown.get(key) for key in keys}

    # --- applying --------------------------------------------------------------------------

    def _wanted(self, name: str) -> BackendConfig:
        """The backend's configuration as wanted now; 404 when there is no such backend."""
        for backend in self._effective(self._base, self._overlay).backends:
            if backend.name == name:
                return backend
        raise ChangeRefused(404, f"no backend named {name[:128]!r}", "backend_not_found")

    def _unlist(self, name: str) -> None:
        overlay = self._overlay
        if overlay.added.pop(name, None) is None:
            overlay.removed.add(name)
        overlay.expires.pop(name, None)
        overlay.patched.pop(name, None)
        overlay.drained.discard(name)
        self._apply(self._effective(self._base, overlay))

    def _checked(self, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except (ConfigError, TypeError, ValueError) as exc:
            raise ChangeRefused(400, str(exc), "invalid_backend") from None

    def _effective(self, base: PoolConfig, overlay: Overlay) -> PoolConfig:
        """The configuration to serve: the base with the overlays, validated whole."""
        backends: list[BackendConfig] = []
        for backend in base.backends:
            if backend.name in overlay.removed:
                continue
            changes = overlay.patched.get(backend.name)
            if changes:
                backend = backend_with(backend, changes, f"backends[{backend.name!r}]", PATCHABLE)
            backends.append(backend)
        configured = {b.name for b in base.backends}
        for name, backend in overlay.added.items():
            if name in configured:
                continue  # a reload named it in the file: the file wins
            backends.append(backend)
        return dataclasses.replace(base, backends=tuple(backends))

    def _apply(self, effective: PoolConfig) -> dict[str, list[str]]:
        """Make the running fleet what ``effective`` says. Synchronous: no request sees half of it."""
        runtime, pool = self._runtime, self._runtime.pool
        pool.reconfigure(effective)
        runtime.reconfigure(effective)
        self._install_routes(effective)
        current = {backend.name: backend for backend in pool.backends.configs()}
        summary: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        for name, backend in {b.name: b for b in effective.backends}.items():
            old = current.pop(name, None)
            retiring = self._retiring.pop(name, None)
            if retiring is not None:  # wanted again while it drained: it stays
                retiring.scope.cancel()
                retiring.done.set()
            if old is None:
                pool.add_backend(backend, health=Health.LOADING)
                runtime.monitor.watch(backend)
                summary["added"].append(name)
            elif backend != old:
                self._change(old, backend)
                summary["changed"].append(name)
            self._set_draining(name, name in self._overlay.drained)
            self._annotate(name)
        for name in current:
            if name not in self._retiring:
                self._retire(name)
                summary["removed"].append(name)
        return summary

    def _change(self, old: BackendConfig, new: BackendConfig) -> None:
        runtime, pool, name = self._runtime, self._runtime.pool, new.name
        pool.backends.add(new)  # its key and what detection may still set
        changes: dict[str, Any] = {
            "weight": new.weight,
            "max_loaded_models": new.max_loaded_models,
            "cache_tokens": new.cache_tokens,
        }
        if new.slots is not None:
            changes["slots"] = new.slots
        if new.models is not None:
            changes["models"] = new.models
        if new.url != old.url:
            changes.update(url=new.url, health=Health.LOADING)  # another server: probed anew
        pool.override_backend(name, **changes)
        if (new.url, new.kind, new.api_key, new.slots, new.models) != (
            old.url,
            old.kind,
            old.api_key,
            old.slots,
            old.models,
        ):
            runtime.monitor.watch(new)  # what detection finds depends on these: probe again now

    def _annotate(self, name: str) -> None:
        overlay = self._overlay
        until = overlay.expires.get(name)
        source = "config" if name not in overlay.added else "registered" if until is not None else "admin"
        self._runtime.pool.annotate(
            name,
            source=source,
            registered_until=None if until is None else _iso(self._wall() + until - self._clock()),
            changed_at_runtime=sorted(overlay.patched.get(name, {})),
        )

    # --- drains ----------------------------------------------------------------------------

    def _set_draining(self, name: str, draining: bool) -> None:
        pool = self._runtime.pool
        if draining == pool.scheduler.backends[name].draining:
            return
        if not draining:
            scope = self._drain_ends.pop(name, None)
            if scope is not None:
                scope.cancel()
            pool.undrain(name)
            return
        pool.drain(name)
        if self._group is not None:
            scope = self._drain_ends[name] = anyio.CancelScope()
            self._group.start_soon(self._end_drain, name, scope)

    async def _end_drain(self, name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await self._bounded_drain(name)
        if self._drain_ends.get(name) is scope:
            del self._drain_ends[name]

    async def _bounded_drain(self, name: str) -> None:
        """Wait for the backend to be drained, at most ``drain_timeout``; then cut what still runs."""
        pool = self._runtime.pool
        timeout = self._runtime.config.drain_timeout
        if await pool.wait_drained(name, timeout):
            logger.info("backend %s is drained", name)
            return
        cut = pool.cut(name)
        logger.warning(
            "backend %s: drain_timeout (%gs) passed; cut %d running request(s), continued elsewhere "
            "where they can be",
            name,
            timeout,
            cut,
        )
        await pool.wait_drained(name, CUT_GRACE)

    def _retire(self, name: str) -> None:
        """Drain the backend, then take it out of the pool (in the background)."""
        pool = self._runtime.pool
        if name in pool.scheduler.backends:
            pool.drain(name)
        scope = self._drain_ends.pop(name, None)
        if scope is not None:
            scope.cancel()
        retiring = self._retiring[name] = _Retiring(anyio.CancelScope())
        if self._group is None:
            self._remove_now(name, retiring)
        else:
            self._group.start_soon(self._retirement, name, retiring)

    async def _retirement(self, name: str, retiring: _Retiring) -> None:
        try:
            with retiring.scope:
                await self._bounded_drain(name)
                self._remove_now(name, retiring)
        finally:
            retiring.done.set()  # removed, wanted again, or the pool is stopping

    def _remove_now(self, name: str, retiring: _Retiring) -> None:
        if self._retiring.get(name) is not retiring:
            return  # wanted again meanwhile
        del self._retiring[name]
        self._runtime.monitor.forget(name)
        self._runtime.pool.remove_backend(name)
        logger.info("backend %s removed from the pool", name)
        retiring.done.set()

    # --- registrations ---------------------------------------------------------------------

    async def _expire_registrations(self) -> None:
        overlay = self._overlay
        while True:
            now = self._clock()
            for name in [n for n, until in self._overlay.expires.items() if until <= now]:
                logger.warning("registration of backend %s was not renewed: draining and removing it", name)
                self._unlist(name)
            overlay = self._overlay
            soonest = min(overlay.expires.values(), default=math.inf)
            with anyio.move_on_after(max(0.0, soonest - self._clock())):
                await self._expiry_changed.wait()
            self._expiry_changed = anyio.Event()


def _summary_line(summary: Mapping[str, list[str]], settings_changed: bool) -> str:
    parts = [f"{what} {', '.join(names)}" for what, names in summary.items() if names]
    if settings_changed and not parts:
        parts.append("settings changed")
    return "; ".join(parts) or "nothing changed"


def _ttl(ttl: Any) -> str:
    return "" if ttl is None else f" for {ttl:g}s (renewable)"


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
