"""Backends being drained: who waits for each to be drained, and the leases its drain's end may cut.

A drained backend is one that is draining and has no lease of this process left on it. An
operator's drain is bounded (``[pool] drain_timeout``): at its end, the leases still running there
are cut. A lease is cut through the cancel scope its user entered with ``Lease.cuttable()`` (the
gateway's relay enters one around a stream), or by the call its user gave ``Lease.cut_by()`` (the
gateway's own way to end a wait for an answer, cheaper on every request than a cancel scope); a
lease held outside either (a library caller's) cannot be cut, and runs until it is released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

from local_inference_pool.core.model import Backend, Grant
from local_inference_pool.core.scheduler import Scheduler

__all__ = ["Draining", "Drains"]


class Drains:
    def __init__(self) -> None:
        self._waiters: dict[str, anyio.Event] = {}
        self._cuttable: dict[int, tuple[str, Callable[[], object]]] = {}  # grant id -> backend, cut

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
        with self.cut_by(grant, scope.cancel), scope:
            yield scope

    def cut_by(self, grant: Grant, cut: Callable[[], object]) -> _CutBy:
        """While in the block, ``cut`` is called when the drain of the grant's backend ends."""
        return _CutBy(self._cuttable, grant, cut)

    def cut(self, name: str) -> int:
        """Cut every cuttable lease on the backend; how many."""
        cuts = [cut for backend, cut in self._cuttable.values() if backend == name]
        for cut in cuts:
            cut()
        return len(cuts)


class _CutBy:
    __slots__ = ("_cut", "_cuttable", "_grant")

    def __init__(
        self, cuttable: dict[int, tuple[str, Callable[[], object]]], grant: Grant, cut: Callable[[], object]
    ) -> None:
        self._cuttable = cuttable
        self._grant = grant
        self._cut = cut

    def __enter__(self) -> None:
        self._cuttable[self._grant.id] = (self._grant.backend.name, self._cut)

    def __exit__(self, *exc_info: object) -> None:
        self._cuttable.pop(self._grant.id, None)


class Draining:
    """The pool's operator drain, by backend name (``Pool`` has it): no new lease, running ones
    finish, then drained; or cut at the drain's end."""

    _scheduler: Scheduler
    _drains: Drains
    override_backend: Callable[..., None]  # the pool's: the scheduler's change, and its grants

    def drain(self, name: str) -> None:
        """Send the backend no new lease (but one pinned to it) until ``undrain``: its running
        leases finish, requests held for its cache go elsewhere at once, and once none of its leases
        is left it is drained (``drained``, ``wait_drained``)."""
        self.override_backend(name, draining=True)
        self._drains.released(self._scheduler.backends[name])

    def undrain(self, name: str) -> None:
        """Return a draining (or drained) backend to service."""
        self.override_backend(name, draining=False)
        self._drains.forget(name)

    def drained(self, name: str) -> bool:
        """Whether the backend is draining and no lease of this process runs on it (or it is gone)."""
        return self._scheduler.drained(name)

    async def wait_drained(self, name: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a draining backend to be drained; whether it is."""
        backend = self._scheduler.backends.get(name)
        return True if backend is None else await self._drains.wait(backend, timeout)

    def cut(self, name: str) -> int:
        """End every lease on the backend that its user made cuttable (``Lease.cuttable``): the
        gateway ends their requests as a dead server's and continues their streams elsewhere.
        How many were cut."""
        return self._drains.cut(name)
