"""The waits a leaving client ends (``client_watch.py``)."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest
from starlette.types import Message, Receive

from local_inference_pool.gateway.client_watch import ClientWatch

pytestmark = pytest.mark.anyio


class TestClientWatch:
    """The waits a leaving client ends, and the cancellations that are not theirs to take."""

    @staticmethod
    def disconnecting_after(seconds: float) -> Receive:
        async def receive() -> Message:
            await anyio.sleep(seconds)
            return {"type": "http.disconnect"}

        return receive

    async def test_a_client_leaving_ends_a_wait_and_nothing_else(self) -> None:
        watch = ClientWatch(self.disconnecting_after(0.01))
        with anyio.fail_after(2):
            async with watch.until_gone():
                await anyio.sleep(10)
        assert watch.gone
        await anyio.lowlevel.checkpoint()  # no cancellation is left pending on the task
        watch.close()

    async def test_a_wait_entered_after_the_client_left_ends_even_if_it_never_suspends(self) -> None:
        watch = ClientWatch(self.disconnecting_after(0))
        watch.gone = True
        ran = False
        async with watch.until_gone():
            ran = True  # no await: the cancellation is taken back on the way out
        assert ran
        await anyio.sleep(0.01)  # would raise CancelledError if it had leaked past the block
        watch.close()

    async def test_a_cancellation_from_elsewhere_goes_on(self) -> None:
        watch = ClientWatch(self.disconnecting_after(10))
        finished = False
        with anyio.move_on_after(0.05) as outer:
            async with watch.until_gone():
                await anyio.sleep(10)
            finished = True
        assert outer.cancelled_caught
        assert not finished
        assert not watch.gone
        watch.close()

    async def test_both_at_once_the_other_cancellation_wins(self) -> None:
        watch = ClientWatch(self.disconnecting_after(10))
        task = asyncio.current_task()
        assert task is not None

        async def both_cancel() -> None:
            async with watch.until_gone():
                watch.end_waits()
                task.cancel()  # a shutdown, say, in the same instant
                await asyncio.sleep(1)

        with pytest.raises(asyncio.CancelledError):
            await both_cancel()
        assert task.uncancel() == 0
        watch.close()
