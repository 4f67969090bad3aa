"""Per-key limits and usage shared by every process of one fleet, in Redis (or Valkey).

A limited key's request is one Lua script (``lua/limit_admit.lua``): the same exact sliding windows
and budget as ``core.limits`` decides in one process, on Redis's clock, atomic, so the limits hold
whichever process the requests reach. When the request ends, a second script (``limit_settle``)
turns its token reservation into what the server reported and counts the budget. Usage (requests
and tokens by key and model) is added in batches, by minute and by hour, in the layout of
``core.usage_book``; it lives as long as that book keeps it.

Keys are named by the client key's name, never its secret. The budget period is computed by the
caller's clock (a calendar month is not Lua's to compute); only at a period's edge, and only by the
clocks' difference, can that matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from local_inference_pool.core.limits import Admitted, Limits, Refused, Standing, Ticket, period_bounds
from local_inference_pool.core.usage_book import HOURS_KEPT, MINUTES_KEPT, bucket_of
from local_inference_pool.pool.lua import lua_script
from local_inference_pool.pool.store_replies import text, unavailable

__all__ = ["SharedKeys"]

_ADMIT = lua_script("clock", "limit_admit")
_SETTLE = lua_script("clock", "limit_settle")
_FIELD_SEP = "\t"  # between key, model and kind in a usage field: no key name or kind holds one


class SharedKeys:
    """One process's handle on the fleet's key limits and usage. Every method raises
    ``StateUnavailableError`` when the store cannot be reached, never a Redis error."""

    def __init__(self, url: str, *, prefix: str = "lip", timeout: float = 2.0) -> None:
        self._prefix = prefix
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._admit = self._client.register_script(_ADMIT)
        self._settle = self._client.register_script(_SETTLE)

    def _keys(self, key: str, period_start: float) -> list[str]:
        base = f"{{{self._prefix}}}:limit:{key}"
        return [
            f"{base}:requests",
            f"{base}:tokens",
            f"{base}:token_total",
            f"{base}:budget:{int(period_start)}",
        ]

    async def admit(
        self, key: str, limits: Limits, estimate: int, reservation: str, now: float
    ) -> Admitted | Refused:
        """One request of ``key``, counted fleet-wide if its limits let it (``now``: this process's
        clock, for the budget's period only)."""
        start, end = period_bounds(limits.period, now)
        args: list[str | int] = [
            _or_none(limits.rpm),
            _or_none(limits.tpm),
            estimate,
            reservation,
            _or_none(limits.budget),
            int(end * 1000),
        ]
        try:
            reply = await self._admit(keys=self._keys(key, start), args=args)
        except RedisError as exc:
            raise unavailable(exc) from exc
        verdict = text(reply[0])
        requests, requests_reset, tokens, tokens_reset, spent = (int(value) for value in reply[2:7])
        standing = Standing(
            rpm=limits.rpm,
            requests_left=max(0, (limits.rpm or 0) - requests),
            requests_reset=requests_reset / 1000,
            tpm=limits.tpm,
            tokens_left=max(0, (limits.tpm or 0) - tokens),
            tokens_reset=tokens_reset / 1000,
            budget=limits.budget,
            budget_left=max(0, (limits.budget or 0) - spent),
            budget_reset=end,
        )
        if verdict == "ok":
            return Admitted(Ticket(key, reservation, estimate), standing)
        retry = int(reply[1])
        after = math.inf if retry < 0 else retry / 1000
        return Refused(verdict, after, standing, estimate if verdict == "tokens" else 0)  # type: ignore[arg-type]

    async def settle(self, ticket: Ticket, used: int | None, limits: Limits, now: float) -> None:
        start, end = period_bounds(limits.period, now)
        keys = self._keys(ticket.key, start)
        args: list[str | int] = [
            f"{ticket.reservation}|{ticket.estimate}",
            ticket.reservation,
            -1 if used is None else used,
            ticket.estimate,
            1 if limits.budget is not None else 0,
            int(end * 1000),
        ]
        try:
            await self._settle(keys=keys[1:], args=args)
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def add_usage(self, counts: Mapping[tuple[int, str, str, str], int]) -> None:
        """Add ``counts`` ((minute, key, model, kind) -> count) to the fleet's minute and hour buckets."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                touched: set[tuple[str, int]] = set()
                for (minute, key, model, kind), value in counts.items():
                    field = _FIELD_SEP.join((key, model, kind))
                    for size, kept in ((60, MINUTES_KEPT), (3600, HOURS_KEPT)):
                        bucket = self._usage_key(size, bucket_of(minute, size))
                        pipe.hincrby(bucket, field, value)
                        if (bucket, size) not in touched:
                            touched.add((bucket, size))
                            pipe.expire(bucket, (kept + 1) * size)
                await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from exc

    async def usage(self, starts: Iterable[int], size: int) -> list[tuple[int, str, str, str, int]]:
        """(bucket start, key, model, kind, count) of the buckets of ``size`` seconds at ``starts``."""
        starts = list(starts)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for start in starts:
                    pipe.hgetall(self._usage_key(size, start))
                buckets: list[dict[Any, Any]] = await pipe.execute()
        except RedisError as exc:
            raise unavailable(exc) from exc
        rows = []
        for start, bucket in zip(starts, buckets, strict=True):
            for field, value in bucket.items():
                key, _, rest = text(field).partition(_FIELD_SEP)
                model, _, kind = rest.rpartition(_FIELD_SEP)
                if kind:
                    rows.append((start, key, model, kind, int(value)))
        return rows

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise unavailable(exc) from exc

    def _usage_key(self, size: int, start: int) -> str:
        return f"{{{self._prefix}}}:usage:{size}:{start}"

    async def aclose(self) -> None:
        await self._client.aclose()


def _or_none(limit: int | None) -> int:
    return -1 if limit is None else limit
