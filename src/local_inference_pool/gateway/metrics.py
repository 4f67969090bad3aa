"""Prometheus metrics on a per-app registry, and the one log line per request.

Two pool apps in one process never share metrics: each has its own ``CollectorRegistry``. What the
pool already knows (queue depth, slots, health, model loads, circuit openings, affinity) is read from
its snapshot at scrape time by a collector, not counted twice; what only the request path sees
(outcomes, waits, time to first byte, durations, tokens, retries) is recorded as it happens.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from local_inference_pool.core.limits import Limits, Ticket
from local_inference_pool.core.scheduler import Affinity
from local_inference_pool.gateway.tallies import Tallies
from local_inference_pool.gateway.usage import count
from local_inference_pool.pool import Pool

if TYPE_CHECKING:
    from local_inference_pool.gateway.request_log import Capture

__all__ = ["PoolMetrics", "RequestRecord"]

access_log = logging.getLogger("local_inference_pool.access")

WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
HEALTH_STATES = ("healthy", "loading", "unhealthy")
ADMIN_STATES = ("active", "draining", "drained")


@dataclass
class RequestRecord:
    """What one request did, filled in as it goes, reported once when it ends."""

    request_id: str
    model: str
    route: str = "/chat/completions"
    key: str = "-"  # the name of the client's key (never the key)
    started: float = field(default_factory=time.monotonic)
    backend: str = "-"
    status: int = 0
    outcome: str = "ok"
    queue_wait: float | None = None
    first_byte: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of the prompt's, served from the backend's cache
    affinity: str = "-"  # why it went to its backend (x-session-affinity)
    retries: int = 0
    failed_over_from: list[str] = field(default_factory=list)  # backends that died mid-stream
    reported: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # the key's rate-limit headers
    ticket: Ticket | None = None  # the key's limits counted it: settled when it ends
    limits: Limits | None = None
    settle_expected: bool = False  # its key's next request waits for its settling (accounting)
    capture: Capture | None = None  # its bodies, when [telemetry] capture is on
    finish_reasons: list[str] = field(default_factory=list)  # why the answer ended, as the server said
    streamed_tokens: int = 0  # a stream's events relayed so far (about a token each), for the charts
    trace: Any = None  # with traces on, its ids and times (gateway.tracing.RequestTrace)
    asked: str = ""  # the model the client named, when an alias served it (``model`` ran)
    alias: str = ""  # that alias as configured
    fallback_from: str = ""  # the model that could not serve it well, when a fallback did
    fallback_reason: str = ""
    upstream_model: str = ""  # the id its backend knows the model by, when another ([[models]] serve_as)

    def take_usage(self, usage: dict[str, Any] | None) -> None:
        """Token counts from a backend's ``usage`` (OpenAI's ``prompt_tokens``/``completion_tokens``,
        or ``input_tokens``/``output_tokens`` of Anthropic's API and OpenAI's Responses), ignoring
        anything that is not a count."""
        usage = usage or {}
        self.prompt_tokens = count(usage.get("prompt_tokens", usage.get("input_tokens")))
        self.completion_tokens = count(usage.get("completion_tokens", usage.get("output_tokens")))


class PoolMetrics:
    def __init__(self, pool: Pool) -> None:
        self.registry = CollectorRegistry()
        tallies = Tallies()
        self.requests = tallies.counter(
            "lip_requests",
            "Requests finished, by model, backend and outcome.",
            ["model", "backend", "outcome"],
        )
        self.queue_wait = tallies.histogram(
            "lip_queue_wait_seconds",
            "Time a request waited for a slot.",
            ["model"],
            buckets=WAIT_BUCKETS,
        )
        self.first_byte = tallies.histogram(
            "lip_time_to_first_byte_seconds",
            "From the request's arrival to the first byte relayed from the backend.",
            ["model", "backend"],
            buckets=LATENCY_BUCKETS,
        )
        self.duration = tallies.histogram(
            "lip_request_duration_seconds",
            "From the request's arrival to its end.",
            ["model", "backend"],
            buckets=DURATION_BUCKETS,
        )
        self.tokens = tallies.counter(
            "lip_tokens",
            "Tokens the backends reported in usage (prompt or completion).",
            ["model", "backend", "kind"],
        )
        self.routes = tallies.counter(
            "lip_route_requests",
            "Requests finished, by route (under the mount) and outcome.",
            ["route", "outcome"],
        )
        self.key_requests = tallies.counter(
            "lip_key_requests",
            "Requests finished, by the name of the client's key and outcome.",
            ["key", "outcome"],
        )
        self.key_tokens = tallies.counter(
            "lip_key_tokens",
            "Tokens the backends reported, by the name of the client's key, the model asked and kind "
            "(input, cached: of the input, from the server's prompt cache, output).",
            ["key", "model", "kind"],
        )
        self.key_queue_wait = tallies.histogram(
            "lip_key_queue_wait_seconds",
            "Time a request waited for a slot, by the name of the client's key.",
            ["key"],
            buckets=WAIT_BUCKETS,
        )
        self.failovers = tallies.counter(
            "lip_midstream_failovers",
            "Streams whose backend failed midway, by what happened: continued on another backend, or "
            "why not (not_faithful, no_backend, budget_spent, failed).",
            ["model", "outcome"],
        )
        self.seam = tallies.histogram(
            "lip_midstream_seam_seconds",
            "From a backend failing mid-stream to the next piece the client got from another.",
            buckets=LATENCY_BUCKETS,
        )
        self.aliases = tallies.counter(
            "lip_alias_requests",
            "Requests for a model by one of its aliases ([[models]]), by the alias as configured.",
            ["alias", "model"],
        )
        self.fallbacks = tallies.counter(
            "lip_fallbacks",
            "Requests served by a fallback ([[models]] fallbacks): the model, the fallback and why.",
            ["model", "fallback", "reason"],
        )
        self.model_changes = tallies.counter(
            "lip_model_changes",
            "Loads and unloads the pool made ([[models]] preload, idle_unload, load_after): the "
            "backend, the model, load or unload, why (preload, demand, idle, room) and the outcome.",
            ["backend", "model", "action", "reason", "outcome"],
        )
        self.retries = tallies.counter(
            "lip_upstream_retries",
            "Requests sent to another backend after one could not be reached.",
            ["model"],
        )
        self.registry.register(tallies)
        self.registry.register(_PoolCollector(pool))
        self.pool = pool
        self.recent_first_byte: deque[float] = deque(maxlen=200)
        self.totals = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0}
        self.by_route: dict[str, dict[str, int]] = {}  # route -> requests, errors (bounded: the table)

    def observe(self, record: RequestRecord) -> str:
        """Count the request that ended; the name its model is counted under."""
        record.reported = True
        duration = time.monotonic() - record.started
        # A model no backend serves is a client's typo or probe: one label for all of them, so that
        # clients cannot grow the metrics without bound.
        model = record.model if record.backend != "-" or self.pool.serves(record.model) else "(unknown)"
        backend, key = record.backend, record.key
        self.requests.inc((model, backend, record.outcome))
        self.routes.inc((record.route, record.outcome))
        self.key_requests.inc((key, record.outcome))
        counts = self.by_route.setdefault(record.route, {"requests": 0, "errors": 0})
        counts["requests"] += 1
        if record.status >= 400:
            counts["errors"] += 1
        self.totals["requests"] += 1
        if record.queue_wait is not None:
            self.queue_wait.observe((model,), record.queue_wait)
            self.key_queue_wait.observe((key,), record.queue_wait)
        if record.first_byte is not None:
            self.first_byte.observe((model, backend), record.first_byte)
            self.recent_first_byte.append(record.first_byte)
        if backend != "-":
            self.duration.observe((model, backend), duration)
        for kind, value in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens)):
            if value:
                self.tokens.inc((model, backend, kind), value)
                self.totals[f"{kind}_tokens"] += value
        for kind, value in (
            ("input", record.prompt_tokens),
            ("cached", record.cached_tokens),
            ("output", record.completion_tokens),
        ):
            if value:
                self.key_tokens.inc((key, model, kind), value)
        if record.retries:
            self.retries.inc((model,), record.retries)
        if record.alias:
            self.aliases.inc((record.alias, record.model))
        if record.fallback_from:
            self.fallbacks.inc((record.fallback_from, record.model, record.fallback_reason))
        if access_log.isEnabledFor(logging.INFO):
            self._log(record, duration)
        return model

    def _log(self, record: RequestRecord, duration: float) -> None:
        access_log.info(
            "request_id=%s route=%s key=%s model=%s backend=%s status=%d outcome=%s queue_wait_ms=%s "
            "ttfb_ms=%s duration_ms=%.1f prompt_tokens=%s cached_tokens=%s completion_tokens=%s "
            "affinity=%s%s%s%s",
            record.request_id,
            record.route,
            record.key,
            json.dumps(record.model),
            record.backend,
            record.status,
            record.outcome,
            _ms(record.queue_wait),
            _ms(record.first_byte),
            duration * 1000,
            record.prompt_tokens if record.prompt_tokens is not None else "-",
            record.cached_tokens if record.cached_tokens is not None else "-",
            record.completion_tokens if record.completion_tokens is not None else "-",
            record.affinity,
            f" failed_over_from={','.join(record.failed_over_from)}" if record.failed_over_from else "",
            f" asked={json.dumps(record.asked)}" if record.asked else "",
            f" fallback_from={json.dumps(record.fallback_from)} fallback_reason={record.fallback_reason}"
            if record.fallback_from
            else "",
        )

    def model_change(self, backend: str, model: str, action: str, reason: str, outcome: str) -> None:
        self.model_changes.inc((backend, model, action, reason, outcome))

    def failover(self, model: str, outcome: str, seam: float | None = None) -> None:
        """One stream whose backend failed midway: continued (with its seam's gap), or why not."""
        self.failovers.inc((model, outcome))
        if seam is not None:
            self.seam.observe((), seam)

    def traffic(self) -> dict[str, Any]:
        """Totals for the dashboard, which turns them into rates."""
        recent = sorted(self.recent_first_byte)
        return {
            **self.totals,
            "ttfb_p50_ms": round(recent[len(recent) // 2] * 1000, 1) if recent else None,
            "by_route": {route: dict(counts) for route, counts in sorted(self.by_route.items())},
        }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


class _PoolCollector(Collector):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        state = self.pool.snapshot()
        depth = GaugeMetricFamily(
            "lip_queue_depth", "Requests waiting for a slot, by model.", labels=["model"]
        )
        for model, queue in state["queue"]["by_model"].items():
            depth.add_metric([model], queue["waiting"])
        oldest = GaugeMetricFamily(
            "lip_queue_oldest_wait_seconds", "How long the oldest waiting request has waited."
        )
        oldest.add_metric([], state["queue"]["oldest_wait_s"])
        slots = GaugeMetricFamily("lip_backend_slots", "Slots per backend.", labels=["backend"])
        busy = GaugeMetricFamily(
            "lip_backend_slots_busy", "Slots in use per backend, outside work included.", labels=["backend"]
        )
        admin = GaugeMetricFamily(
            "lip_backend_admin_state",
            "1 for the backend's operator state (active, draining, drained).",
            labels=["backend", "state"],
        )
        health = GaugeMetricFamily(
            "lip_backend_health", "1 for the backend's current health state.", labels=["backend", "state"]
        )
        loads = CounterMetricFamily(
            "lip_backend_model_loads", "Requests that made the backend load a model.", labels=["backend"]
        )
        openings = CounterMetricFamily(
            "lip_backend_circuit_openings", "Times the backend's circuit opened.", labels=["backend"]
        )
        for backend in state["backends"]:
            name = backend["name"]
            slots.add_metric([name], backend["slots"])
            busy.add_metric([name], backend["busy"])
            for health_state in HEALTH_STATES:
                health.add_metric([name, health_state], 1.0 if backend["health"] == health_state else 0.0)
            for admin_state in ADMIN_STATES:
                admin.add_metric([name, admin_state], 1.0 if backend["admin_state"] == admin_state else 0.0)
            loads.add_metric([name], backend["model_loads"])
            openings.add_metric([name], backend.get("circuit_openings", 0))
        affinity = CounterMetricFamily(
            "lip_affinity",
            "Where requests with a session or a prompt went: hit, waited, moved, prefix, miss.",
            labels=["result"],
        )
        for result in Affinity:
            affinity.add_metric([result.value], state["stats"][f"affinity_{result.value}"])
        yield from (depth, oldest, slots, busy, health, admin, loads, openings, affinity)
        yield from _prompt_cache_metrics(state)
        leases = GaugeMetricFamily(
            "lip_key_leases", "Leases held now, by the name of the client's key.", labels=["key"]
        )
        waiting = GaugeMetricFamily(
            "lip_key_waiting", "Requests waiting now, by the name of the client's key.", labels=["key"]
        )
        for name, tenant in state["tenants"].items():
            leases.add_metric([name], tenant["active"])
            waiting.add_metric([name], tenant["waiting"])
        yield from (leases, waiting)
        shared = state["shared_state"]
        if shared is not None:  # only where leases are shared with other processes
            reachable = GaugeMetricFamily("lip_state_reachable", "1 while the shared state store answers.")
            reachable.add_metric([], 1.0 if shared["reachable"] else 0.0)
            held = GaugeMetricFamily(
                "lip_state_leases_held", "Leases this process holds in the shared state."
            )
            held.add_metric([], shared["leases_held"])
            fleet = GaugeMetricFamily(
                "lip_backend_fleet_leases",
                "Leases other processes hold per backend, as last seen.",
                labels=["backend"],
            )
            reserved = GaugeMetricFamily(
                "lip_backend_fleet_reserved",
                "Free slots per backend held for requests that came earlier to other processes.",
                labels=["backend"],
            )
            for backend in state["backends"]:
                fleet.add_metric([backend["name"]], backend.get("fleet_leases", 0))
                reserved.add_metric([backend["name"]], backend.get("fleet_reserved", 0))
            claims = CounterMetricFamily(
                "lip_state_claims",
                "Fleet-wide claims of a slot this process made, by outcome (won, full, other_model, "
                "queued_elsewhere, released).",
                labels=["outcome"],
            )
            for outcome, count in shared["claims"].items():
                claims.add_metric([outcome], count)
            yield from (reachable, held, fleet, reserved, claims)


def _prompt_cache_metrics(state: dict[str, Any]) -> Iterator[Metric]:
    """What the backends' prompt caches did, per backend and model, from the pool's counts."""
    labels = ["backend", "model"]
    families = {
        "prompt_tokens": CounterMetricFamily(
            "lip_cache_prompt_tokens", "Prompt tokens the backends reported.", labels=labels
        ),
        "cached_tokens": CounterMetricFamily(
            "lip_cache_cached_tokens",
            "Of those, what the backends served from their prompt cache.",
            labels=labels,
        ),
        "prefill_saved_s": CounterMetricFamily(
            "lip_cache_prefill_saved_seconds",
            "Prefill time the cached tokens saved (estimated: times the learned prefill time per token).",
            labels=labels,
        ),
        "waits": CounterMetricFamily(
            "lip_cache_waits",
            "Requests that waited for the busy backend holding their prompt.",
            labels=labels,
        ),
        "wait_s": CounterMetricFamily(
            "lip_cache_wait_seconds",
            "Time those requests waited for it, beyond a slot elsewhere.",
            labels=labels,
        ),
        "moved": CounterMetricFamily(
            "lip_cache_moved",
            "Requests whose prompt this busy backend held, sent elsewhere because waiting cost more.",
            labels=labels,
        ),
    }
    for row in state["prompt_cache"]:
        for field_name, family in families.items():
            family.add_metric([row["backend"], row["model"]], row[field_name])
    per_token = GaugeMetricFamily(
        "lip_backend_prefill_seconds_per_token",
        "The prefill time per uncached prompt token the backend reported (learned).",
        labels=["backend"],
    )
    for backend in state["backends"]:
        if backend["prefill_ms_per_token"] is not None:
            per_token.add_metric([backend["name"]], backend["prefill_ms_per_token"] / 1000)
    yield from families.values()
    yield per_token
