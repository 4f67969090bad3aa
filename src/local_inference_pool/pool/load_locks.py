"""One load or unload at a time per server, fleet-wide: a lock per backend, with a time to live.

With shared state (``config.state``), every process runs its own placement driver; before it loads
or unloads a model on a server it takes that server's lock in Redis (``SET NX PX``), which holds
what it is doing (``{"model": ..., "state": "loading"}``). The other processes read the locks of
the servers they share on each look (one ``MGET``) and mark those models as changing there, so none
of them sends a request to a server while its model is loading for another process. The lock
expires by itself when its holder dies; a holder releases it only if it is still its own.

Released, the lock holds the change's result for a few seconds (``loaded`` or ``unloaded``, or
nothing for a change that failed): the other processes take it as the server's new residency at
once, before their own probes see it, and none of them changes that server meanwhile.

Without shared state the process is alone and every lock is its own (``LocalLoadLocks``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

from local_inference_pool.pool.store_replies import text, unavailable

__all__ = ["LoadLocks", "LocalLoadLocks", "RedisLoadLocks"]

# Replace the lock by the change's result, for a short while, only when it still holds this
# holder's value: an expired lock taken by another process is not ours to release.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0
"""


class LocalLoadLocks:
    """One process: nobody else loads, so every lock is granted and none is seen."""

    async def acquire(self, backend: str, model: str, state: str, ttl: float) -> str | None:
        return "local"

    async def release(self, backend: str, token: str, result: str | None, settle: float) -> None:
        """Nothing was taken."""

    async def changing(self, backends: Sequence[str]) -> dict[str, dict[str, str]]:
        return {}

    def forget(self, backend: str) -> None:
        """Nothing kept."""

    async def aclose(self) -> None:
        """Nothing to close."""


class RedisLoadLocks:
    def __init__(self, url: str, *, prefix: str = "lip", timeout: float = 2.0) -> None:
        self._prefix = prefix
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._release = self._client.register_script(_RELEASE)
        self._mine: dict[str, str] = {}  # backend -> the value of the lock this process holds

    def _key(self, backend: str) -> str:
        return f"{{{self._prefix}}}:load-lock:{backend}"

    async def acquire(self, backend: str, model: str, state: str, ttl: float) -> str | None:
        """Take the backend's lock for a change of ``model`` (``state``: loading or unloading) for
        at most ``ttl`` seconds; None when another process holds it. Raises
        ``StateUnavailableError`` when the store cannot be reached."""
        value = json.dumps({"model": model, "state": state, "token": secrets.token_hex(8)})
        try:
            taken = await self._client.set(self._key(backend), value, nx=True, px=max(1, int(ttl * 1000)))
        except RedisError as exc:
            raise unavailable(exc) from exc
        if not taken:
            return None
        self._mine[backend] = value
        return value

    async def release(self, backend: str, token: str, result: str | None, settle: float) -> None:
        """Give the lock back if it is still this one, leaving the change's ``result`` (the model's
        state now: ``loaded``, ``unloaded``; None: it failed) for ``settle`` seconds. A store that
        is away lets it expire."""
        held = json.loads(token)
        after = json.dumps({"model": held["model"], "state": result or "failed", "token": held["token"]})
        with contextlib.suppress(RedisError):  # it expires by itself within its time to live
            await self._release(keys=[self._key(backend)], args=[token, after, max(1, int(settle * 1000))])
        self._mine[backend] = after  # its own result is not news to this process

    async def changing(self, backends: Sequence[str]) -> dict[str, dict[str, str]]:
        """What other processes are doing on ``backends``, or just did: backend -> {model: state},
        the state ``loading`` or ``unloading`` while they change it, then for a few seconds
        ``loaded``, ``unloaded`` or ``failed``. Raises ``StateUnavailableError`` when the store is
        away."""
        if not backends:
            return {}
        try:
            values = await self._client.mget([self._key(name) for name in backends])
        except RedisError as exc:
            raise unavailable(exc) from exc
        found: dict[str, dict[str, str]] = {}
        for name, raw in zip(backends, values, strict=True):
            if raw is None or text(raw) == self._mine.get(name):
                continue
            try:
                held = json.loads(text(raw))
                found[name] = {str(held["model"]): str(held["state"])}
            except (ValueError, KeyError, TypeError):
                continue  # not a lock of this program's: ignored
        return found

    def forget(self, backend: str) -> None:
        """The backend left the pool."""
        self._mine.pop(backend, None)

    async def aclose(self) -> None:
        await self._client.aclose()


LoadLocks = LocalLoadLocks | RedisLoadLocks
