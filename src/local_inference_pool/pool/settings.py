"""The configuration's settings as the scheduler holds them: the scheduler a configuration makes,
and a new configuration's settings and keys applied to a running one (a reload)."""

from __future__ import annotations

from collections.abc import Callable

from local_inference_pool.config import PoolConfig
from local_inference_pool.core.scheduler import Scheduler

__all__ = ["apply_settings", "scheduler_for"]


def scheduler_for(config: PoolConfig, clock: Callable[[], float]) -> Scheduler:
    scheduler = Scheduler(
        clock=clock,
        queue_limit=config.queue_limit,
        starvation_bound=config.starvation_bound,
        affinity=config.affinity,
        affinity_ttl=config.affinity_ttl,
        affinity_max_sessions=config.affinity_max_sessions,
        cache_wait_max=config.cache_wait_max,
        prefill_seconds_per_token=config.prefill_ms_per_token / 1000,
        prefix_min_tokens=config.prefix_min_tokens,
        prefix_index_blocks=config.prefix_index_blocks,
    )
    _declare_tenants(scheduler, config)
    return scheduler


def apply_settings(scheduler: Scheduler, old: PoolConfig, new: PoolConfig) -> None:
    """``new``'s scheduling settings and keys, on a scheduler made for ``old`` (its prefix index's
    size stays: it is allocated as it fills, and a smaller bound would have to evict)."""
    scheduler.configure(
        queue_limit=new.queue_limit,
        starvation_bound=new.starvation_bound,
        affinity=new.affinity,
        affinity_ttl=new.affinity_ttl,
        affinity_max_sessions=new.affinity_max_sessions,
        cache_wait_max=new.cache_wait_max,
        prefill_seconds_per_token=new.prefill_ms_per_token / 1000,
        prefix_min_tokens=new.prefix_min_tokens,
    )
    for name in _tenant_names(old) - _tenant_names(new):
        scheduler.undeclare_tenant(name)
    _declare_tenants(scheduler, new)


def _declare_tenants(scheduler: Scheduler, config: PoolConfig) -> None:
    for index in range(len(config.api_keys)):
        scheduler.set_tenant(f"api_keys[{index}]")
    for key in config.keys:
        scheduler.set_tenant(
            key.name, weight=key.weight, max_concurrent=key.max_concurrent, max_queued=key.max_queued
        )


def _tenant_names(config: PoolConfig) -> set[str]:
    return {f"api_keys[{index}]" for index in range(len(config.api_keys))} | {k.name for k in config.keys}
