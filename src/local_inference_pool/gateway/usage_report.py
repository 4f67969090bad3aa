"""What the keys used, as ``GET /pool/usage`` answers it (JSON or CSV) and the dashboard shows it.

``/pool/usage`` takes an admin key, and these query parameters:

- ``window``: how far back, ``15m``, ``6h``, ``7d`` (default ``24h``, at most ``40d``); up to three
  hours it is read by the minute, beyond by the hour (the first bucket may start before it);
- ``group``: any of ``key``, ``model``, ``time``, comma-separated (default ``key,model``);
- ``key``, ``model``: only that key's or that model's rows;
- ``format``: ``json`` (default) or ``csv``.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from local_inference_pool.core.usage_book import HOURS_KEPT, MINUTES_KEPT, bucket_of
from local_inference_pool.errors import InvalidRequestError, StateUnavailableError
from local_inference_pool.gateway.accounting import KeyAccounting
from local_inference_pool.gateway.replies import error_response

__all__ = ["CHART_MINUTES", "GROUPS", "usage_endpoint", "usage_summary", "usage_table"]

CHART_MINUTES = 30  # the dashboard's chart of tokens per minute
GROUPS = ("key", "model", "time")
COLUMNS = ("requests", "input_tokens", "cached_tokens", "output_tokens", "total_tokens")
_WINDOW = re.compile(r"([1-9][0-9]{0,5})([mhd])")
_UNIT = {"m": 60, "h": 3600, "d": 86400}
_KIND_COLUMN = {
    "requests": "requests",
    "input": "input_tokens",
    "cached": "cached_tokens",
    "output": "output_tokens",
}


def parse_window(text: str) -> int:
    """``15m``, ``6h``, ``7d`` as seconds; at most the hours the usage is kept."""
    match = _WINDOW.fullmatch(text)
    seconds = int(match.group(1)) * _UNIT[match.group(2)] if match else 0
    if not 60 <= seconds <= HOURS_KEPT * 3600:
        raise InvalidRequestError(
            f"window: {text[:32]!r} is not allowed; expected minutes, hours or days like 15m, 6h, 7d "
            f"(at most {HOURS_KEPT // 24}d)",
            code="invalid_window",
        )
    return seconds


def parse_group(text: str) -> tuple[str, ...]:
    group = tuple(part.strip() for part in text.split(",") if part.strip())
    if not group or len(group) > len(GROUPS) or any(part not in GROUPS for part in group):
        raise InvalidRequestError(
            f"group: {text[:64]!r} is not allowed; expected some of {', '.join(GROUPS)}, comma-separated",
            code="invalid_group",
        )
    return tuple(dict.fromkeys(group))


async def usage_table(
    accounting: KeyAccounting,
    window: int,
    group: tuple[str, ...],
    *,
    now: float | None = None,
    key: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The usage of the last ``window`` seconds, summed by ``group``: one row per group, each with
    its requests and tokens, sorted by total tokens (by time first when grouped by time)."""
    now = time.time() if now is None else now
    size = 60 if window <= MINUTES_KEPT * 60 else 3600
    start = bucket_of(now - window, size)
    rows = await accounting.usage_rows(start, now + 1, size)
    table: dict[tuple[Any, ...], dict[str, Any]] = {}
    for at, row_key, row_model, kind, count in rows:
        if (key is not None and row_key != key) or (model is not None and row_model != model):
            continue
        column = _KIND_COLUMN.get(kind)
        if column is None:
            continue
        fields = {"key": row_key, "model": row_model, "time": _iso(at)}
        group_key = tuple(fields[name] for name in group)
        entry = table.get(group_key)
        if entry is None:
            entry = table[group_key] = {name: fields[name] for name in group} | dict.fromkeys(COLUMNS, 0)
        entry[column] += count
        if column != "requests" and column != "cached_tokens":
            entry["total_tokens"] += count
    data = sorted(table.values(), key=lambda row: (row.get("time", ""), -row["total_tokens"]))
    return {
        "object": "usage",
        "from": _iso(start),
        "to": _iso(now),
        "bucket": "minute" if size == 60 else "hour",
        "group": list(group),
        "data": data,
    }


async def usage_endpoint(request: Request, accounting: KeyAccounting) -> Response:
    """``GET /pool/usage`` for a caller already known to hold an admin key."""
    query = request.query_params
    try:
        window = parse_window(query.get("window", "24h"))
        group = parse_group(query.get("group", "key,model"))
        output = query.get("format", "json")
        if output not in ("json", "csv"):
            raise InvalidRequestError(
                f"format: {output[:16]!r} is not allowed; json or csv", code="invalid_format"
            )
        report = await usage_table(accounting, window, group, key=query.get("key"), model=query.get("model"))
    except (InvalidRequestError, StateUnavailableError) as exc:
        return error_response(exc)
    if output == "json":
        return JSONResponse(report)
    return Response(_csv(report["group"], report["data"]), media_type="text/csv; charset=utf-8")


def _csv(group: Iterable[str], rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [*group, *COLUMNS]
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[name]) for name in columns])
    return out.getvalue()


def _cell(value: Any) -> Any:
    # A cell a spreadsheet would run as a formula is quoted as text (OWASP's CSV injection advice).
    if isinstance(value, str) and len(value) > 1 and value[0] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


async def usage_summary(accounting: KeyAccounting, *, now: float | None = None) -> dict[str, Any]:
    """What the dashboard shows: each key's usage over the last day (with its limits), and its
    tokens per minute over the last ``CHART_MINUTES`` minutes (one list per key, a value per
    minute, oldest first; ``minutes`` are the minutes' starts)."""
    now = time.time() if now is None else now
    day = await usage_table(accounting, 86_400, ("key",), now=now)
    recent = await usage_table(accounting, CHART_MINUTES * 60, ("key", "time"), now=now)
    first = bucket_of(now - CHART_MINUTES * 60, 60)
    minutes = list(range(first, bucket_of(now, 60) + 60, 60))
    index = {_iso(minute): position for position, minute in enumerate(minutes)}
    series: dict[str, list[int]] = {}
    for row in recent["data"]:
        position = index.get(row["time"])
        if position is not None:
            series.setdefault(row["key"], [0] * len(minutes))[position] += row["total_tokens"]
    keys = [{**row, "limits": accounting.limits_of(row["key"])} for row in day["data"]]
    return {"keys": keys, "minutes": minutes, "tokens_per_minute": series}
