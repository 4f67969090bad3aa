"""The ``local-inference-pool`` v0.7 API, rebuilt on the scheduler so existing code keeps working.

::

    pool = ServerPool(["http://gpu0:1234", "http://gpu1:1234"])
    await pool.refresh_all_manifests()
    dispatcher = ConcurrentDispatcher(pool)
    url = await dispatcher.submit("qwen2.5-7b")
    try:
        ...  # your own HTTP call to url
    finally:
        pool.release_server(url)

Where it differs from v0.7, on purpose:
- every ``submit``/``find_and_acquire`` holds a real lease, and ``release_server(url)`` releases one
  of them; an extra release is logged and ignored instead of silently hiding a double release;
- a submit cancelled or timed out at any point never leaks a slot (v0.7 could, on Python 3.11);
- waiting requests for a second model are served in bounded time (``starvation_bound``) instead of
  starving behind a busy first model;
- any write that adds capacity (``max_concurrent``, ``available_models``, a release) wakes waiters
  at once; v0.7 only woke them on a release.
- ``ServerConfig`` fields stay plain and writable; once the config is in a ``ServerPool`` a write
  reaches the scheduler. ``current_model`` reports the model with leases in flight (None when
  drained); writing it tells the pool which model the server has loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, SupportsIndex

import anyio
import anyio.lowlevel
import httpx

from local_inference_pool.config import BACKEND_KINDS, BackendConfig, BackendKind, PoolConfig, normalize_url
from local_inference_pool.core.scheduler import Backend, Health
from local_inference_pool.errors import ModelNotFoundError, NoCapacityError, QueueTimeoutError
from local_inference_pool.library import Pool
from local_inference_pool.pool.leases import Lease
from local_inference_pool.upstream.backends.openai import describe_http_error, list_models

__all__ = [
    "ConcurrentDispatcher",
    "DispatcherTimeoutError",
    "InferenceTask",
    "ModelNotAvailableError",
    "NoModelsAvailableError",
    "ServerConfig",
    "ServerPool",
]

logger = logging.getLogger(__name__)

ERROR_COOLDOWN = 30.0  # seconds a server reported failed stays out, unless a refresh succeeds first


class NoModelsAvailableError(RuntimeError):
    """All server manifests are empty: auth, connectivity, or no models loaded."""


class ModelNotAvailableError(ValueError):
    """The requested model is not on any server with a populated manifest."""


class DispatcherTimeoutError(TimeoutError):
    """Timed out waiting for a server slot."""


class _ModelList(list[str]):
    """A list that tells its owner when it changes, so in-place edits take effect too."""

    def __init__(self, items: Iterable[str], on_change: Callable[[], None]) -> None:
        super().__init__(items)
        self._on_change = on_change

    def _changed(self, result: Any = None) -> Any:
        self._on_change()
        return result

    def append(self, item: str) -> None:
        self._changed(super().append(item))

    def extend(self, items: Iterable[str]) -> None:
        self._changed(super().extend(items))

    def insert(self, index: SupportsIndex, item: str) -> None:
        self._changed(super().insert(index, item))

    def remove(self, item: str) -> None:
        self._changed(super().remove(item))

    def pop(self, index: SupportsIndex = -1) -> str:
        return str(self._changed(super().pop(index)))

    def clear(self) -> None:
        self._changed(super().clear())

    def __setitem__(self, index: Any, value: Any) -> None:
        self._changed(super().__setitem__(index, value))

    def __delitem__(self, index: Any) -> None:
        self._changed(super().__delitem__(index))

    def __iadd__(self, items: Iterable[str]) -> _ModelList:  # type: ignore[override,misc]
        super().__iadd__(items)
        return self._changed(self)  # type: ignore[no-any-return]


class ServerConfig:
    """Per-server state, as in v0.7. Writable; a write reaches the pool once the config is in one."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        server_type: str = "auto",
        available_models: Iterable[str] = (),
        active_requests: int = 0,
        max_concurrent: int = 1,
        current_model: str | None = None,
        last_refresh_error: str | None = None,
    ) -> None:
        self._pool: ServerPool | None = None
        self._backend: Backend | None = None
        self.url = url
        self.api_key = api_key
        self.server_type = server_type
        self._models = _ModelList(available_models, self._push_models)
        self._max_concurrent = max_concurrent
        self._external = active_requests
        self._current_model = current_model
        self.last_refresh_error = last_refresh_error

    @property
    def available_models(self) -> list[str]:
        return self._models

    @available_models.setter
    def available_models(self, models: Iterable[str]) -> None:
        self._models = _ModelList(models, self._push_models)
        self._push_models()

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        self._max_concurrent = value
        if self._pool is not None:
            self._pool._update(self, slots=max(1, value))

    @property
    def active_requests(self) -> int:
        """Slots in use: leases held through the pool plus any set by hand."""
        if self._backend is None:
            return self._external
        return self._backend.active_total + self._backend.external_busy

    @active_requests.setter
    def active_requests(self, value: int) -> None:
        if self._pool is None or self._backend is None:
            self._external = value
            return
        held = self._backend.active_total
        if value >= held:
            self._pool._update(self, external_busy=value - held)
        else:
            # v0.7 kept a bare counter: lowering it freed slots, so release that many leases.
            self._pool._update(self, external_busy=0)
            for _ in range(held - value):
                self._pool.release_server(self.url)

    @property
    def current_model(self) -> str | None:
        if self._backend is None:
            return self._current_model
        active = self._backend.active
        return next((m for m in self._backend.resident if m in active), next(iter(active), None))

    @current_model.setter
    def current_model(self, model: str | None) -> None:
        self._current_model = model
        if self._pool is not None and model is not None:
            self._pool._update(self, resident=[model])

    @property
    def is_busy(self) -> bool:
        return self.active_requests >= self.max_concurrent

    def _push_models(self) -> None:
        if self._pool is not None:
            self._pool._update(self, models=list(self._models))

    def __repr__(self) -> str:
        return (
            f"ServerConfig(url={self.url!r}, available_models={list(self.available_models)!r}, "
            f"active_requests={self.active_requests}, max_concurrent={self.max_concurrent}, "
            f"current_model={self.current_model!r}, last_refresh_error={self.last_refresh_error!r})"
        )


class ServerPool:
    """The v0.7 server pool: per-server state in ``servers`` (keyed by URL), slots by URL."""

    def __init__(self, servers: Iterable[str | ServerConfig], *, config: PoolConfig | None = None) -> None:
        entries = [ServerConfig(url=s) if isinstance(s, str) else s for s in servers]
        self.servers: dict[str, ServerConfig] = {entry.url: entry for entry in entries}
        self._names: dict[str, str] = {}  # any spelling of a server's URL -> backend name
        self._url_of: dict[str, str] = {}  # backend name -> the URL as the caller gave it
        backends = []
        for entry in entries:
            backend = BackendConfig(
                url=entry.url,
                kind=_kind(entry.server_type),
                slots=max(1, entry.max_concurrent),
                models=tuple(entry.available_models),
                api_key=entry.api_key,
            )
            backends.append(backend)
            self._names[entry.url] = self._names[backend.url] = backend.name
            self._url_of[backend.name] = entry.url
        # v0.7 had no queue limit and no default timeout: submit(timeout=...) decides.
        base = config or PoolConfig(queue_limit=1_000_000)
        self.pool = Pool(replace(base, backends=tuple(backends), queue_timeout=None))
        # url -> the leases held there, oldest first, each with the task that took it (None: taken
        # outside a task, by find_and_acquire from synchronous code)
        self._held: dict[str, deque[tuple[object | None, Lease]]] = {}
        for entry in entries:
            name = self._names[entry.url]
            entry._pool = self
            entry._backend = self.pool.scheduler.backends[name]
            if entry._external:
                self._update(entry, external_busy=entry._external)
            if entry._current_model is not None:
                self._update(entry, resident=[entry._current_model])
        self.resource_available = asyncio.Event()

    # --- manifests -------------------------------------------------------------------------

    async def __aenter__(self) -> ServerPool:
        """Not in v0.7: with ``config=PoolConfig(state=...)`` the pool must be entered, so that it
        connects to the shared store and renews its leases (``async with ServerPool(...) as pool``).
        Two programs entered on one store share their slots and the drain guard."""
        await self.pool.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.pool.__aexit__(None, None, None)

    async def refresh_all_manifests(self) -> None:
        """GET /v1/models on every server (with its key). Never raises: errors are stored."""
        async with (
            httpx.AsyncClient(timeout=10.0, trust_env=False) as client,
            anyio.create_task_group() as tg,
        ):
            for url in self.servers:
                tg.start_soon(self._refresh_manifest, client, url)

    async def _refresh_manifest(self, client: httpx.AsyncClient, url: str) -> None:
        server = self.servers[url]
        try:
            models = await list_models(client, normalize_url(url), server.api_key)
        except Exception as exc:
            server.last_refresh_error = describe_http_error(exc)
            logger.error("manifest refresh failed for %s: %s", url, server.last_refresh_error)
            server.available_models = []
            return
        server.last_refresh_error = None
        server.available_models = models
        self._update(server, health=Health.HEALTHY)
        logger.info("manifest refresh: %s has models %s", url, models)

    def get_all_available_models(self) -> set[str]:
        return {model for server in self.servers.values() for model in server.available_models}

    def get_server_url_by_index(self, idx: int) -> str | None:
        urls = list(self.servers)
        return urls[idx] if 0 <= idx < len(urls) else None

    # --- slots -----------------------------------------------------------------------------

    def find_and_acquire(self, model_id: str) -> str | None:
        """Take a slot for the model now, or return None. Synchronous: nothing can interleave.

        Not with shared state (``config=PoolConfig(state=...)``): a fleet-wide slot is claimed in
        the store, which takes a round trip; ``await ConcurrentDispatcher(pool).submit(model)`` does.
        """
        if self.pool.shared:
            raise RuntimeError(
                "find_and_acquire() cannot claim a slot in the shared state store synchronously; "
                "use 'await ConcurrentDispatcher(pool).submit(model)'"
            )
        lease = self.pool.try_acquire(model_id)
        return None if lease is None else self._hold(lease)

    def release_server(self, server_url: str) -> None:
        """Release one slot taken on this server: the calling task's own (its oldest), else the
        oldest. A URL cannot say whose slot it is; the task that took it can, so each request's
        lease ends with that request (its lease time and prompt-cache figures stay its own)."""
        url = self._url_key(server_url)
        held = self._held.get(url)
        if not held:
            logger.warning("release_server(%r): no slot is held on that server; ignored", server_url)
            return
        caller = _current_task()
        mine = next((entry for entry in held if caller is not None and entry[0] is caller), held[0])
        held.remove(mine)
        if not held:
            del self._held[url]
        mine[1].release()
        self.resource_available.set()

    def report_server_error(self, server_url: str, error: BaseException | str) -> None:
        """Mark a server failed; it gets no new work until a refresh succeeds or a cooldown passes.

        It does not release a slot: the caller's ``finally: release_server(url)`` does.
        """
        url = self._url_key(server_url)
        server = self.servers[url]
        server.last_refresh_error = error if isinstance(error, str) else describe_http_error(error)
        logger.warning("server %s reported failed: %s", url, server.last_refresh_error)
        self._update(server, health=Health.UNHEALTHY)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(ERROR_COOLDOWN, self._revive, server)

    def set_max_concurrent(self, max_concurrent: int) -> None:
        for server in self.servers.values():
            server.max_concurrent = max(1, max_concurrent)

    # --- internals -------------------------------------------------------------------------

    def _hold(self, lease: Lease) -> str:
        url = self._url_of[lease.backend]
        self._held.setdefault(url, deque()).append((_current_task(), lease))
        return url

    def _url_key(self, server_url: str) -> str:
        if server_url in self.servers:
            return server_url
        name = self._names.get(normalize_url(server_url))
        if name is not None:
            return self._url_of[name]
        raise KeyError(f"unknown server {server_url!r}; known: {', '.join(self.servers)}")

    def _update(self, server: ServerConfig, **changes: Any) -> None:
        self.pool.override_backend(self._names[server.url], **changes)

    def _revive(self, server: ServerConfig) -> None:
        backend = server._backend
        if backend is not None and not backend.removed and backend.health is Health.UNHEALTHY:
            self._update(server, health=Health.HEALTHY)


@dataclass(eq=False)
class InferenceTask:
    """A submit in progress: the model asked for and the future that gets the server URL."""

    model_id: str
    future: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ConcurrentDispatcher:
    """Waits for a slot and returns the server URL: ``url = await dispatcher.submit(model)``."""

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.pending: set[InferenceTask] = set()

    async def submit(self, model_id: str, timeout: float | None = 60.0) -> str:
        """Return the URL of a server with a slot taken for ``model_id``; release it when done.

        Fails at once with NoModelsAvailableError / ModelNotAvailableError (messages carry the
        servers' errors), or with DispatcherTimeoutError after ``timeout`` seconds (None: wait).
        """
        self._check_available(model_id)
        task = InferenceTask(model_id)
        self.pending.add(task)
        try:
            lease = await self.pool.pool.acquire(model_id, timeout=timeout)
        except QueueTimeoutError:
            raise DispatcherTimeoutError(
                f"Timed out waiting for server slot for '{model_id}' ({timeout}s)"
            ) from None
        except (ModelNotFoundError, NoCapacityError) as exc:
            raise ModelNotAvailableError(f"{exc.message}{self._server_errors()}") from None
        except BaseException:
            task.future.cancel()
            raise
        finally:
            self.pending.discard(task)
        try:
            # v0.7 callers cancel a submit right after scheduling it and rely on it giving nothing
            # back: until the caller resumes with the URL, a cancellation releases the slot.
            await anyio.lowlevel.checkpoint()
        except BaseException:
            lease.release()
            task.future.cancel()
            raise
        url = self.pool._hold(lease)
        task.future.set_result(url)
        return url

    def _check_available(self, model_id: str) -> None:
        all_models = self.pool.get_all_available_models()
        if not all_models:
            errors = sorted(
                {s.last_refresh_error for s in self.pool.servers.values() if s.last_refresh_error}
            )
            raise NoModelsAvailableError(
                f"No models available from any server ({'; '.join(errors) if errors else 'unknown'})"
            )
        if model_id not in all_models:
            raise ModelNotAvailableError(
                f"Model '{model_id}' not available on any server{self._server_errors()}"
            )

    def _server_errors(self) -> str:
        failed = {url: s.last_refresh_error for url, s in self.pool.servers.items() if s.last_refresh_error}
        return f"; servers with errors: {failed}" if failed else ""


def _kind(server_type: str) -> BackendKind:
    """v0.7's free-form server_type, mapped to a backend kind ('auto' when unrecognised)."""
    spelled = server_type.lower().replace(".", "").replace("-", "").replace("_", "")
    return next((kind for kind in BACKEND_KINDS if kind == spelled), "auto")


def _current_task() -> object | None:
    """The asyncio task running now, or None outside one."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
