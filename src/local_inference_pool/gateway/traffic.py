"""What the pool did, second by second, over the last 15 minutes: the dashboard's charts.

A ring of ``SECONDS`` one-second buckets, each holding, for the whole pool and per backend and per
model: requests that arrived, output tokens, requests waiting (sampled once a second) and times to
first token (up to ``TTFT_SAMPLES`` a second, for p50 and p95). Output tokens are counted as a
stream's events pass (about one a token), then corrected to what the server reported when it
ends, so a rate is never 0 while answers stream. Each process keeps its own ring; with ``state``
each replica's dashboard shows what went through it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

__all__ = ["RATE_WINDOW", "SECONDS", "Traffic"]

SECONDS: Final = 900
RATE_WINDOW: Final = 10  # seconds the header's rates are averaged over
TTFT_SAMPLES: Final = 64
MAX_GROUPS: Final = 256  # backends and models charted; more share nothing (their counts go to "all")


@dataclass(slots=True)
class _Counts:
    requests: int = 0
    tokens: int = 0
    waiting: int = 0
    ttft: list[float] = field(default_factory=list)


class Traffic:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[int, dict[str, _Counts]] = {}
        self._groups: set[str] = {"all"}

    def _counts(self, second: int, groups: tuple[str, ...]) -> list[_Counts]:
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = {}
            for old in [s for s in self._buckets if s <= second - SECONDS]:
                del self._buckets[old]
        found = []
        for group in groups:
            if group not in self._groups:
                if len(self._groups) >= MAX_GROUPS:
                    continue
                self._groups.add(group)
            counts = bucket.get(group)
            if counts is None:
                counts = bucket[group] = _Counts()
            found.append(counts)
        return found

    def arrived(self, model: str) -> None:
        for counts in self._counts(int(self._clock()), ("all", f"model:{model}")):
            counts.requests += 1

    def streamed(self, backend: str, model: str, tokens: int) -> None:
        """``tokens`` more output tokens passed (a stream's events, as they go)."""
        for counts in self._counts(int(self._clock()), ("all", f"backend:{backend}", f"model:{model}")):
            counts.tokens += tokens

    def ended(self, backend: str, model: str, ttft: float | None, tokens: int) -> None:
        """A request ended: its time to first token, and ``tokens`` output tokens not yet counted
        (negative when the stream's events overcounted them)."""
        groups = ("all", f"backend:{backend}", f"model:{model}") if backend != "-" else ("all",)
        for counts in self._counts(int(self._clock()), groups):
            counts.tokens = max(0, counts.tokens + tokens)
            if ttft is not None and len(counts.ttft) < TTFT_SAMPLES:
                counts.ttft.append(ttft)

    def sample_queue(self, waiting: Mapping[str, int]) -> None:
        """The requests waiting now, in all and by model (called once a second)."""
        second = int(self._clock())
        (total,) = self._counts(second, ("all",))
        total.waiting = sum(waiting.values())
        for model, count in waiting.items():
            for counts in self._counts(second, (f"model:{model}",)):
                counts.waiting = count

    async def sample_queues(self, waiting: Mapping[str, int]) -> None:
        """``waiting`` (the scheduler's count by model) sampled once a second; until cancelled."""
        while True:
            self.sample_queue(waiting)
            await anyio.sleep(1)

    def rates(self) -> dict[str, float]:
        """Requests and output tokens per second over the last ``RATE_WINDOW`` whole seconds and
        the current one."""
        now = int(self._clock())
        requests = tokens = 0
        for second in range(now - RATE_WINDOW, now + 1):
            counts = self._buckets.get(second, {}).get("all")
            if counts is not None:
                requests += counts.requests
                tokens += counts.tokens
        span = RATE_WINDOW + (self._clock() % 1)
        return {"requests_per_s": round(requests / span, 2), "tokens_per_s": round(tokens / span, 1)}

    def series(self, group: str = "all", seconds: int = SECONDS) -> dict[str, Any]:
        """One group's last ``seconds`` (whole seconds, oldest first): times (epoch seconds),
        requests and tokens per second, requests waiting, TTFT p50 and p95 in ms (None where none)."""
        now = int(self._clock())
        seconds = max(1, min(seconds, SECONDS))
        times = list(range(now - seconds + 1, now + 1))
        rows = [self._buckets.get(second, {}).get(group) for second in times]
        return {
            "group": group,
            "groups": sorted(self._groups),
            "times": times,
            "requests": [c.requests if c else 0 for c in rows],
            "tokens": [c.tokens if c else 0 for c in rows],
            "waiting": [c.waiting if c else 0 for c in rows],
            "ttft_p50_ms": [_quantile(c.ttft, 0.5) if c else None for c in rows],
            "ttft_p95_ms": [_quantile(c.ttft, 0.95) if c else None for c in rows],
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 1)
