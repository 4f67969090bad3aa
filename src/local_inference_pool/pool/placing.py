"""The pool's side of placement (``[[models]]`` preload, idle_unload, load_after): what the
placement driver changes in the pool, and which probes may no longer undo it.

The driver loads and unloads models over HTTP (``gateway/model_placer.py``); the decisions are
``core/residency.py``'s. This applies their outcome to the scheduler and hands on what that makes
possible, and remembers when each backend's residency was last set by the pool: a probe that began
before then read the server before the change, so its word on what is loaded is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from local_inference_pool.core.residency import place_models, reserve, unreserve
from local_inference_pool.core.scheduler import Scheduler

__all__ = ["Placing"]


class Placing:
    def __init__(self, scheduler: Scheduler, clock: Callable[[], float], deliver: Callable[[], None]) -> None:
        """``deliver``: the pool's hand-off of the scheduler's events, after every change here."""
        self._scheduler = scheduler
        self._clock = clock
        self._deliver = deliver
        self._set_at: dict[str, float] = {}  # backend -> when the pool last loaded or unloaded there

    def stale(self, name: str, probed_at: float | None) -> bool:
        """Whether a probe that began at ``probed_at`` predates the pool's last change there."""
        return probed_at is not None and probed_at < self._set_at.get(name, -math.inf)

    def forget(self, name: str) -> None:
        self._set_at.pop(name, None)

    def set_resident(
        self, name: str, *, add: str | None = None, drop: str | None = None, since: bool = True
    ) -> None:
        """The pool loaded ``add`` or unloaded ``drop`` on the backend: what it has loaded now,
        until a probe that began after this says otherwise (``since``: from now; else a probe may
        say so at once: another process's change, seen late)."""
        backend = self._scheduler.backends.get(name)
        if backend is None or backend.removed:
            return
        if (add is not None and backend.resident[:1] == [add]) or (
            drop is not None and drop not in backend.resident
        ):
            return  # known already
        resident = [model for model in backend.resident if model not in (add, drop)]
        if since:
            self._set_at[name] = self._clock()
        self._scheduler.update_backend(name, resident=[add, *resident] if add is not None else resident)
        self._deliver()

    def reserve(self, name: str, model: str, *, lift: bool = False) -> None:
        """Drain the backend for ``model`` until it gets a slot there (the first step toward
        loading it in place of what runs there now); ``lift``: no more."""
        (unreserve if lift else reserve)(self._scheduler, name, model)
        self._deliver()

    def place_models(self, models: frozenset[str], managed: set[str]) -> None:
        """The models the pool loads itself, on the backends that load on request (``managed``):
        there each goes only where it is loaded. A no-op when nothing changed."""
        if place_models(self._scheduler, models, managed):
            self._deliver()
