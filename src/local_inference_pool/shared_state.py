"""Slot leases shared by every process of one fleet, in Redis (or Valkey): the fleet-wide truth.

Each process's scheduler still places requests (pure, in memory); a grant is only a candidate until
its lease is claimed here. The claim is one Lua script, atomic in Redis: it expires the leases of
processes that died, then takes a slot only while the backend has fewer leases than slots and only
if the drain guard allows the model (another model active there and no room for a second: refused).
A refused claim tells the process what the others hold, which its scheduler takes as outside load.

- Leases live in a sorted set per backend, scored by their expiry on Redis's clock (``TIME``), so
  clocks of the processes never matter. Live processes renew theirs every ``lease_ttl / 3``; the
  leases of a process killed with SIGKILL expire within ``lease_ttl``.
- A release is a script too (idempotent) and publishes the backend's name, so waiters in every
  process are woken at once. It leaves a tombstone for ``lease_ttl``: a claim cancelled on its way
  (sent, its answer never read), or a renewal that read the lease just before, may reach Redis
  after the release, and must not leave a slot taken that nobody holds; the renewal pass also re-reads every backend (a lost notification
  costs at most one pass).
- Renewal re-adds a lease Redis no longer has (a restarted Redis without persistence), so a live
  process's leases are counted again within one pass.
- All keys share one hash tag (``{prefix}``), so the scripts also run on Redis Cluster.

What stays per process: the queue and its order, circuit breakers, health probes (each process
probes; a probe is three GETs per interval per backend), session affinity.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from local_inference_pool.errors import StateUnavailableError

__all__ = ["FleetView", "SharedLeases"]

logger = logging.getLogger(__name__)

_OTHERS = """
-- What the other processes hold on this backend: their leases, and theirs per model. A lease id
-- starts with its process's prefix, so the store itself tells ours from theirs at this moment.
local function others(prefix)
  local count, models, n = 0, {}, #prefix
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    if string.sub(entries[i], 1, n) ~= prefix then
      count = count + 1
      models[entries[i + 1]] = (models[entries[i + 1]] or 0) + 1
    end
  end
  local reply = {count}
  for model, leases in pairs(models) do
    table.insert(reply, model)
    table.insert(reply, leases)
  end
  return reply
end
"""

_EXPIRE = (
    _OTHERS
    + """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(dead) do
  local model = redis.call('HGET', KEYS[2], id)
  if model and redis.call('HINCRBY', KEYS[3], model, -1) <= 0 then redis.call('HDEL', KEYS[3], model) end
  redis.call('HDEL', KEYS[2], id)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
"""
)

# KEYS: leases (zset id -> expiry), owners (hash id -> model), models (hash model -> leases), and
# the lease's tombstone (left by a release that came before its claim: that claim must not land)
_CLAIM = (
    _EXPIRE
    + """
local count = redis.call('ZCARD', KEYS[1])
local ok = 1
if redis.call('EXISTS', KEYS[4]) == 1 then ok = 0 end
if count >= tonumber(ARGV[3]) then ok = 0 end
if ok == 1 and redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0
   and redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[4]) then ok = 0 end
if ok == 1 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
  count = count + 1
end
local reply = others(ARGV[6])
table.insert(reply, 1, ok)
return reply
"""
)

_RELEASE = (
    _OTHERS
    + """
-- The tombstone: a claim cancelled on its way, or a renewal that read the lease just before, may
-- still reach Redis after this release; both find it and leave the lease released.
redis.call('SET', KEYS[4], 1, 'PX', ARGV[4])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local model = redis.call('HGET', KEYS[2], ARGV[1])
  if model and redis.call('HINCRBY', KEYS[3], model, -1) <= 0 then redis.call('HDEL', KEYS[3], model) end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return others(ARGV[5])
"""
)

# What every process holds on one backend, its dead processes' leases expired first.
_VIEW = (
    _EXPIRE
    + """
return others(ARGV[1])
"""
)

# ARGV: the process's prefix, ttl_ms, then (lease id, model) pairs; KEYS[4...]: each pair's tombstone
_RENEW = (
    _EXPIRE
    + """
for i = 3, #ARGV, 2 do
  local tombstone = KEYS[3 + (i - 1) / 2]
  if redis.call('EXISTS', tombstone) == 0
     and redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
  end
end
return others(ARGV[1])
"""
)


@dataclass(frozen=True)
class FleetView:
    """What the other processes hold on one backend, as the store saw it: leases, and per model."""

    leases: int
    models: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: list[Any]) -> FleetView:
        pairs = reply[1:]
        return cls(int(reply[0]), {_text(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)})


@dataclass
class _Held:
    backend: str
    model: str
    claimed: bool = False  # the claim won; until then it may or may not be in the store
    releasing: bool = False  # given back here; the store has not heard yet


class SharedLeases:
    """One process's handle on the fleet's leases. Every method raises ``StateUnavailableError`` when
    the store cannot be reached (within ``timeout`` seconds), never a Redis error."""

    def __init__(self, url: str, *, lease_ttl: float, prefix: str = "lip", timeout: float = 2.0) -> None:
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._ours = self.process + ":"  # every lease id of this process starts so
        self.lease_ttl = lease_ttl
        self.channel = f"{{{prefix}}}:freed"
        self._prefix = prefix
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)
        self._renew = self._client.register_script(_RENEW)
        self._view = self._client.register_script(_VIEW)
        self.held: dict[str, _Held] = {}  # lease id -> where: claimed, or maybe claimed (in flight)

    def _keys(self, backend: str, lease_id: str = "") -> list[str]:
        base = f"{{{self._prefix}}}:{backend}"
        return [f"{base}:leases", f"{base}:owners", f"{base}:models", f"{base}:released:{lease_id}"]

    def lease_id(self, grant_id: int) -> str:
        return f"{self.process}:{grant_id}"

    async def claim(
        self, lease_id: str, backend: str, model: str, *, capacity: int, max_models: int
    ) -> tuple[bool, FleetView]:
        """Take a fleet-wide slot: ``(True, view)``, or ``(False, view)`` when the others hold it.

        The lease counts as held before the claim is sent: if the call fails or is cancelled after
        Redis ran it, the next release pass removes it (releasing is idempotent), so nothing leaks.
        """
        self.held[lease_id] = _Held(backend, model)
        try:
            reply = await self._claim(
                keys=self._keys(backend, lease_id),
                args=[lease_id, model, capacity, max_models, int(self.lease_ttl * 1000), self._ours],
            )
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc
        view = FleetView.from_reply(reply[1:])
        if int(reply[0]):
            self.held[lease_id].claimed = True
        else:
            del self.held[lease_id]
        return bool(int(reply[0])), view

    def releasing(self, lease_id: str) -> str | None:
        """Mark a held lease as given back here (its release is on its way); its backend, or None."""
        held = self.held.get(lease_id)
        if held is None:
            return None
        held.releasing = True
        return held.backend

    async def release(self, lease_ids: list[str]) -> list[tuple[str, FleetView]]:
        """Give leases back fleet-wide, in one round trip (idempotent); each backend's fleet view
        after its release. All of them stay held while the store is away."""
        wanted = [(lease_id, self.held[lease_id]) for lease_id in lease_ids if lease_id in self.held]
        if not wanted:
            return []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for lease_id, held in wanted:
                    await self._release(
                        keys=self._keys(held.backend, lease_id),
                        args=[
                            lease_id,
                            self.channel,
                            f"{held.backend}\n{self.process}",
                            int(self.lease_ttl * 1000),
                            self._ours,
                        ],
                        client=pipe,
                    )
                replies = await pipe.execute()
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc
        for lease_id, _ in wanted:
            self.held.pop(lease_id, None)
        return [
            (held.backend, FleetView.from_reply(reply))
            for (_, held), reply in zip(wanted, replies, strict=True)
        ]

    async def heartbeat(self, leases: int) -> None:
        """Say this process is alive, with how many leases it holds; gone within ``lease_ttl``."""
        record = json.dumps({"process": self.process, "leases": leases, "lease_ttl": self.lease_ttl})
        try:
            await self._client.set(
                f"{{{self._prefix}}}:process:{self.process}", record, px=int(self.lease_ttl * 1000)
            )
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc

    async def processes(self) -> list[dict[str, Any]]:
        """Every live process of the fleet, with its leases (from their heartbeats)."""
        try:
            keys = [
                key async for key in self._client.scan_iter(match=f"{{{self._prefix}}}:process:*", count=100)
            ]
            records = await self._client.mget(keys) if keys else []
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc
        alive = [json.loads(record) for record in records if record is not None]
        return sorted(alive, key=lambda record: str(record["process"]))

    async def renew(self, backends: Iterable[str]) -> dict[str, FleetView]:
        """Extend the held leases on ``backends`` (re-adding any the store lost) and read each one's
        fleet view, in one round trip."""
        by_backend: dict[str, list[str]] = {name: [] for name in backends}
        for lease_id, held in self.held.items():
            # Only claims that won: one still on its way may yet lose, and must not be added here.
            if held.claimed and held.backend in by_backend:
                by_backend[held.backend].append(lease_id)
        views: dict[str, FleetView] = {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for backend, ids in by_backend.items():
                    tombstones = [self._keys(backend, lease_id)[3] for lease_id in ids]
                    pairs = [item for lease_id in ids for item in (lease_id, self.held[lease_id].model)]
                    await self._renew(
                        keys=[*self._keys(backend)[:3], *tombstones],
                        args=[self._ours, int(self.lease_ttl * 1000), *pairs],
                        client=pipe,
                    )
                replies = await pipe.execute()
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc
        for backend, reply in zip(by_backend, replies, strict=True):
            views[backend] = FleetView.from_reply(reply)
        return views

    async def view(self, backend: str) -> FleetView:
        """What every process holds on ``backend`` now (read only: nothing is renewed)."""
        try:
            return FleetView.from_reply(await self._view(keys=self._keys(backend), args=[self._ours]))
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc

    async def released(self) -> AsyncIterator[str]:
        """The names of backends where another process released a lease, as it happens (this
        process's own releases are known here already)."""
        try:
            async with self._client.pubsub(ignore_subscribe_messages=True) as subscription:
                await subscription.subscribe(self.channel)
                async for message in subscription.listen():
                    backend, _, process = _text(message["data"]).partition("\n")
                    if process != self.process:
                        yield backend
        except RedisError as exc:
            raise StateUnavailableError(f"the shared state store cannot be reached: {_why(exc)}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()

    def releasing_on(self, backend: str) -> int:
        """This process's leases on ``backend`` given back here whose release the store has not had
        yet: still taken there, so they must stay taken here too."""
        return sum(1 for held in self.held.values() if held.backend == backend and held.releasing)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _why(exc: BaseException) -> str:
    # redis-py's messages name the host and port, never the password; keep them short all the same.
    return (str(exc) or type(exc).__name__)[:200]
