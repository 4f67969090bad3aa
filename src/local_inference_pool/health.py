"""Health polling, run in the app's lifespan: one loop per backend, so a slow one delays no other.

Each probe is bounded by ``health_timeout``; a loop never raises (a poller that raised would tear down
the lifespan's task group and the shared client while the server keeps serving). Transitions are
logged once, not every poll. While a backend is unhealthy its probes back off exponentially up to
eight intervals.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from local_inference_pool.backends.openai import auth_headers, list_models
from local_inference_pool.config import BackendConfig, PoolConfig
from local_inference_pool.pool import Pool, describe_http_error
from local_inference_pool.scheduler import Health

__all__ = ["Probe", "poll_backends", "probe_backend"]

logger = logging.getLogger(__name__)
MAX_BACKOFF = 8


@dataclass(frozen=True)
class Probe:
    health: Health
    slots: int | None = None
    models: list[str] | None = None
    error: str | None = None


async def probe_backend(client: httpx.AsyncClient, backend: BackendConfig) -> Probe:
    """llama.cpp-style ``/health`` (503 while loading) and ``/props``; ``/v1/models`` for every kind."""
    headers = auth_headers(backend.api_key)
    slots: int | None = None
    if backend.kind in ("auto", "llamacpp"):
        response = await client.get(f"{backend.url}/health", headers=headers)
        if response.status_code == 503:
            return Probe(Health.LOADING, error="loading (503 from /health)")
        if response.status_code != 404:
            response.raise_for_status()
        if backend.slots is None:
            props = await client.get(f"{backend.url}/props", headers=headers)
            if props.status_code == 200:
                slots = _total_slots(props.json())
    models = await list_models(client, backend.url, backend.api_key)
    return Probe(Health.HEALTHY, slots=slots, models=models)


def _total_slots(props: Any) -> int | None:
    value = props.get("total_slots") if isinstance(props, dict) else None
    return value if isinstance(value, int) and value > 0 else None


async def poll_backends(
    pool: Pool,
    client: httpx.AsyncClient,
    config: PoolConfig,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with anyio.create_task_group() as group:
        for backend in config.backends:
            group.start_soon(_poll_one, pool, client, config, backend)
        task_status.started()


async def _poll_one(
    pool: Pool, client: httpx.AsyncClient, config: PoolConfig, backend: BackendConfig
) -> None:
    previous: Health | None = None
    failures = 0
    while True:
        try:
            with anyio.fail_after(config.health_timeout):
                probe = await probe_backend(client, backend)
        except TimeoutError:
            probe = Probe(Health.UNHEALTHY, error=f"no answer within {config.health_timeout:g}s")
        except (httpx.HTTPError, ValueError, OSError) as exc:
            probe = Probe(Health.UNHEALTHY, error=describe_http_error(exc))
        try:
            pool.update_backend(backend.name, health=probe.health, slots=probe.slots, models=probe.models)
        except KeyError:
            return  # the backend was removed
        except Exception:
            logger.exception("applying a probe of %s failed", backend.name)
        if probe.health is not previous:
            log = logger.info if probe.health is Health.HEALTHY else logger.warning
            log(
                "backend %s is %s%s",
                backend.name,
                probe.health.value,
                f": {probe.error}" if probe.error else "",
            )
            previous = probe.health
        failures = failures + 1 if probe.health is Health.UNHEALTHY else 0
        interval = (
            config.health_interval * min(2**failures, MAX_BACKOFF) if failures else config.health_interval
        )
        await anyio.sleep(interval * random.uniform(0.9, 1.1))
