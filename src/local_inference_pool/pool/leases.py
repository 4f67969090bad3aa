"""What the pool hands out: a ``Lease`` (one slot on one backend, released exactly once), an
``Unleased`` backend for a request that takes no slot, and ``Acquiring``, the awaitable that
``pool.acquire()`` returns."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from local_inference_pool.core.scheduler import Affinity, Grant, LeaseRequest, Ticket

if TYPE_CHECKING:
    from local_inference_pool.pool.pool import Pool

__all__ = ["Acquiring", "Lease", "Unleased"]

logger = logging.getLogger(__name__)


class Lease:
    """One slot on one backend. ``release()`` is synchronous and idempotent."""

    __slots__ = ("__weakref__", "_finalizer", "_grant", "_pool", "api_key", "queue_wait")

    def __init__(self, pool: Pool, grant: Grant, queue_wait: float) -> None:
        self._pool = pool
        self._grant = grant
        self.queue_wait = queue_wait
        # The outbound key for this backend (never the caller's), kept with the lease: a backend
        # removed while the lease runs takes its configuration with it.
        self.api_key: str | None = pool.backends.api_key(grant.backend.name)
        self._finalizer = weakref.finalize(self, _dropped, pool, grant)
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
    def waited_for(self) -> str | None:
        """Why the request last waited for its slot: ``slots``, ``drain_guard``, ``cache_hold`` or
        ``tenant_share``; None when it did not wait."""
        ticket = self._grant.ticket
        if ticket.waited_for is None and self.queue_wait > 0.001:
            return "slots"  # queued behind others of its model
        return ticket.waited_for

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

    def cuttable(self) -> AbstractContextManager[anyio.CancelScope]:
        """A cancel scope to do this lease's work in, that the end of its backend's drain cancels
        (``Pool.cut``); ``scope.cancelled_caught`` afterwards says it was cut."""
        return self._pool._drains.cuttable(self._grant)

    def cut_by(self, cut: Callable[[], object]) -> AbstractContextManager[None]:
        """While in the block, ``cut`` is called when this lease's backend's drain ends (``Pool.cut``):
        a cheaper hook than ``cuttable`` for a caller that can end its own work."""
        return self._pool._drains.cut_by(self._grant, cut)

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

    def cuttable(self) -> AbstractContextManager[anyio.CancelScope]:
        """Nothing cuts a request that holds no slot."""
        return anyio.CancelScope()

    def cut_by(self, cut: Callable[[], object]) -> AbstractContextManager[None]:
        """Nothing cuts a request that holds no slot."""
        return contextlib.nullcontext()

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
        return lease if lease is not None and not pool.fleet.shared else None

    async def _wait(self) -> Lease:
        if self._ticket is None:
            lease = self.at_once()
            if lease is not None:
                return lease
        assert self._ticket is not None
        return await self._pool.lease_for(self._ticket, self._granted)

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


def _dropped(pool: Pool, grant: Grant) -> None:
    """A lease was garbage-collected without ``release()``: its slot is given back, and said."""
    if grant.released:
        return
    logger.warning(
        "a lease for model %r on %s was dropped without release(); releasing it now",
        grant.model,
        grant.backend.name,
    )
    pool._release_later(grant)
