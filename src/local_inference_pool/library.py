"""The library's ``Pool``: the lease pool, and the two calls that talk to the servers themselves.

``pool.leases.Pool`` counts slots and speaks no HTTP (the pool and upstream layers are independent).
A library user also wants to ask each server for its models and to warm a model up before timed
work; both send requests through the upstream adapters, so they live here, in the outer ring,
where both layers may be imported.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager

import anyio
import httpx

from local_inference_pool.config import BackendConfig
from local_inference_pool.core.model import Health, LeaseRequest
from local_inference_pool.pool import Pool as LeasePool
from local_inference_pool.upstream.backends.openai import (
    REQUEST_ERRORS,
    client_or,
    describe_http_error,
    list_models,
    warm,
)

__all__ = ["Pool"]


class Pool(LeasePool):
    """Slot accounting for a fleet of inference servers, with model discovery and warm-up."""

    async def refresh_models(self, client: httpx.AsyncClient | None = None) -> dict[str, str | None]:
        """Ask every backend without a configured model list for ``/v1/models``.

        Returns each backend's error text (None when it answered). A failed probe keeps the models
        known before, so one bad answer never fails queued requests.
        """
        errors: dict[str, str | None] = {}

        async def probe(http: httpx.AsyncClient, backend: BackendConfig) -> None:
            try:
                models = await list_models(http, backend.url, backend.api_key)
            except REQUEST_ERRORS as exc:
                errors[backend.name] = describe_http_error(exc)
                return
            errors[backend.name] = None
            if backend.name in self.backends:
                self.update_backend(backend.name, models=models)

        async with self._client(client) as http, anyio.create_task_group() as group:
            for backend in self.backends.configs():
                if backend.models is None:
                    group.start_soon(probe, http, backend)
        return errors

    async def warmup(
        self,
        model: str,
        backends: int = 1,
        *,
        client: httpx.AsyncClient | None = None,
        prompt: str = "Respond with only 'pong'",
    ) -> dict[str, str | None]:
        """Send a one-token completion to ``backends`` backends serving ``model``, each through a slot.

        Run it before timed work so that the model load is not measured. Backends where the model
        is already loaded are chosen first. Returns each warmed backend's error text (None: warm).
        """
        results: dict[str, str | None] = {}

        async def warm_one(http: httpx.AsyncClient, name: str) -> None:
            try:
                lease = await self.acquire(LeaseRequest(model, timeout=None, pin=name))
            except Exception as exc:
                results[name] = str(exc)
                return
            try:
                await warm(http, lease.url, lease.api_key, model, prompt)
            except REQUEST_ERRORS as exc:
                results[name] = describe_http_error(exc)
            else:
                results[name] = None
                self.backends.note_warm(name, model, time.time())
            finally:
                lease.release()

        async with self._client(client) as http, anyio.create_task_group() as group:
            for name in self.warm_candidates(model)[:backends]:
                group.start_soon(warm_one, http, name)
        return results

    def warm_candidates(self, model: str) -> list[str]:
        """The backends that serve ``model`` and are not down, best to warm first: where the model
        is loaded already, then the least loaded."""
        serving = [
            b
            for b in self.scheduler.backends.values()
            if b.models is not None and model in b.models and b.health is not Health.UNHEALTHY
        ]
        serving.sort(key=lambda b: (b.needs_load(model), b.load_ratio, b.index))
        return [b.name for b in serving]

    def _client(self, client: httpx.AsyncClient | None) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        return client_or(
            client, connect_timeout=self.config.connect_timeout, read_timeout=self.config.read_timeout
        )
