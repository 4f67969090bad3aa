"""What each key used, by model, in time buckets: requests and input, cached and output tokens.

Two resolutions: minutes for the last ``MINUTES_KEPT`` minutes (the dashboard's chart and short
windows), hours for the last ``HOURS_KEPT`` hours (usage by day or month). Buckets older than that
are dropped as new ones start, so the book's size is bounded by keys x models x buckets kept. The
same layout is kept in Redis for a fleet (``pool.shared_keys``); this is one process's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

__all__ = ["HOURS_KEPT", "KINDS", "MINUTES_KEPT", "Bucket", "UsageBook", "bucket_of"]

KINDS: Final = ("requests", "input", "cached", "output")
MINUTES_KEPT: Final = 180
HOURS_KEPT: Final = 24 * 40
Bucket = dict[tuple[str, str, str], int]  # (key, model, kind) -> count


def bucket_of(now: float, size: int) -> int:
    """The start (seconds since the epoch) of the bucket of ``size`` seconds ``now`` falls in."""
    return int(now // size) * size


class UsageBook:
    def __init__(self) -> None:
        self._buckets: dict[int, dict[int, Bucket]] = {60: {}, 3600: {}}

    def add(self, now: float, key: str, model: str, counts: Mapping[str, int]) -> None:
        """Count one request's figures (kinds of ``KINDS``) in the buckets ``now`` falls in."""
        for size, kept in ((60, MINUTES_KEPT), (3600, HOURS_KEPT)):
            buckets = self._buckets[size]
            start = bucket_of(now, size)
            bucket = buckets.get(start)
            if bucket is None:
                bucket = buckets[start] = {}
                horizon = start - kept * size
                for old in [b for b in buckets if b <= horizon]:
                    del buckets[old]
            for kind, value in counts.items():
                if value:
                    slot = (key, model, kind)
                    bucket[slot] = bucket.get(slot, 0) + value

    def rows(self, start: float, end: float, size: int) -> Iterator[tuple[int, str, str, str, int]]:
        """(bucket start, key, model, kind, count) for the buckets of ``size`` (60 or 3600) that
        start in [start, end)."""
        for at, bucket in sorted(self._buckets[size].items()):
            if start <= at < end:
                for (key, model, kind), value in bucket.items():
                    yield at, key, model, kind, value
