"""A configuration made real in the running pool: its settings from the next decision on, its
backends added, changed in place, drained or retired, and each one's runtime facts annotated.

One synchronous pass, so no request sees half of a change. ``gateway.changes`` decides what the
configuration is; this module only makes the pool match it.
"""

from __future__ import annotations

import time
from typing import Any

from local_inference_pool.config import BackendConfig, PoolConfig
from local_inference_pool.core.scheduler import Health
from local_inference_pool.gateway.overlay import Overlay
from local_inference_pool.gateway.retirements import Retirements
from local_inference_pool.gateway.runtime import Runtime

__all__ = ["annotate", "apply_fleet"]


def apply_fleet(
    runtime: Runtime, retirements: Retirements, wanted: PoolConfig, overlay: Overlay
) -> dict[str, list[str]]:
    """Make the running fleet what ``wanted`` says (``overlay``: what of it is a runtime change);
    the backends added, changed and removed, by name."""
    pool = runtime.pool
    pool.reconfigure(wanted)
    runtime.reconfigure(wanted)
    current = {backend.name: backend for backend in pool.backends.configs()}
    summary: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
    for name, backend in {b.name: b for b in wanted.backends}.items():
        old = current.pop(name, None)
        retirements.keep(name)
        if old is None:
            pool.add_backend(backend, health=Health.LOADING)
            runtime.monitor.watch(backend)
            summary["added"].append(name)
        elif backend != old:
            _change(runtime, old, backend)
            summary["changed"].append(name)
        retirements.set_draining(name, name in overlay.drained)
        annotate(runtime, name, overlay)
    for name in current:
        if not retirements.retiring(name):
            retirements.retire(name)
            summary["removed"].append(name)
    return summary


def annotate(runtime: Runtime, name: str, overlay: Overlay) -> None:
    """Where the backend comes from, for status: the config file, the admin API or a registration."""
    until = overlay.expires.get(name)
    runtime.pool.annotate(
        name,
        source=overlay.source(name),
        registered_until=None if until is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)),
        changed_at_runtime=sorted(overlay.patched.get(name, {})),
    )


def _change(runtime: Runtime, old: BackendConfig, new: BackendConfig) -> None:
    pool = runtime.pool
    pool.backends.add(new)  # its key and what detection may still set
    changes: dict[str, Any] = {
        "weight": new.weight,
        "max_loaded_models": new.max_loaded_models,
        "cache_tokens": new.cache_tokens,
    }
    if new.slots is not None:
        changes["slots"] = new.slots
    if new.models is not None:
        changes["models"] = new.models
    if new.url != old.url:
        changes.update(url=new.url, health=Health.LOADING)  # another server: probed anew
    pool.override_backend(new.name, **changes)
    probed = (new.url, new.kind, new.api_key, new.slots, new.models)
    if probed != (old.url, old.kind, old.api_key, old.slots, old.models):
        runtime.monitor.watch(new)  # what detection finds depends on these: probe again now
