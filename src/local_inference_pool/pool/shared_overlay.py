"""The fleet's runtime changes in Redis (or Valkey), shared by every process of one fleet.

What the admin API changes and what servers register is one JSON document, versioned: a writer
replaces it only if it read the current version (one Lua script, compare and set), and every write
is published, so the other processes read it within milliseconds. A process also reads the version
every ``poll`` seconds, so a notice lost with a connection costs at most that long. The document's
meaning is the gateway's (``gateway.overlay``); this module only keeps it.

A store restarted without persistence comes back empty (version 0): the processes see a version
lower than the one they hold and write theirs back, so the fleet keeps its changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.exceptions import RedisError

from local_inference_pool.pool.lua import lua_script
from local_inference_pool.pool.store_replies import text, unavailable

__all__ = ["MAX_DOCUMENT", "SharedOverlay"]

MAX_DOCUMENT = 4 * 1024 * 1024  # bytes: a thousand registered backends fit many times over

_WRITE = lua_script("overlay_write")


class SharedOverlay:
    """One process's handle on the fleet's runtime changes. Every method raises
    ``StateUnavailableError`` when the store cannot be reached, never a Redis error."""

    def __init__(self, url: str, *, prefix: str = "lip", timeout: float = 2.0) -> None:
        self._key = f"{{{prefix}}}:overlay"
        self.channel = f"{{{prefix}}}:overlay:changed"
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        # Notices wait on a connection of their own that may read nothing for minutes (see
        # ``redis_state``); the periodic read of the version finds a store that went away.
        self._notice_client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout, socket_keepalive=True
        )
        self._write = self._client.register_script(_WRITE)

    async def read(self) -> tuple[int, str | None]:
        """The current version and document (None when no change was ever written)."""
        try:
            version, doc = await self._client.hmget(self._key, ["version", "doc"])
        except RedisError as exc:
            raise unavailable(exc) from exc
        return int(version or 0), None if doc is None else text(doc)

    async def write(self, read_version: int, doc: str) -> tuple[bool, int, str | None]:
        """Replace the document if it is still at ``read_version``: (written, the version now, and
        when not written the document at that version, to try again from)."""
        if len(doc.encode()) > MAX_DOCUMENT:
            raise ValueError(f"the fleet's runtime changes would be over {MAX_DOCUMENT} bytes")
        try:
            reply = await self._write(keys=[self._key], args=[read_version, doc, self.channel])
        except RedisError as exc:
            raise unavailable(exc) from exc
        if int(reply[0]) == 1:
            return True, int(reply[1]), None
        return False, int(reply[1]), text(reply[2]) or None

    async def versions(self, poll: float) -> AsyncIterator[int]:
        """The document's version, at once, then whenever a process writes one and at least every
        ``poll`` seconds; until the store cannot be reached (``StateUnavailableError``)."""
        try:
            async with self._notice_client.pubsub(ignore_subscribe_messages=True) as subscription:
                await subscription.subscribe(self.channel)
                while True:
                    version = await self._client.hget(self._key, "version")
                    yield int(version or 0)
                    await subscription.get_message(timeout=poll)
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def aclose(self) -> None:
        await self._notice_client.aclose()
        await self._client.aclose()
