"""Drains and removals of backends in the background: a draining backend's running requests get
``drain_timeout`` seconds to finish, after which they are cut (ended as a dead server's, their
streams continued elsewhere); a removed backend is drained so first, then taken out of the pool.

A backend wanted again while it drains for its removal (a reload that names it again, an admin
call that adds it back) stays, with its leases untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from local_inference_pool.gateway.runtime import Runtime

__all__ = ["CUT_GRACE", "Retirements"]

logger = logging.getLogger(__name__)

CUT_GRACE = 5.0  # after a drain's end, how long the leases it cut get to be released


@dataclass
class _Retiring:
    scope: anyio.CancelScope
    done: anyio.Event = field(default_factory=anyio.Event)


class Retirements:
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._retiring: dict[str, _Retiring] = {}
        self._drain_ends: dict[str, anyio.CancelScope] = {}
        self._group: TaskGroup | None = None

    def run_in(self, group: TaskGroup | None) -> None:
        """Run drains in ``group`` from now on (None: the pool is not serving; removals are at once)."""
        self._group = group

    def retiring(self, name: str) -> bool:
        return name in self._retiring

    def keep(self, name: str) -> None:
        """The backend is wanted again: a removal under way stops, and it stays."""
        retiring = self._retiring.pop(name, None)
        if retiring is not None:
            retiring.scope.cancel()
            retiring.done.set()

    async def removed(self, name: str) -> None:
        """Wait until the backend's removal ends (removed, or wanted again)."""
        retiring = self._retiring.get(name)
        if retiring is not None:
            await retiring.done.wait()

    def set_draining(self, name: str, draining: bool) -> None:
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

    def retire(self, name: str) -> None:
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
