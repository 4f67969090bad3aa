"""Whether the client is still there, while a request waits for something that may take long."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from types import TracebackType

from starlette.types import Receive

__all__ = ["WATCH_AFTER", "ClientWatch", "within"]

WATCH_AFTER = 0.05  # seconds a wait lasts before the client's connection is watched


def within(seconds: float) -> asyncio.Timeout:
    """A deadline for a wait on the client before its request can be judged (its body arriving):
    ``asyncio.timeout``, which raises ``TimeoutError`` at the deadline. Not anyio's
    ``move_on_after``: the first anyio cancel scope in a task gives the task anyio's own state
    besides a timer, and a request's task is new every time; measured in process, the body's
    deadline cost 20 µs of CPU per request that way."""
    return asyncio.timeout(seconds)


class ClientWatch:
    """Whether the client is still there, while the request waits for something that may take long:
    a slot, the backend's answer (abandoning it closes that connection, so the backend stops
    generating), or the relay. A client that leaves ends the wait at once; the caller checks ``gone``.

    A task reads ``receive`` for ``http.disconnect``, but only once a wait has lasted ``WATCH_AFTER``
    seconds: most plain requests are answered sooner, and a task per request cost a sixth of the
    pool's plain-request throughput (measured with wrk at c=32). A wait ends by cancelling the request
    task and taking the cancellation back at the end of the block, as ``asyncio.timeout`` does.
    That is why this module uses asyncio itself, the one module of the gateway that does: a task
    started lazily on the loop, and a cancellation taken back, are what anyio's task groups and
    cancel scopes would make a cost of every request.

    While a response is relayed, ``watch_sending`` also watches for a client that stopped reading:
    its socket fills and a send blocks forever. One check every half timeout, not a timer per chunk.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = False
        self._waits: list[_UntilGone] = []
        self._watcher: asyncio.Task[None] | None = None
        self._start_watcher: asyncio.TimerHandle | None = None
        self._send_watchdog: asyncio.Task[None] | None = None
        self.too_slow = False  # a send stayed blocked past its timeout

    def until_gone(self) -> _UntilGone:
        return _UntilGone(self)

    def end_waits(self) -> None:
        for wait in self._waits:
            wait.end()

    def watch_sending(self, sending_since: Callable[[], float | None], timeout: float) -> None:
        """End the waits once a send has been blocked for ``timeout`` seconds (``sending_since``:
        when the send under way began, None between sends); ``too_slow`` says so."""
        self._send_watchdog = asyncio.get_running_loop().create_task(
            self._watch_sending(sending_since, timeout)
        )

    def stop_watching_sends(self) -> None:
        if self._send_watchdog is not None:
            self._send_watchdog.cancel()
            self._send_watchdog = None

    async def _watch_sending(self, sending_since: Callable[[], float | None], timeout: float) -> None:
        while True:
            await asyncio.sleep(timeout / 2)
            since = sending_since()
            if since is not None and time.monotonic() - since > timeout:
                self.too_slow = True
                self.end_waits()
                return

    def close(self) -> None:
        if self._start_watcher is not None:
            self._start_watcher.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        self.stop_watching_sends()

    def _arm(self) -> None:
        if self._watcher is None and self._start_watcher is None:
            loop = asyncio.get_running_loop()
            self._start_watcher = loop.call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self._start_watcher = None
        self._watcher = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.end_waits()


class _UntilGone:
    """A wait that ends when the client leaves, or when ``cut`` is called (``cut_short`` then says so)."""

    __slots__ = ("_ended", "_task", "_watch", "cut_short")

    def __init__(self, watch: ClientWatch) -> None:
        self._watch = watch
        self._ended = False
        self.cut_short = False

    def cut(self) -> None:
        """End the wait for another reason than the client (its backend's drain ended)."""
        if not self._ended:
            self.cut_short = True
            self.end()

    async def __aenter__(self) -> _UntilGone:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        watch = self._watch
        watch._waits.append(self)
        if watch.gone:
            self.end()
        watch._arm()
        return self

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._task.cancel()  # delivered at the block's await, which is where the task is

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        self._watch._waits.remove(self)
        if not self._ended:
            return False
        if kind is not asyncio.CancelledError:
            # The block ended without meeting our cancellation (it never suspended): take delivery
            # of it here, or it would strike the next await after the block.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
        if self._task.uncancel() > 0:  # somebody else cancelled the task too: theirs goes on
            if kind is not asyncio.CancelledError:
                raise asyncio.CancelledError
            return False
        return kind is asyncio.CancelledError  # ours: the wait is over, the caller checks why
