"""Backends being drained: who waits for each to be drained, and the leases its drain's end may cut.

A drained backend is one that is draining and has no lease of this process left on it. An
operator's drain is bounded (``[pool] drain_timeout``): at its end, the leases still running there
are cut. A lease is cut through the cancel scope its user entered with ``Lease.cuttable()`` (the
gateway enters one around each upstream read); a lease held outside one (a library caller's) cannot
be cut, and runs until it is released.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from local_inference_pool.core.model import Backend, Grant

__all__ = ["Drains"]


class Drains:
    def __init__(self) -> None:
        self._waiters: dict[str, anyio.Event] = {}
        self._cuttable: dict[int, tuple[str, anyio.CancelScope]] = {}  # grant id -> backend, scope

    def released(self, backend: Backend) -> None:
        """A lease on ``backend`` was released: wake who waits for it to be drained, once it is."""
        if backend.draining and not backend.active_total:
            event = self._waiters.pop(backend.name, None)
            if event is not None:
                event.set()

    def forget(self, name: str) -> None:
        """The backend left the pool (or was undrained): whoever waits for it stops waiting."""
        event = self._waiters.pop(name, None)
        if event is not None:
            event.set()

    async def wait(self, backend: Backend, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the backend to be drained; whether it is."""
        if backend.draining and backend.active_total:
            event = self._waiters.get(backend.name)
            if event is None:
                event = self._waiters[backend.name] = anyio.Event()
            with anyio.move_on_after(timeout):
                await event.wait()
        return backend.draining and not backend.active_total

    @contextmanager
    def cuttable(self, grant: Grant) -> Iterator[anyio.CancelScope]:
        """A cancel scope that ``cut`` cancels when the drain of the grant's backend ends."""
        scope = anyio.CancelScope()
        self._cuttable[grant.id] = (grant.backend.name, scope)
        try:
            with scope:
                yield scope
        finally:
            self._cuttable.pop(grant.id, None)

    def cut(self, name: str) -> int:
        """Cut every cuttable lease on the backend; how many."""
        scopes = [scope for backend, scope in self._cuttable.values() if backend == name]
        for scope in scopes:
            scope.cancel()
        return len(scopes)
