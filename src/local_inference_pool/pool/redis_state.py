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
  after the release, and must not leave a slot taken that nobody holds. The renewal pass also
  re-reads every backend, so a lost notification costs at most one pass.
- Renewal re-adds a lease Redis no longer has (a restarted Redis without persistence), so a live
  process's leases are counted again within one pass.
- The fleet's queue order: each process puts its head of each model's queue (priority, arrival on
  Redis's clock) in a hash per model, one entry per process, renewed like leases. A claim loses
  when the backend's free slots all belong to earlier heads of other processes that the backend
  could take now (the model active or resident there: batching by model and the drain guard hold
  fleet-wide) or that have starved. The arrival of the newest request granted anywhere is shared
  too, so a waiter starves by the same rule in every process. Only heads are compared, so the
  scripts' work is bounded by the number of processes, not of waiters.
- Session affinity: a claim with a session records its backend (the session's key hashed).
- All keys share one hash tag (``{prefix}``), so the scripts also run on Redis Cluster.

What stays per process: circuit breakers (each process learns a failing server by itself), health
probes (each process probes; a probe is three GETs per interval per backend), the prefix-hash
affinity's memory beyond what claims record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from local_inference_pool.core.fleet import Claimed, FleetView, Head, Standing
from local_inference_pool.pool.lua import lua_script
from local_inference_pool.pool.store_replies import text, unavailable

__all__ = ["SharedLeases"]

logger = logging.getLogger(__name__)

# The scripts, in ``lua/``: each is its files joined in order. ``common.lua`` says the layout of
# keys and arguments every script on one backend shares; each script's file, its own.
_CLAIM = lua_script("common", "key_leases", "claim")
_RELEASE = lua_script("common", "release")
_VIEW = lua_script("common", "view")
_RENEW = lua_script("common", "renew")
_KEY_VIEW = lua_script("clock", "key_leases", "key_view")
_HEADS = lua_script("heads")


@dataclass
class _Held:
    backend: str
    model: str
    key: str | None = None  # the client key's name, when the key has a fleet-wide cap
    claimed: bool = False  # the claim won; until then it may or may not be in the store
    releasing: bool = False  # given back here; the store has not heard yet


class SharedLeases:
    """One process's handle on the fleet's leases and queue. Every method raises
    ``StateUnavailableError`` when the store cannot be reached (within ``timeout`` seconds), never a
    Redis error."""

    def __init__(
        self,
        url: str,
        *,
        lease_ttl: float,
        starvation_bound: float = 30.0,
        affinity_ttl: float = 1800.0,
        prefix: str = "lip",
        timeout: float = 2.0,
    ) -> None:
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._ours = self.process + ":"  # every lease id of this process starts so
        self.lease_ttl = lease_ttl
        self._bound_ms = int(starvation_bound * 1000)
        self._affinity_ms = max(1, int(affinity_ttl * 1000))
        self.channel = f"{{{prefix}}}:freed"
        self.queue_channel = f"{{{prefix}}}:queued"
        self._prefix = prefix
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        # Notices wait on a connection of their own with no read timeout: a quiet fleet sends
        # nothing for minutes, and some redis-py releases end a subscription that reads nothing
        # within socket_timeout (redis-py #4098). A dead store still ends it: keepalive and a
        # health check (a PING on a connection idle this long) find a peer that went away.
        self._notice_client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=max(1, int(timeout * 5)),
            retry_on_timeout=False,
        )
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)
        self._renew = self._client.register_script(_RENEW)
        self._view = self._client.register_script(_VIEW)
        self._heads = self._client.register_script(_HEADS)
        self._key_view = self._client.register_script(_KEY_VIEW)
        self.held: dict[str, _Held] = {}  # lease id -> where: claimed, or maybe claimed (in flight)

    def _keys(self, backend: str, standing: Standing) -> list[str]:
        base = f"{{{self._prefix}}}:{backend}"
        return [
            f"{base}:leases",
            f"{base}:owners",
            f"{base}:models",
            f"{base}:resident",
            f"{{{self._prefix}}}:newest",
            f"{{{self._prefix}}}:active",
            *(self._queue_key(model) for model in standing.models),
        ]

    def _queue_key(self, model: str) -> str:
        return f"{{{self._prefix}}}:queue:{model}"

    def _tombstone(self, backend: str, lease_id: str) -> str:
        return f"{{{self._prefix}}}:{backend}:released:{lease_id}"

    def _key_leases(self, key: str | None) -> str:
        return f"{{{self._prefix}}}:key:{key or ''}"

    def _session_key(self, session: str) -> str:
        # Hashed: a session key may be a hash of a prompt, or a client's own id; neither is stored.
        return f"{{{self._prefix}}}:session:{hashlib.sha256(session.encode()).hexdigest()[:32]}"

    def _args(self, standing: Standing) -> list[Any]:
        return [
            self._ours,
            self.process,
            standing.priority,
            _ms(standing.waited),
            self._bound_ms,
            standing.max_models,
            standing.capacity,
            len(standing.models),
        ]

    async def _run(self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run one script for each (keys, args), in one round trip. Not redis-py's script pipeline:
        that asks SCRIPT EXISTS first on every execute, a second round trip; a script the store
        lost (a restart, SCRIPT FLUSH) is loaded and the batch sent again instead."""
        if len(calls) == 1:
            keys, args = calls[0]
            return [await script(keys=keys, args=args)]  # loads the script itself if missing
        for attempt in range(2):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    return list(await pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                await self._client.script_load(script.script)
        raise AssertionError("unreachable")

    def lease_id(self, grant_id: int) -> str:
        return f"{self.process}:{grant_id}"

    async def claim(
        self,
        lease_id: str,
        backend: str,
        model: str,
        standing: Standing,
        *,
        priority: int,
        waited: float,
        queued: bool = True,
        session: str | None = None,
        check_session: bool = True,
        key: str | None = None,
        key_cap: int | None = None,
    ) -> tuple[Claimed, str | None, int, FleetView]:
        """Take a fleet-wide slot for a request of ``priority`` that has ``waited`` seconds: it wins
        when a slot is free, the drain guard allows the model, and (``queued``) no earlier waiter
        elsewhere has a claim to the free slots. The view's ``reserved`` is for this request.
        With a ``session`` (and ``check_session``), it loses when the fleet last served the session
        on another backend, which it returns; won, the fleet remembers this backend for it. So a
        session costs no extra round trip where it stays put. With a client ``key`` that has a
        ``key_cap``, it loses while the key holds that many leases fleet-wide; the third value is
        how many the other processes hold for it.

        The lease counts as held before the claim is sent: if the call fails or is cancelled after
        Redis ran it, the next release pass removes it (releasing is idempotent), so nothing leaks.
        """
        capped = key_cap is not None and key_cap > 0
        self.held[lease_id] = _Held(backend, model, key if capped else None)
        keys = [
            *self._keys(backend, standing),
            self._tombstone(backend, lease_id),
            self._session_key(session or ""),
            self._key_leases(key if capped else None),
        ]
        try:
            reply = await self._claim(
                keys=keys,
                args=[
                    *self._args(standing),
                    lease_id,
                    model,
                    _ms(self.lease_ttl),
                    priority,
                    _ms(waited),
                    "0" if queued else "1",
                    backend,
                    self._affinity_ms if session is not None else 0,
                    "1" if check_session else "0",
                    (key_cap or 0) if capped else 0,
                ],
            )
        except RedisError as exc:
            raise unavailable(exc) from exc
        outcome = Claimed(int(reply[0]))
        if outcome is Claimed.WON:
            self.held[lease_id].claimed = True
        else:
            del self.held[lease_id]
        return outcome, text(reply[1]) or None, int(reply[2]), FleetView.from_reply(reply[3:])

    def releasing(self, lease_id: str) -> str | None:
        """Mark a held lease as given back here (its release is on its way); its backend, or None."""
        held = self.held.get(lease_id)
        if held is None:
            return None
        held.releasing = True
        return held.backend

    async def release(
        self, lease_ids: list[str], standings: dict[str, Standing]
    ) -> list[tuple[str, FleetView]]:
        """Give leases back fleet-wide, in one round trip (idempotent); each backend's fleet view
        after its release. All of them stay held while the store is away."""
        wanted = [(lease_id, self.held[lease_id]) for lease_id in lease_ids if lease_id in self.held]
        if not wanted:
            return []
        try:
            replies = await self._run(
                self._release,
                [
                    (
                        [
                            *self._keys(held.backend, standings[held.backend]),
                            self._tombstone(held.backend, lease_id),
                            *([self._key_leases(held.key)] if held.key is not None else []),
                        ],
                        [
                            *self._args(standings[held.backend]),
                            lease_id,
                            self.channel,
                            f"{held.backend}\n{self.process}\n{held.key or ''}",
                            _ms(self.lease_ttl),
                        ],
                    )
                    for lease_id, held in wanted
                ],
            )
        except RedisError as exc:
            raise unavailable(exc) from exc
        for lease_id, _ in wanted:
            self.held.pop(lease_id, None)
        return [
            (held.backend, FleetView.from_reply(reply))
            for (_, held), reply in zip(wanted, replies, strict=True)
        ]

    async def publish_heads(self, heads: dict[str, Head | None], *, tell: bool = True) -> None:
        """Put this process's head of each model queue in the fleet's queue (None: nothing waits
        for it here any more), and (``tell``) wake the other processes to look again. Heads expire
        with ``lease_ttl`` unless sent again."""
        if not heads:
            return
        args: list[Any] = [self.process, _ms(self.lease_ttl), self.queue_channel if tell else ""]
        for head in heads.values():
            args.extend(("", 0, 0) if head is None else (head.priority, _ms(head.waited), head.waiting))
        try:
            await self._heads(keys=[self._queue_key(model) for model in heads], args=args)
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def remember(self, key: str, value: str, ttl: float) -> None:
        """Keep ``value`` under ``key`` (in this fleet's namespace) for ``ttl`` seconds."""
        try:
            await self._client.set(f"{{{self._prefix}}}:{key}", value, px=_ms(ttl))
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def recall(self, key: str) -> str | None:
        """What ``remember`` kept under ``key``, if it has not expired."""
        try:
            value = await self._client.get(f"{{{self._prefix}}}:{key}")
        except RedisError as exc:
            raise unavailable(exc) from exc
        return None if value is None else text(value)

    async def heartbeat(self, leases: int, waiting: int) -> None:
        """Say this process is alive, with how many leases it holds and requests it has waiting;
        gone within ``lease_ttl``."""
        record = json.dumps(
            {"process": self.process, "leases": leases, "waiting": waiting, "lease_ttl": self.lease_ttl}
        )
        try:
            await self._client.set(
                f"{{{self._prefix}}}:process:{self.process}", record, px=_ms(self.lease_ttl)
            )
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def processes(self) -> list[dict[str, Any]]:
        """Every live process of the fleet, with its leases and waiting requests (from heartbeats)."""
        try:
            keys = [
                key async for key in self._client.scan_iter(match=f"{{{self._prefix}}}:process:*", count=100)
            ]
            records = await self._client.mget(keys) if keys else []
        except RedisError as exc:
            raise unavailable(exc) from exc
        alive = [json.loads(record) for record in records if record is not None]
        return sorted(alive, key=lambda record: str(record["process"]))

    async def renew(self, standings: dict[str, Standing]) -> dict[str, FleetView]:
        """Extend the held leases on the backends of ``standings`` (re-adding any the store lost)
        and read each one's fleet view, in one round trip."""
        by_backend: dict[str, list[str]] = {name: [] for name in standings}
        for lease_id, held in self.held.items():
            # Only claims that won: one still on its way may yet lose, and must not be added here.
            if held.claimed and held.backend in by_backend:
                by_backend[held.backend].append(lease_id)
        try:
            replies = await self._run(
                self._renew,
                [
                    (
                        [
                            *self._keys(backend, standings[backend]),
                            *(
                                name
                                for lease_id in ids
                                for name in (
                                    self._tombstone(backend, lease_id),
                                    self._key_leases(self.held[lease_id].key),
                                )
                            ),
                        ],
                        [
                            *self._args(standings[backend]),
                            _ms(self.lease_ttl),
                            *(
                                item
                                for lease_id in ids
                                for item in (
                                    lease_id,
                                    self.held[lease_id].model,
                                    "1" if self.held[lease_id].key is not None else "0",
                                )
                            ),
                        ],
                    )
                    for backend, ids in by_backend.items()
                ],
            )
        except RedisError as exc:
            raise unavailable(exc) from exc
        return {
            backend: FleetView.from_reply(reply) for backend, reply in zip(by_backend, replies, strict=True)
        }

    async def view(self, standings: dict[str, Standing]) -> dict[str, FleetView]:
        """What every process holds on each backend of ``standings`` now, in one round trip (read
        only: nothing is renewed)."""
        try:
            replies = await self._run(
                self._view,
                [
                    (self._keys(backend, standing), self._args(standing))
                    for backend, standing in standings.items()
                ],
            )
        except RedisError as exc:
            raise unavailable(exc) from exc
        return {
            backend: FleetView.from_reply(reply) for backend, reply in zip(standings, replies, strict=True)
        }

    async def key_leases(self, keys: list[str]) -> dict[str, int]:
        """How many leases the other processes hold for each client key (by name), in one round trip."""
        if not keys:
            return {}
        try:
            reply = await self._key_view(keys=[self._key_leases(key) for key in keys], args=[self._ours])
        except RedisError as exc:
            raise unavailable(exc) from exc
        return {key: int(count) for key, count in zip(keys, reply, strict=True)}

    async def notices(self) -> AsyncIterator[tuple[str, str] | None]:
        """As it happens in another process: (backend, client key or '') where a lease was
        released, or None when its queue changed (this process's own are known here already)."""
        try:
            async with self._notice_client.pubsub(ignore_subscribe_messages=True) as subscription:
                await subscription.subscribe(self.channel, self.queue_channel)
                async for message in subscription.listen():
                    if text(message["channel"]) == self.queue_channel:
                        if text(message["data"]) != self.process:
                            yield None
                        continue
                    backend, process, key = [*text(message["data"]).split("\n"), "", ""][:3]
                    if process != self.process:
                        yield backend, key
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def aclose(self) -> None:
        await self._notice_client.aclose()
        await self._client.aclose()

    def releasing_on(self, backend: str) -> int:
        """This process's leases on ``backend`` given back here whose release the store has not had
        yet: still taken there, so they must stay taken here too."""
        return sum(1 for held in self.held.values() if held.backend == backend and held.releasing)


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))
