"""The one place the pool touches asyncio itself: which event loop owns it, and releases from threads.

The scheduler is not thread-safe, and a pool's waiters are woken with events of the loop they wait
on. So a pool belongs to one event loop at a time, and a lease released from another thread (a
worker thread, a synchronous library's callback, the garbage collector) is handed to that loop.
anyio has no handle on "the loop that owns this object" to call into from a foreign thread
(``anyio.from_thread`` needs a token taken on the loop, and costs a thread hop per call), and a
release must never block the thread that makes it; ``call_soon_threadsafe`` is that, at the cost of
naming asyncio here. The runtime of the pool is asyncio (anyio on its asyncio backend).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from local_inference_pool.errors import WrongEventLoopError

__all__ = ["LoopBinding"]


class LoopBinding:
    """The event loop a pool belongs to, and how to run a call on it from anywhere."""

    __slots__ = ("_loop", "_thread")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def bind(self, *, idle: Callable[[], bool]) -> None:
        """Bind to the running loop. A pool in use (``idle()`` False) on a loop that is still open
        cannot move to another: its waiters and leases belong to the first. ``idle`` is asked only
        when the loop is another: on every request, it is the same one."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is None or self._loop.is_closed() or idle():
            self._loop = loop
            self._thread = threading.get_ident()
            return
        raise WrongEventLoopError(
            "this Pool is in use on another event loop; create one Pool per event loop "
            "(slots are counted per pool, so share the loop, not the pool)"
        )

    def bind_if_running(self, *, idle: Callable[[], bool]) -> None:
        """Bind to the running event loop, if any (synchronous callers may have none)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.bind(idle=idle)

    def call(self, function: Callable[[], None], *, always_hand_off: bool = False) -> None:
        """Run ``function`` on the pool's loop: now, when this is the loop's thread or no loop runs
        (nothing else can touch the scheduler then); else handed to the loop. A loop that is
        stopped but not closed would never run a handed-off call, so a call made while it is
        stopped runs now. ``always_hand_off``: never run it here while a loop runs (the garbage
        collector may call in the middle of a scheduler call on the loop's own thread)."""
        loop = self._loop
        if (
            loop is None
            or loop.is_closed()
            or not loop.is_running()
            or (threading.get_ident() == self._thread and not always_hand_off)
        ):
            function()
        else:
            loop.call_soon_threadsafe(function)
