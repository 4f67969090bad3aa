"""Health: active probes in the app's lifespan, and passive health from real traffic.

``Monitor.run`` starts one poll loop per backend, so a slow or dead one delays no other. Each probe
is bounded by ``health_timeout``, detects the kind of an ``auto`` backend once (and logs it), and asks
that kind's adapter. A loop never raises: a poller that raised would tear down the lifespan's task
group and the shared client while the server keeps serving. While a backend is unhealthy its probes
back off exponentially up to eight intervals.

Traffic reports to the same monitor: a refused connection takes the backend out until its next good
probe; connection failures, 5xx answers and streams that die midway count toward its circuit breaker
(``circuit.py``); a read timeout on one long generation counts for nothing.

The health the scheduler sees combines both: the probe's verdict, and when that is healthy, the
circuit's (open: unhealthy; half-open: healthy for one trial request at a time). Every transition is
logged once and shown in the pool's snapshot.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus

from local_inference_pool.config import BackendConfig, PoolConfig
from local_inference_pool.core.circuit import Circuit, CircuitState
from local_inference_pool.core.scheduler import Health
from local_inference_pool.model_config import ModelNames
from local_inference_pool.upstream.backends import DetectedKind, Snapshot, detect, probe
from local_inference_pool.upstream.backends.openai import describe_http_error

__all__ = ["BackendSink", "Monitor", "probe_once"]

logger = logging.getLogger(__name__)
MAX_BACKOFF = 8


class BackendSink(Protocol):
    """Where the monitor's verdicts go: the pool, which the upstream layer does not import."""

    def update_backend(
        self,
        name: str,
        *,
        slots: int | None = None,
        models: Iterable[str] | None = None,
        resident: Sequence[str] | None = None,
        health: Health | None = None,
        server_busy: int | None = None,
        trial: bool | None = None,
        context: int | None = None,
        probed_at: float | None = None,
    ) -> None: ...

    def annotate(self, name: str, **info: Any) -> None: ...


@dataclass
class _Watched:
    config: BackendConfig
    circuit: Circuit
    kind: DetectedKind | None = None
    probed: Health = Health.LOADING
    effective: Health | None = None
    trial: bool = False
    unhealthy_probes: int = 0
    error: str | None = None
    slot_warning: bool = field(default=False, repr=False)


async def probe_once(
    client: httpx.AsyncClient, backend: BackendConfig, kind: DetectedKind | None, timeout: float
) -> tuple[DetectedKind | None, Snapshot]:
    """Detect the kind when not known, then probe; never raises. Bounded by ``timeout`` in all."""
    try:
        with anyio.fail_after(timeout):
            if kind is None:
                kind = await detect(client, backend)
            return kind, await probe(client, backend, kind)
    except TimeoutError:
        return kind, Snapshot(Health.UNHEALTHY, error=f"no answer within {timeout:g}s")
    except (httpx.HTTPError, ValueError, OSError) as exc:
        return kind, Snapshot(Health.UNHEALTHY, error=describe_http_error(exc))
    except Exception as exc:  # an answer of a shape no adapter expects: never let a poller die
        logger.debug("probe of %s failed", backend.name, exc_info=True)
        return kind, Snapshot(Health.UNHEALTHY, error=f"unexpected answer: {type(exc).__name__}: {exc}")


class Monitor:
    def __init__(
        self,
        pool: BackendSink,
        client: httpx.AsyncClient,
        config: PoolConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.client = client
        self.config = config
        self.clock = clock
        self._watched: dict[str, _Watched] = {}
        self._polls: dict[str, anyio.CancelScope] = {}
        self._group: TaskGroup | None = None
        for backend in config.backends:
            self._watch(backend)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Probe every watched backend, and those watched later; until cancelled. The task group
        outlives its polls: every backend may leave (removed at runtime) and others join after."""
        async with anyio.create_task_group() as group:
            self._group = group
            for name in self._watched:
                self._start(name)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._group = None

    def watch(self, backend: BackendConfig) -> None:
        """Probe a backend that joined the pool (or probe anew one whose configuration changed)."""
        self.forget(backend.name)
        self._watch(backend)
        if self._group is not None:
            self._start(backend.name)

    def forget(self, name: str) -> None:
        """Stop probing a backend that left the pool; what traffic says of it is ignored from now."""
        self._watched.pop(name, None)
        poll = self._polls.pop(name, None)
        if poll is not None:
            poll.cancel()

    def _canonical(self, name: str, kind: str, ids: Sequence[str] | None) -> list[str] | None:
        """A server's model ids as the pool names them (``[[models]] serve_as``)."""
        if ids is None:
            return None
        if not any(model.serve_as for model in self.config.models):
            return list(ids)
        names = ModelNames(self.config.models)
        return [names.canonical(name, kind, id_) for id_ in ids]

    def _watch(self, backend: BackendConfig) -> None:
        self._watched[backend.name] = _Watched(
            config=backend,
            circuit=Circuit(threshold=self.config.circuit_failures, cooldown=self.config.circuit_cooldown),
            kind=None if backend.kind == "auto" else backend.kind,
        )

    def _start(self, name: str) -> None:
        assert self._group is not None
        scope = self._polls[name] = anyio.CancelScope()
        self._group.start_soon(self._poll, name, scope)

    # --- passive health, from the proxy ----------------------------------------------------

    def unreachable(self, name: str, reason: str) -> None:
        """A connection was refused or could not be made: out until a probe finds it again."""
        watched = self._watched.get(name)
        if watched is None:
            return  # it left the pool while the request ran
        watched.probed = Health.UNHEALTHY
        watched.error = reason
        watched.circuit.record_failure(self.clock())
        self._apply(name)

    def failed(self, name: str, reason: str) -> None:
        """A 5xx answer or a stream that died: counts toward the circuit breaker."""
        watched = self._watched.get(name)
        if watched is None:
            return
        watched.error = reason
        if watched.circuit.record_failure(self.clock()):
            logger.warning(
                "backend %s: circuit open after %d failures (%s)", name, watched.circuit.failures, reason
            )
        self._apply(name)

    def succeeded(self, name: str) -> None:
        watched = self._watched.get(name)
        if watched is None:
            return
        circuit = watched.circuit
        if circuit.state is CircuitState.CLOSED and not circuit.failures:
            return  # the common case, on every request: nothing changes, so nothing to apply
        if circuit.record_success():
            logger.info("backend %s: circuit closed, a trial request succeeded", name)
        self._apply(name)

    # --- active health ---------------------------------------------------------------------

    async def _poll(self, name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await self._poll_until_forgotten(name)

    async def _poll_until_forgotten(self, name: str) -> None:
        watched = self._watched[name]
        while self._watched.get(name) is watched:
            began = self.clock()
            snapshot = await self._probe(watched)
            watched.probed = snapshot.health
            watched.error = snapshot.error if snapshot.health is not Health.HEALTHY else watched.error
            try:
                self._apply(name, snapshot, began)
            except KeyError:
                return  # the backend was removed from the pool
            except Exception:
                logger.exception("applying a probe of %s failed", name)
            watched.unhealthy_probes = (
                watched.unhealthy_probes + 1 if snapshot.health is Health.UNHEALTHY else 0
            )
            interval = self.config.health_interval * min(2**watched.unhealthy_probes, MAX_BACKOFF)
            if watched.circuit.state is CircuitState.OPEN:
                interval = min(interval, max(0.0, watched.circuit.open_until - self.clock()))
            await anyio.sleep(interval * random.uniform(0.9, 1.1))

    async def _probe(self, watched: _Watched) -> Snapshot:
        backend = watched.config
        kind, snapshot = await probe_once(self.client, backend, watched.kind, self.config.health_timeout)
        if watched.kind is None and kind is not None:
            watched.kind = kind
            logger.info("backend %s (%s) detected as %s", backend.name, backend.url, kind)
            self.pool.annotate(backend.name, detected_kind=kind)
        return snapshot

    def _apply(self, name: str, snapshot: Snapshot | None = None, began: float | None = None) -> None:
        watched = self._watched[name]
        circuit = watched.circuit.current(self.clock())
        effective = watched.probed
        if effective is Health.HEALTHY and circuit is CircuitState.OPEN:
            effective = Health.UNHEALTHY
        trial = effective is Health.HEALTHY and circuit is CircuitState.HALF_OPEN
        if snapshot is not None and snapshot.health is Health.HEALTHY:
            if (
                watched.kind in ("ollama", "vllm", "openai")
                and watched.config.slots is None
                and not watched.slot_warning
            ):
                watched.slot_warning = True
                logger.warning(
                    "backend %s (%s) does not report its slot count: set slots in its config (counting 1)",
                    name,
                    watched.kind,
                )
            self.pool.update_backend(
                name,
                health=effective,
                trial=trial,
                slots=snapshot.slots,
                models=self._canonical(name, watched.kind or "auto", snapshot.models),
                resident=self._canonical(name, watched.kind or "auto", snapshot.resident),
                server_busy=snapshot.busy,
                context=snapshot.context,
                probed_at=began,
            )
            if snapshot.loads_models:
                self.pool.annotate(name, loads_models=True)
            if snapshot.model_info is not None:
                ids = list(snapshot.model_info)
                named = self._canonical(name, watched.kind or "auto", ids) or ids
                self.pool.annotate(
                    name, model_info=dict(zip(named, snapshot.model_info.values(), strict=True))
                )
        else:
            self.pool.update_backend(name, health=effective, trial=trial)
        if effective is not watched.effective or trial is not watched.trial:
            state = f"{effective.value}{' (one trial request)' if trial else ''}"
            log = logger.info if effective is Health.HEALTHY else logger.warning
            log(
                "backend %s is %s%s", name, state, f": {watched.error}" if watched.error and not trial else ""
            )
            watched.effective, watched.trial = effective, trial
        self.pool.annotate(
            name,
            circuit=circuit.value,
            consecutive_failures=watched.circuit.failures,
            circuit_openings=watched.circuit.openings,
            last_error=watched.error,
        )
