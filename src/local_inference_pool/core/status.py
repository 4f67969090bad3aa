"""The scheduler's state as JSON-ready data: what ``/pool/status`` and the dashboard show.

A view only: it reads, never trims or cleans anything (every index is kept clean by its owner).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from local_inference_pool.core.scheduler import Scheduler

__all__ = ["index_sizes", "snapshot"]


def snapshot(scheduler: Scheduler) -> dict[str, Any]:
    now = scheduler.clock()
    queues = scheduler.queues
    oldest: dict[str, float] = {}
    for model in queues.by_model:
        ticket = queues.oldest(model)
        if ticket is not None:
            oldest[model] = now - ticket.arrival
    return {
        "backends": [
            {
                "name": b.name,
                "url": b.url,
                "health": b.health.value,
                "admin_state": b.admin_state,
                "slots": b.slots,
                "busy": b.active_total + b.external_busy,
                "active": b.active_total,
                "external_busy": b.external_busy,
                "active_by_model": dict(sorted(b.active.items())),
                "resident_models": list(b.resident),
                "changing_models": dict(b.changing),
                "models": None if b.models is None else sorted(b.models),
                "max_loaded_models": b.max_loaded_models,
                "weight": b.weight,
                "draining_for": b.barrier,
                "trial": b.trial,
                "model_loads": b.loads,
                "granted": b.granted,
                "held_for_cache": scheduler.held_on(b),
                "prefill_ms_per_token": _rounded(b.prefill_seconds.value, 1000),
                "mean_lease_s": _rounded(b.lease_seconds.value, 1),
            }
            for b in scheduler.backends.values()
        ],
        "prompt_cache": [
            {
                "backend": backend,
                "model": model,
                "prompt_tokens": c.prompt_tokens,
                "cached_tokens": c.cached_tokens,
                "cached_share": round(c.cached_tokens / c.prompt_tokens, 3) if c.prompt_tokens else None,
                "prefill_saved_s": round(c.saved_seconds, 3),
                "waits": c.waits,
                "wait_s": round(c.wait_seconds, 3),
                "moved": c.moved,
            }
            for (backend, model), c in sorted(scheduler.cache_stats.items())
        ],
        "queue": {
            "waiting": queues.total,
            "limit": scheduler.queue_limit,
            "by_model": {
                model: {"waiting": count, "oldest_wait_s": round(oldest.get(model, 0.0), 3)}
                for model, count in sorted(queues.by_model.items())
            },
            "oldest_wait_s": round(max(oldest.values(), default=0.0), 3),
        },
        "active_leases": len(scheduler.grants),
        "tenants": {
            name or "-": {
                "weight": t.weight,
                "active": t.active,
                "fleet_active": t.external,
                "waiting": t.waiting,
                "granted": t.granted,
                "max_concurrent": t.max_concurrent,
                "max_queued": t.max_queued,
            }
            for name, t in sorted(scheduler.tenants.items())
        },
        "stats": dict(scheduler.stats),
    }


def index_sizes(scheduler: Scheduler) -> dict[str, int]:
    """How many entries each of the scheduler's indexes holds, dead heap entries included."""
    return {
        **scheduler.queues.sizes(),
        "grants": len(scheduler.grants),
        "sessions": len(scheduler.sessions),
        "backends_free": len(scheduler.table.free),
    }


def _rounded(value: float | None, scale: float) -> float | None:
    return None if value is None else round(value * scale, 3)
