"""Client keys at the door and at the end: may this key make this request now, and what it used.

At the door (``admit``), a ``[[keys]]`` key is refused when it is disabled or expired (401), when
the model is not one it may use (403), or when its ``rpm``, ``tpm`` or token budget is reached
(429, with when to come back). A key with limits is counted: in this process (``core.limits``), or
with ``[pool] state`` fleet-wide in Redis (``pool.shared_keys``: one round trip). A key without
limits costs no count and no round trip. The rate-limit headers of the answer are made here.

At the end (``finish``), the request's token reservation becomes what the server reported, and its
usage (requests, input, cached and output tokens, by key and model) goes in the usage book; with
``state`` the usage is written to Redis in batches, once a second, off every request's path.

If the store cannot be reached, limits are counted in this process until it can again (each
process then admits up to the limit: a fleet of N at most N times it), and said so once in the log.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from local_inference_pool.config import PoolConfig
from local_inference_pool.core.limits import Admitted, KeyLimiter, Limits, Refused, Standing, Ticket
from local_inference_pool.core.usage_book import UsageBook, bucket_of
from local_inference_pool.errors import KeyLimitError, KeyRefusedError, StateUnavailableError
from local_inference_pool.gateway.inbound import Inbound
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.key_config import KeyConfig

if TYPE_CHECKING:
    from local_inference_pool.pool.shared_keys import SharedKeys

__all__ = ["FLUSH_INTERVAL", "KeyAccounting", "estimate_tokens", "limit_headers"]

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0  # seconds between writes of the usage to the shared store
MAX_PENDING_USAGE = 100_000  # usage rows kept for a store that is away; more are dropped (logged)
SETTLE_WAIT = 1.0  # at most this long, a key's request waits for its earlier requests' settling
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def estimate_tokens(inbound: Inbound) -> int:
    """What a request may use, reserved against its key's ``tpm``: its body's bytes / 4 (a prompt's
    tokens are rarely more) plus the most it may generate (``max_tokens`` and its other names)."""
    most = 0
    for name in _MAX_TOKEN_FIELDS:
        value = inbound.payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            most = max(most, value)
    return len(inbound.body) // 4 + most


class KeyAccounting:
    def __init__(
        self,
        config: PoolConfig,
        *,
        store: SharedKeys | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._wall = wall
        self._limiter = KeyLimiter()
        self.book = UsageBook()
        self._pending_usage: dict[tuple[int, str, str, str], int] = {}
        self._settling: dict[str, int] = {}  # key -> its requests whose settling is on its way
        self._settled: dict[str, anyio.Event] = {}
        self._group: TaskGroup | None = None
        self._prefix = secrets.token_hex(6)  # reservation names: unique in the fleet
        self._made = 0
        self._store_away = False
        self._keys: dict[str, KeyConfig] = {}
        self._limits: dict[str, Limits] = {}
        self.reconfigure(config)

    def reconfigure(self, config: PoolConfig) -> None:
        """The keys of a new configuration, from the next request on; a removed key's counts go."""
        self._keys = {key.name: key for key in config.keys}
        self._limits = {
            key.name: Limits(key.rpm, key.tpm, key.max_tokens, key.budget_period)
            for key in config.keys
            if key.limited
        }
        self._limiter.sweep(self._wall(), keep=self._budgeted())

    def _budgeted(self) -> set[str]:
        """The keys with a budget: their period's count stays while their windows are empty."""
        return {name for name, limits in self._limits.items() if limits.budget is not None}

    def key(self, name: str) -> KeyConfig | None:
        return self._keys.get(name)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Settle requests and write usage to the shared store; until cancelled."""
        async with anyio.create_task_group() as group:
            self._group = group
            task_status.started()
            try:
                while True:
                    await anyio.sleep(FLUSH_INTERVAL)
                    await self.flush()
                    self._limiter.sweep(self._wall(), keep=self._budgeted())
            finally:
                self._group = None
                with anyio.move_on_after(2, shield=True):
                    await self.flush()

    # --- at the door -----------------------------------------------------------------------

    async def admit(
        self, holder: str, inbound: Inbound, record: RequestRecord, *, slot: bool, anthropic: bool
    ) -> None:
        """Refuse the request (``KeyRefusedError``, ``KeyLimitError``) or count it; the rate-limit
        headers go on ``record`` either way, for the answer."""
        entry = self._keys.get(holder)
        if entry is None:
            return
        now = self._wall()
        if entry.disabled:
            raise KeyRefusedError("this API key is disabled", status=401, code="key_disabled")
        if entry.expired(now):
            assert entry.expires is not None
            raise KeyRefusedError(
                f"this API key expired at {entry.expires.isoformat()}", status=401, code="key_expired"
            )
        if inbound.model and not entry.allows(inbound.model):
            # 403 for any model outside the key's list, served or not: the answer says only that
            # this key may not use it, never whether the pool serves it.
            raise KeyRefusedError(
                f"this API key may not use the model {inbound.model[:128]!r}",
                status=403,
                code="model_not_allowed",
            )
        limits = self._limits.get(holder)
        if limits is None:
            return
        estimate = estimate_tokens(inbound) if slot else 0
        if self._settling.get(holder):
            # This key's earlier requests are being settled: wait, so a budget they crossed holds.
            with anyio.move_on_after(SETTLE_WAIT):
                await self._settled[holder].wait()
        verdict = await self._admit(holder, limits, estimate, now)
        record.headers = limit_headers(verdict.standing, now, anthropic=anthropic)
        if isinstance(verdict, Refused):
            raise _limit_error(verdict, limits)
        record.ticket, record.limits = verdict.ticket, limits

    async def _admit(self, holder: str, limits: Limits, estimate: int, now: float) -> Admitted | Refused:
        self._made += 1
        store = self._store
        if store is not None and not self._store_away:
            try:
                return await store.admit(holder, limits, estimate, f"{self._prefix}:{self._made}", now)
            except StateUnavailableError as exc:
                self._store_is_away(exc)
        return self._limiter.admit(holder, limits, estimate, now)

    def _store_is_away(self, exc: StateUnavailableError) -> None:
        if not self._store_away:
            logger.warning("key limits are counted in this process only until the store is back: %s", exc)
        self._store_away = True

    # --- at the end ------------------------------------------------------------------------

    def finish(self, record: RequestRecord, model: str) -> None:
        """The request ended: its reservation settled, its usage booked (``model``: the name the
        metrics give it)."""
        now = self._wall()
        if record.backend != "-":  # it reached a server: what it used is usage (a refusal is not)
            self._book(now, record, model)
        self._settle(record, now)

    def _book(self, now: float, record: RequestRecord, model: str) -> None:
        counts = {
            "requests": 1,
            "input": record.prompt_tokens or 0,
            "cached": record.cached_tokens or 0,
            "output": record.completion_tokens or 0,
        }
        self.book.add(now, record.key, model, counts)
        if self._store is not None:
            minute = bucket_of(now, 60)
            pending = self._pending_usage
            if len(pending) < MAX_PENDING_USAGE:
                for kind, value in counts.items():
                    if value:
                        slot = (minute, record.key, model, kind)
                        pending[slot] = pending.get(slot, 0) + value

    def expecting(self, record: RequestRecord) -> None:
        """A stream's last bytes are about to go: its key's next request, which may come at once,
        waits for this one's settling (``finish`` runs a moment after the client has the end)."""
        if record.ticket is not None and self._store is not None and not record.settle_expected:
            record.settle_expected = True
            self._begin_settling(record.ticket.key)

    def _settle(self, record: RequestRecord, now: float) -> None:
        ticket, limits = record.ticket, record.limits
        if ticket is None or limits is None:
            return
        record.ticket = None  # settled once, whatever calls this again
        expected, record.settle_expected = record.settle_expected, False
        reported = record.prompt_tokens is not None or record.completion_tokens is not None
        used = (record.prompt_tokens or 0) + (record.completion_tokens or 0) if reported else None
        if record.backend == "-" and not reported:
            used = 0  # it never reached a server: nothing was used
        shared = self._store is not None and ticket.reservation.startswith(self._prefix)
        if not shared or self._group is None:
            self._limiter.settle(ticket, used, limits, now)
        elif limits.budget is not None or (used is not None and limits.tpm is not None):
            if not expected:
                self._begin_settling(ticket.key)
            self._group.start_soon(self._settle_shared, ticket, used, limits, now)
            return
        # Otherwise nothing to correct: no token reservation, or it stands as it is.
        if expected:
            self._end_settling(ticket.key)

    def _begin_settling(self, key: str) -> None:
        self._settling[key] = self._settling.get(key, 0) + 1
        if key not in self._settled:
            self._settled[key] = anyio.Event()

    def _end_settling(self, key: str) -> None:
        left = self._settling[key] - 1
        if left:
            self._settling[key] = left
        else:
            del self._settling[key]
            self._settled.pop(key).set()

    async def _settle_shared(self, ticket: Ticket, used: int | None, limits: Limits, now: float) -> None:
        assert self._store is not None
        try:
            await self._store.settle(ticket, used, limits, now)
        except StateUnavailableError as exc:
            self._store_is_away(exc)
        finally:
            self._end_settling(ticket.key)

    async def flush(self) -> None:
        """Write the usage booked since the last flush to the store (kept for the next one if the
        store is away, up to ``MAX_PENDING_USAGE`` rows); and find out whether it is back."""
        store = self._store
        if store is None:
            return
        pending, self._pending_usage = self._pending_usage, {}
        try:
            if pending:
                await store.add_usage(pending)
            if self._store_away:
                await store.ping()
                self._store_away = False
                logger.warning("key limits are counted fleet-wide again")
        except StateUnavailableError as exc:
            self._store_is_away(exc)
            for slot, value in pending.items():
                if len(self._pending_usage) < MAX_PENDING_USAGE:
                    self._pending_usage[slot] = self._pending_usage.get(slot, 0) + value

    # --- reading ---------------------------------------------------------------------------

    async def usage_rows(self, start: int, end: float, size: int) -> list[tuple[int, str, str, str, int]]:
        """(bucket, key, model, kind, count) for buckets of ``size`` seconds from ``start`` (a
        bucket's start) to ``end``: the fleet's with ``state`` (raises ``StateUnavailableError``;
        this process's last second may not be written yet), else this process's."""
        if self._store is None:
            return list(self.book.rows(start, end, size))
        return await self._store.usage(range(start, math.ceil(end), size), size)

    @property
    def counted(self) -> str:
        """Where key limits are counted now: ``process``, ``fleet``, or ``process (store away)``."""
        if self._store is None:
            return "process"
        return "process (store away)" if self._store_away else "fleet"

    def limits_of(self, name: str) -> Mapping[str, Any] | None:
        entry = self._keys.get(name)
        if entry is None:
            return None
        return {
            "rpm": entry.rpm,
            "tpm": entry.tpm,
            "max_tokens": entry.max_tokens,
            "budget_period": entry.budget_period,
            "models": list(entry.models) if entry.models is not None else None,
            "expires": entry.expires.isoformat() if entry.expires else None,
            "disabled": entry.disabled,
        }


def _limit_error(refused: Refused, limits: Limits) -> KeyLimitError:
    retry = None if math.isinf(refused.retry_after) else refused.retry_after
    if refused.limit == "requests":
        message = f"this API key's limit of {limits.rpm} requests per minute is reached"
    elif refused.limit == "tokens":
        message = f"this API key's limit of {limits.tpm} tokens per minute is reached"
        if retry is None:
            message = (
                f"this request may use {refused.asked} tokens, more than this API key's {limits.tpm} "
                "tokens per minute: lower max_tokens or shorten the prompt"
            )
    else:
        period = limits.period if isinstance(limits.period, str) else f"{limits.period:g}s"
        message = f"this API key's budget of {limits.budget} tokens per {period} is spent"
    if retry is not None:
        message += f"; retry in {retry:.1f}s"
    return KeyLimitError(message, limit=refused.limit, retry_after=retry)


def limit_headers(standing: Standing, now: float, *, anthropic: bool) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers of an answer: OpenAI's ``x-ratelimit-*`` (resets as durations), or
    on Anthropic's API its ``anthropic-ratelimit-*`` (resets as RFC 3339 times); the budget's as
    ``x-budget-*``. Only for the limits the key has."""
    headers: list[tuple[str, str]] = []
    for what, limit, left, reset in (
        ("requests", standing.rpm, standing.requests_left, standing.requests_reset),
        ("tokens", standing.tpm, standing.tokens_left, standing.tokens_reset),
    ):
        if limit is None:
            continue
        if anthropic:
            headers += [
                (f"anthropic-ratelimit-{what}-limit", str(limit)),
                (f"anthropic-ratelimit-{what}-remaining", str(left)),
                (f"anthropic-ratelimit-{what}-reset", _rfc3339(now + reset)),
            ]
        else:
            headers += [
                (f"x-ratelimit-limit-{what}", str(limit)),
                (f"x-ratelimit-remaining-{what}", str(left)),
                (f"x-ratelimit-reset-{what}", _duration(reset)),
            ]
    if standing.budget is not None:
        headers += [
            ("x-budget-limit-tokens", str(standing.budget)),
            ("x-budget-remaining-tokens", str(standing.budget_left)),
            ("x-budget-reset", _rfc3339(standing.budget_reset)),
        ]
    return [(name.encode(), value.encode()) for name, value in headers]


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``250ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(epoch)))
