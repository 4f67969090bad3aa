"""The placement driver: does what ``core/residency.py`` decides, on the servers that load on request.

It runs in the app's lifespan when some ``[[models]]`` entry has ``preload``, ``idle_unload`` or
``load_after``. Four times a second it:

1. finds the *managed* backends: those whose probe found a server that loads and unloads on
   request (llama.cpp's router, Ollama, LM Studio);
2. with shared state, reads which of them other processes are changing (their load locks) and
   marks those models as changing in the scheduler, as it marks its own;
3. asks ``Residency`` what to do, and starts each load or unload in a task of its own.

A change takes the server's lock (fleet-wide with shared state), marks its models as changing (a
loading model takes no request, and holds a place in the drain guard), calls the server
(``upstream/model_control.py``), bounded by ``LOAD_TIMEOUT``, records the new residency in the pool
(a probe that started before it cannot undo it), and is counted, logged and timed. A load's time is
learned per server and model, and weighs the next decision.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus

from local_inference_pool.config import PoolConfig
from local_inference_pool.core.residency import Drain, Load, Residence, Residency, Undrain, Unload
from local_inference_pool.errors import StateUnavailableError
from local_inference_pool.upstream import model_control

if TYPE_CHECKING:
    from local_inference_pool.gateway.runtime import Runtime
    from local_inference_pool.pool.load_locks import LoadLocks

__all__ = ["ModelPlacer", "residences"]

logger = logging.getLogger(__name__)

TICK = 0.25  # seconds between looks
LOAD_TIMEOUT = 600.0  # seconds a load may take (a large model from a slow disk), an unload too
LOCK_SLACK = 30.0  # the lock outlives the change's own bound by this much
CHANGING = ("loading", "unloading")


def residences(config: PoolConfig) -> dict[str, Residence]:
    """What each ``[[models]]`` entry asks of where it lives (only those that ask anything)."""
    return {
        model.name: Residence(model.preload, model.idle_unload, model.load_after)
        for model in config.models
        if model.places
    }


class ModelPlacer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._config = runtime.config
        self.residency = Residency(runtime.pool.scheduler.clock, residences(runtime.config))
        # redis, when used: imported as the lifespan starts, not with the app
        from local_inference_pool.pool.load_locks import LocalLoadLocks, RedisLoadLocks

        self.locks: LoadLocks = (
            LocalLoadLocks() if runtime.config.state is None else RedisLoadLocks(runtime.config.state)
        )
        self._own: dict[str, dict[str, str]] = {}  # backend -> models this process is changing there
        self._others: dict[str, dict[str, str]] = {}  # backend -> what other processes change there
        self._known: set[str] = set()  # backends seen, to forget those that left

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; idle while no model asks for placement."""
        task_status.started()
        try:
            async with anyio.create_task_group() as group:
                while True:
                    await self._look(group)
                    await anyio.sleep(TICK)
        finally:
            with anyio.CancelScope(shield=True):
                await self.locks.aclose()

    async def _look(self, group: TaskGroup) -> None:
        pool = self.runtime.pool
        if self.runtime.config is not self._config:
            self._config = self.runtime.config
            self.residency.configure(residences(self._config))
        present = {config.name for config in pool.backends.configs()}
        for gone in self._known - present:
            self.residency.forget(gone)
            self.locks.forget(gone)
            self._own.pop(gone, None)
            self._others.pop(gone, None)
        self._known = present
        managed = sorted(
            name
            for name in present
            if pool.backends.loads_models(name) and pool.backends.kind(name) in model_control.KINDS
        )
        placed = frozenset(self.residency.residences)
        pool.placing.place_models(placed, set(managed))
        if not placed:
            return
        try:
            self._others = await self.locks.changing(managed)
        except StateUnavailableError as exc:
            # No change is decided while other processes' changes cannot be seen, and none of
            # theirs is assumed to go on: a mark that outlived its change would hold a server.
            logger.debug("placement waits for the shared state store: %s", exc)
            self._others = {}
            for name in managed:
                self._mark(name)
            return
        for name in managed:
            for model, state in self._others.get(name, {}).items():
                if state in ("loaded", "unloaded"):  # another process's change, just made
                    pool.placing.set_resident(
                        name, **{"add" if state == "loaded" else "drop": model}, since=False
                    )
            self._mark(name)
        for action in self.residency.decide(pool.scheduler, managed):
            self.residency.began(action)
            if isinstance(action, Drain):  # at once: the load follows once what runs there ends
                logger.info(
                    "backend %s: reserved for model %s (its queue waits)", action.backend, action.model
                )
                pool.placing.reserve(action.backend, action.model)
            elif isinstance(action, Undrain):
                logger.info("backend %s: reservation for model %s lifted", action.backend, action.model)
                pool.placing.reserve(action.backend, action.model, lift=True)
            else:
                group.start_soon(self._change, action)

    def _mark(self, backend: str) -> None:
        """The scheduler's ``changing`` for the backend: this process's changes and others'."""
        pool = self.runtime.pool
        others = {m: state for m, state in self._others.get(backend, {}).items() if state in CHANGING}
        wanted = {**others, **self._own.get(backend, {})}
        current = pool.scheduler.backends.get(backend)
        if current is not None and not current.removed and current.changing != wanted:
            pool.override_backend(backend, changing=wanted)

    async def _change(self, action: Load | Unload) -> None:
        """Carry one decision out; never raises (a failed change is logged and counted)."""
        backend, model = action.backend, action.model
        marks = {model: "loading" if isinstance(action, Load) else "unloading"}
        evict = action.evict if isinstance(action, Load) else None
        if evict is not None:
            marks[evict] = "unloading"
        ok = False
        token = None
        try:
            token = await self.locks.acquire(backend, model, marks[model], LOAD_TIMEOUT + LOCK_SLACK)
            if token is None:
                return  # another process is changing this server: its lock shows what
            self._own[backend] = marks
            self._mark(backend)
            with anyio.fail_after(LOAD_TIMEOUT):
                if evict is not None:
                    await self._unload(backend, evict, "room")
                if isinstance(action, Load):
                    await self._load(action)
                else:
                    await self._unload(backend, model, action.reason)
            ok = True
        except (model_control.ModelControlError, StateUnavailableError, TimeoutError, OSError) as exc:
            self._failed(action, str(exc) or type(exc).__name__)
        except Exception as exc:  # an answer of a shape nobody expects: never let the driver die
            logger.debug("placement change failed", exc_info=True)
            self._failed(action, f"{type(exc).__name__}: {exc}")
        finally:
            with anyio.CancelScope(shield=True):
                self._own.pop(backend, None)
                if backend in self.runtime.pool.backends:
                    self._mark(backend)
                if token is not None:
                    result = None if not ok else "loaded" if isinstance(action, Load) else "unloaded"
                    await self.locks.release(backend, token, result, self._settle())
                seconds = self.residency.ended(action, ok=ok, tried=token is not None)
                if ok and isinstance(action, Load):
                    logger.info(
                        "backend %s: loaded model %s in %.1fs (%s)", backend, model, seconds, action.reason
                    )

    def _settle(self) -> float:
        """How long a change's result stays beside its lock: until every process's probe has
        seen the server since (a probe's interval and its bound, twice)."""
        config = self.runtime.config
        return 2 * (config.health_interval + config.health_timeout)

    async def _load(self, action: Load) -> None:
        runtime = self.runtime
        config = next(c for c in runtime.pool.backends.configs() if c.name == action.backend)
        kind = runtime.pool.backends.kind(action.backend)
        model_id = runtime.model_names.upstream_id(action.model, action.backend, kind)
        keep = self.residency.residences.get(action.model, Residence()).idle_unload is not None
        logger.info("backend %s: loading model %s (%s)", action.backend, action.model, action.reason)
        await model_control.load(runtime.client, config, kind, model_id, keep=keep)
        runtime.pool.placing.set_resident(action.backend, add=action.model)
        runtime.metrics.model_change(action.backend, action.model, "load", action.reason, "ok")

    async def _unload(self, backend: str, model: str, reason: str) -> None:
        runtime = self.runtime
        config = next(c for c in runtime.pool.backends.configs() if c.name == backend)
        kind = runtime.pool.backends.kind(backend)
        model_id = runtime.model_names.upstream_id(model, backend, kind)
        logger.info("backend %s: unloading model %s (%s)", backend, model, reason)
        await model_control.unload(runtime.client, config, kind, model_id)
        runtime.pool.placing.set_resident(backend, drop=model)
        runtime.metrics.model_change(backend, model, "unload", reason, "ok")

    def _failed(self, action: Load | Unload, why: str) -> None:
        verb = "load" if isinstance(action, Load) else "unload"
        logger.warning("backend %s: could not %s model %s: %s", action.backend, verb, action.model, why)
        self.runtime.metrics.model_change(action.backend, action.model, verb, action.reason, "failed")
