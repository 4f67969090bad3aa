"""The backends the scheduler knows, and the indexes that find them fast.

For each model, the backends that list it (``serving``) and the backends that have it loaded
(``resident_on``); the backends with a free slot (``free``); how many backends have not yet said
which models they serve. Each index changes with the backend it describes and drops a model's
entry when its last backend goes, so it never holds more than the fleet.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from local_inference_pool.core.model import Backend, Health
from local_inference_pool.errors import ModelNotFoundError, NoCapacityError

__all__ = ["BackendTable"]


class BackendTable:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.serving: dict[str, set[Backend]] = {}
        self.resident_on: dict[str, set[Backend]] = {}
        self.free: set[Backend] = set()
        self._undiscovered = 0
        self._order = itertools.count()
        self.managed: set[str] = set()  # backends whose server loads and unloads on request
        self.placed_models: frozenset[str] = frozenset()  # the models the pool loads on those

    def add(
        self,
        name: str,
        url: str,
        *,
        slots: int,
        models: Iterable[str] | None,
        max_loaded_models: int,
        weight: float,
        health: Health,
        resident: Sequence[str],
        cache_tokens: int | None,
    ) -> Backend:
        if name in self.backends:
            raise ValueError(f"backend {name!r} already exists")
        backend = Backend(
            name=name,
            url=url,
            slots=slots,
            models=None,
            max_loaded_models=max_loaded_models,
            weight=weight,
            health=health,
            index=next(self._order),
            cache_tokens=cache_tokens,
        )
        self.backends[name] = backend
        self._undiscovered += 1  # models=None so far; set_models counts it discovered if given
        self.set_models(backend, None if models is None else frozenset(models))
        self.set_resident(backend, resident)
        backend.residency_known = bool(resident)
        self.touch(backend)
        return backend

    def place(self, models: frozenset[str], managed: set[str] | None = None) -> None:
        """The models the pool loads itself (``[[models]]`` with a residence), on the backends
        whose servers load and unload on request: there each goes only where it is loaded."""
        self.placed_models = models
        if managed is not None:
            self.managed = managed
        for backend in self.backends.values():
            backend.placed = models if backend.name in self.managed else frozenset()

    def remove(self, name: str) -> Backend:
        """Take a backend out of every index. Its grants stay valid; releasing them is harmless."""
        self.managed.discard(name)
        backend = self.backends.pop(name)
        self.set_models(backend, frozenset())
        self.set_resident(backend, ())
        backend.removed = True
        self.free.discard(backend)
        return backend

    def touch(self, backend: Backend) -> None:
        """Index the backend as free or not, after anything that may change its free slots."""
        if backend.free and backend.health is Health.HEALTHY and not backend.removed and not backend.draining:
            self.free.add(backend)
        else:
            self.free.discard(backend)

    def set_models(self, backend: Backend, models: frozenset[str] | None) -> None:
        if (backend.models is None) != (models is None):
            self._undiscovered += 1 if models is None else -1
        for model in backend.models or ():
            _drop(self.serving, model, backend)
        backend.models = models
        for model in models or ():
            self.serving.setdefault(model, set()).add(backend)

    def set_resident(self, backend: Backend, resident: Sequence[str]) -> list[str]:
        """Record what the backend has loaded; the models it no longer has (unloaded, or evicted:
        loaded beyond its capacity means the oldest idle ones went; active models stay)."""
        kept: list[str] = []
        for model in dict.fromkeys(resident):
            if len(kept) < backend.max_loaded_models or model in backend.active:
                kept.append(model)
        unloaded = [model for model in backend.resident if model not in kept]
        for model in backend.resident:
            _drop(self.resident_on, model, backend)
        backend.resident = kept
        for model in kept:
            self.resident_on.setdefault(model, set()).add(backend)
        return unloaded

    def free_serving(self, model: str) -> Iterable[Backend]:
        """The backends with a free slot that list the model (the smaller set is walked)."""
        serving = self.serving.get(model, set())
        free = self.free
        return (
            (b for b in free if b in serving)
            if len(free) <= len(serving)
            else (b for b in serving if b in free)
        )

    def alternative(self, model: str, avoid: Iterable[str]) -> str | None:
        """The backend to pin a retry to: healthy, serving ``model``, not in ``avoid``, not draining;
        one that can take the model now (drain guard) first, then one that has it loaded, then the
        least loaded."""
        excluded = set(avoid)
        others = [
            b
            for b in self.serving.get(model, ())
            if b.name not in excluded and b.health is Health.HEALTHY and not b.draining
        ]
        if not others:
            return None
        return min(
            others, key=lambda b: (not b.can_take(model), b.needs_load(model), b.load_ratio, b.index)
        ).name

    def discovery_pending(self) -> bool:
        """Whether a backend that may answer has not yet said which models it serves."""
        return self._undiscovered > 0 and any(
            b.models is None and b.health is not Health.UNHEALTHY for b in self.backends.values()
        )

    def check_servable(self, model: str, pin: str | None = None) -> None:
        """Raise when the model cannot be served now: unknown, or no healthy backend (waiting for
        discovery counts as servable)."""
        if pin is not None:
            backend = self.backends.get(pin)
            if backend is None:
                raise NoCapacityError(f"no backend named {pin!r}", model=model)
            if backend.models is not None and model not in backend.models:
                raise ModelNotFoundError(f"backend {pin!r} does not serve model {model!r}", model=model)
            if backend.health is Health.UNHEALTHY:
                raise NoCapacityError(f"backend {pin!r} is unhealthy; retry later", model=model)
            return
        serving = self.serving.get(model)
        if not serving:
            if self.discovery_pending():
                return  # a reachable backend's model list is not known yet: wait for discovery
            if not self.backends:
                raise NoCapacityError("the pool has no backends configured", model=model)
            known = sorted(self.serving)
            listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise ModelNotFoundError(
                f"model {model!r} is not served by any backend; available: {listed or 'none'}",
                model=model,
            )
        if all(b.health is Health.UNHEALTHY for b in serving):
            names = ", ".join(sorted(b.name for b in serving))
            raise NoCapacityError(
                f"no healthy backend for model {model!r} (unhealthy: {names}); retry later",
                model=model,
            )

    def healthy_slots_with(self, model: str) -> int:
        """Slots of healthy backends that have the model loaded."""
        return sum(b.slots for b in self.resident_on.get(model, ()) if b.health is Health.HEALTHY)


def _drop(index: dict[str, set[Backend]], model: str, backend: Backend) -> None:
    backends = index[model]
    backends.discard(backend)
    if not backends:
        del index[model]
