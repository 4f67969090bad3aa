"""Where models live: which model to load on which server, and which to unload, decided for the fleet.

A view of the scheduler's state, like ``fitness``: ``Residency.decide`` reads the backends and the
queues and returns what to do (``Load``, ``Unload``); the caller does it (``gateway/model_placer.py``
over HTTP), says when each began and ended, and marks the backend's ``changing`` models so that the
scheduler sends nothing there that the change would hurt. Only *managed* backends are touched: the
servers whose kind can load and unload on request (llama.cpp's router, Ollama, LM Studio).

What each model's ``Residence`` asks for (``[[models]]``):

- ``preload``: loaded at start on the named backends (``True``: on whichever suits), and again
  after such a backend comes back from being unhealthy (a restart loses what it had loaded). Once
  the model has been seen loaded there and then leaves while the server stays up (an unload, its
  own or the pool's), it is not loaded there again: ``preload`` says where a model starts, not
  that it stays.
- ``idle_unload``: unloaded from a backend after that many seconds with no lease there (in any
  process of the fleet) and no request of its own waiting anywhere.
- a model with requests waiting and no replica is loaded for them (on a managed backend its
  requests go only where it is loaded, never into a load by request);
- ``load_after``: when a model's requests would wait longer than that for a slot, one more
  replica is loaded on a backend that serves it, into a free place (``max_loaded_models``) or in
  place of the least recently used idle model. The expected wait must also exceed what a load
  costs there (learned per backend and model from the loads timed so far), so the pool never
  swaps to save less than a swap costs. One load of a model at a time.

When no server has a free place or a model to give up, a server whose models are spared its loss
is reserved for the model (``Drain``: the scheduler's drain barrier), and loaded once what runs
there ends; a reservation the backlog no longer needs is lifted (``Undrain``).

One action at a time per backend, and none on a backend that is unhealthy, draining or already
changing (another process's load, seen through its lock).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from local_inference_pool.core.fitness import wait_on
from local_inference_pool.core.model import Backend, Health
from local_inference_pool.core.prompt_index import Ewma

if TYPE_CHECKING:
    from local_inference_pool.core.scheduler import Scheduler

__all__ = [
    "Drain",
    "Load",
    "Residence",
    "Residency",
    "Undrain",
    "Unload",
    "place_models",
    "reserve",
    "unreserve",
]

ANYWHERE = ""
RETRY_FIRST = 10.0  # seconds before a load that failed is tried again on that server; doubling
RETRY_MAX = 600.0  # the backend of a ``preload = true`` that has not been placed yet


@dataclass(frozen=True, slots=True)
class Residence:
    """What a model asks of where it lives (``[[models]]`` ``preload``, ``idle_unload``, ``load_after``)."""

    preload: tuple[str, ...] | bool = ()
    idle_unload: float | None = None
    load_after: float | None = None


class Load(NamedTuple):
    """Load ``model`` on ``backend``; unload ``evict`` there first when it is not None."""

    backend: str
    model: str
    reason: str  # "preload" or "demand"
    evict: str | None = None


class Unload(NamedTuple):
    backend: str
    model: str
    reason: str  # "idle"


class Drain(NamedTuple):
    """Reserve ``backend`` for ``model`` (the scheduler's drain barrier): it takes no request of
    another model, so what runs there ends and a later look can load ``model`` in its place."""

    backend: str
    model: str
    reason: str = "demand"


class Undrain(NamedTuple):
    """Lift ``backend``'s reservation for ``model``: its backlog no longer needs another replica."""

    backend: str
    model: str
    reason: str = "demand"


Action = Load | Unload | Drain | Undrain


class Residency:
    def __init__(self, clock: Callable[[], float], residences: Mapping[str, Residence]) -> None:
        self.clock = clock
        self.residences: dict[str, Residence] = {}
        self._busy: dict[str, tuple[Load | Unload, float]] = {}  # backend -> what it is doing, since when
        self._used: dict[tuple[str, str], float] = {}  # (backend, model) -> last seen in use or loaded
        self._load_seconds: dict[tuple[str, str], Ewma] = {}
        self._preloads: set[tuple[str, str]] = set()  # (backend or ANYWHERE, model) still to load
        self._preloaded: dict[str, str] = {}  # model of ``preload = true`` -> the backend it went to
        self._healthy: set[str] = set()  # backends healthy at the last look
        self._scheduler: Scheduler | None = None  # the one of the current look
        self._drained: dict[str, str] = {}  # backend -> the model it was reserved for (Drain)
        # (backend, model) -> (the pause after the last failed load, until when no load is tried)
        self._failed: dict[tuple[str, str], tuple[float, float]] = {}
        self.configure(residences, start=True)

    def configure(self, residences: Mapping[str, Residence], *, start: bool = False) -> None:
        """New residences; at start (or for a model whose ``preload`` changed), its preloads are due."""
        before = self.residences
        self.residences = dict(residences)
        for model, residence in self.residences.items():
            old = before.get(model)
            if not start and old is not None and old.preload == residence.preload:
                continue
            self._preloads = {(b, m) for b, m in self._preloads if m != model}
            if residence.preload is True:
                self._preloads.add((ANYWHERE, model))
            elif residence.preload:
                self._preloads.update((backend, model) for backend in residence.preload)
        self._preloads = {(b, m) for b, m in self._preloads if m in self.residences}

    # --- what the caller did ---------------------------------------------------------------

    def began(self, action: Action) -> None:
        """A load or an unload began; a (un)reservation is done at once: nothing follows it."""
        if isinstance(action, Drain):
            self._drained[action.backend] = action.model
        elif isinstance(action, Undrain):
            self._drained.pop(action.backend, None)
        else:
            self._busy[action.backend] = (action, self.clock())

    def ended(self, action: Action, *, ok: bool, tried: bool = True) -> float:
        """The action is over; a load that succeeded teaches its load time, one that failed
        (``tried``: the server was asked) is not tried there again for a while, doubling with
        each failure. Returns its seconds."""
        if isinstance(action, Drain | Undrain):
            return 0.0
        _, started = self._busy.pop(action.backend, (action, self.clock()))
        seconds = max(0.0, self.clock() - started)
        key = (action.backend, action.model)
        if isinstance(action, Load) and tried and not ok:
            pause = min(RETRY_MAX, 2 * self._failed.get(key, (RETRY_FIRST / 2, 0.0))[0])
            self._failed[key] = (pause, self.clock() + pause)
        elif ok:
            self._failed.pop(key, None)
        if ok and isinstance(action, Load):
            self._load_seconds.setdefault((action.backend, action.model), Ewma(weight=0.5)).add(seconds)
            self._used[(action.backend, action.model)] = self.clock()
            self._preloads.discard((action.backend, action.model))
            if (ANYWHERE, action.model) in self._preloads and action.reason == "preload":
                self._preloads.discard((ANYWHERE, action.model))
                self._preloaded[action.model] = action.backend
        return seconds

    def busy(self, backend: str) -> bool:
        return backend in self._busy

    def load_seconds(self, backend: str, model: str) -> float | None:
        """What loading ``model`` on ``backend`` costs, as learned there, else elsewhere, else None."""
        here = self._load_seconds.get((backend, model))
        if here is not None:
            return here.value
        elsewhere = [
            e.value for (_, m), e in self._load_seconds.items() if m == model and e.value is not None
        ]
        return max(elsewhere) if elsewhere else None

    def forget(self, backend: str) -> None:
        """A backend left the pool: nothing of it is kept."""
        self._busy.pop(backend, None)
        self._drained.pop(backend, None)
        self._healthy.discard(backend)
        for index in (self._used, self._load_seconds, self._failed):
            for key in [key for key in index if key[0] == backend]:
                del index[key]
        self._preloads = {(b, m) for b, m in self._preloads if b != backend}
        self._preloaded = {m: b for m, b in self._preloaded.items() if b != backend}

    def index_sizes(self) -> dict[str, int]:
        return {
            "residency_used": len(self._used),
            "residency_load_times": len(self._load_seconds),
            "residency_failed_loads": len(self._failed),
        }

    # --- deciding --------------------------------------------------------------------------

    def decide(self, scheduler: Scheduler, managed: Collection[str]) -> list[Action]:
        """What to load and unload now, on the ``managed`` backends."""
        now = self.clock()
        self._scheduler = scheduler
        backends = [
            b for name in managed if (b := scheduler.backends.get(name)) is not None and not b.removed
        ]
        self._observe(backends, now)
        waiting = scheduler.queues.by_model
        actions: list[Action] = []
        taken: set[str] = set()  # backends given an action in this call
        loading = {a.model for a, _ in self._busy.values() if isinstance(a, Load)}
        loading.update(m for b in backends for m, state in b.changing.items() if state == "loading")

        def free(backend: Backend) -> bool:
            return (
                backend.name not in self._busy
                and backend.name not in taken
                and not backend.changing
                and backend.health is Health.HEALTHY
                and not backend.draining
            )

        for target, model in sorted(self._preloads):
            if model in loading:
                continue
            if target == ANYWHERE:
                if any(model in b.resident for b in backends if b.health is Health.HEALTHY):
                    continue  # already somewhere: a preload to anywhere asks for no more
                choice = self._place(model, [b for b in backends if free(b)], waiting, now)
            else:
                backend = next((b for b in backends if b.name == target), None)
                choice = None
                if backend is not None and free(backend) and _serves(backend, model):
                    choice = self._make_room(backend, model, waiting, now)
            if choice is not None:
                backend, evict = choice
                actions.append(Load(backend.name, model, "preload", evict))
                taken.add(backend.name)
                loading.add(model)

        by_name = {b.name: b for b in backends}
        for name, model in list(self._drained.items()):
            drained = by_name.get(name)
            if drained is None or drained.barrier != model:
                del self._drained[name]  # loaded there, or the reservation ended otherwise
            elif not self._worth_a_replica(scheduler, model):
                actions.append(Undrain(name, model))
                taken.add(name)

        for model in sorted(waiting):
            residence = self.residences.get(model)
            if residence is None or model in loading:
                continue
            if not self._worth_a_replica(scheduler, model):
                continue  # a model loaded nowhere is loaded for its requests, load_after or not
            wait = _expected_wait(scheduler, model) or 0.0
            candidates = [b for b in backends if free(b) and _serves(b, model)]
            choice = self._place(model, candidates, waiting, now, worth=wait)
            if choice is not None:
                backend, evict = choice
                actions.append(Load(backend.name, model, "demand", evict))
                taken.add(backend.name)
                loading.add(model)
            elif not any(b.barrier == model for b in backends):
                drain = self._to_drain(model, candidates, wait)
                if drain is not None:
                    actions.append(Drain(drain.name, model))
                    taken.add(drain.name)

        for backend in backends:
            if not free(backend):
                continue
            for model in reversed(backend.resident):  # the least recently used first
                residence = self.residences.get(model)
                if residence is None or residence.idle_unload is None:
                    continue
                if (
                    self._idle(backend, model, waiting)
                    and now - self._used.get((backend.name, model), now) >= residence.idle_unload
                ):
                    actions.append(Unload(backend.name, model, "idle"))
                    taken.add(backend.name)
                    break
        return actions

    def _observe(self, backends: Iterable[Backend], now: float) -> None:
        """Note what is in use, and what a restart or an unload changed since the last look."""
        seen: set[tuple[str, str]] = set()
        for backend in backends:
            healthy = backend.health is Health.HEALTHY
            if healthy and backend.name not in self._healthy:
                self._rearm(backend.name)
                self._healthy.add(backend.name)
            elif not healthy:
                self._healthy.discard(backend.name)
            for model in backend.resident:
                key = (backend.name, model)
                seen.add(key)
                if model in backend.active or model in backend.foreign_models or key not in self._used:
                    self._used[key] = now
                self._preloads.discard(key)
        for key in [key for key in self._used if key not in seen]:
            del self._used[key]  # not loaded there any more: its idle time starts anew when it is

    def _rearm(self, backend: str) -> None:
        """A backend (re)joined healthy: the preloads that name it are due again."""
        for model, residence in self.residences.items():
            if isinstance(residence.preload, tuple) and backend in residence.preload:
                self._preloads.add((backend, model))
            elif residence.preload is True and self._preloaded.get(model) == backend:
                self._preloads.add((ANYWHERE, model))

    def _paused(self, backend: str, model: str, now: float) -> bool:
        """A load of the model failed there lately: not tried again until its pause ends."""
        failed = self._failed.get((backend, model))
        return failed is not None and now < failed[1]

    def _worth_a_replica(self, scheduler: Scheduler, model: str) -> bool:
        """Whether the model's requests would wait longer than its ``load_after`` (or, loaded
        nowhere, wait at all)."""
        residence = self.residences.get(model)
        wait = _expected_wait(scheduler, model) if scheduler.queues.by_model.get(model) else 0.0
        if residence is None or wait is None:
            return False
        return wait == math.inf or (residence.load_after is not None and wait > residence.load_after)

    def _idle(self, backend: Backend, model: str, waiting: Mapping[str, int]) -> bool:
        """No lease of the model there in any process, nothing changing it, and none of its
        requests waiting anywhere."""
        return self._unused_here(backend, model) and not waiting.get(model)

    def _unused_here(self, backend: Backend, model: str) -> bool:
        return (
            model not in backend.active
            and model not in backend.foreign_models
            and model not in backend.changing
        )

    def _spared(self, backend: Backend, model: str, worth: float | None, cost: float) -> bool:
        """Whether ``model``'s requests lose less than a load there saves (``worth``, less its
        ``cost``) when this server gives it up: it keeps another replica, and its requests' wait
        on the others stays below. So two models never trade a server back and forth."""
        if worth is None or self._scheduler is None:
            return False
        left = _expected_wait(self._scheduler, model, without=backend)
        return left is not None and left + cost < worth

    def _to_drain(self, model: str, candidates: Iterable[Backend], wait: float) -> Backend | None:
        """A server to reserve for ``model`` when none has room or an idle model to give up: one
        whose models, running or waiting, are spared its loss (``_spared``), the one with the
        fewest leases to finish."""
        options = []
        for b in candidates:
            cost = self.load_seconds(b.name, model) or 0.0
            paused = self._paused(b.name, model, self.clock())
            if b.barrier is None and model not in b.resident and cost < wait and not paused:
                held = set(b.active) | set(b.resident)
                if all(self._spared(b, m, wait, cost) for m in held):
                    options.append(b)
        return min(options, key=lambda b: (b.active_total, b.index), default=None)

    def _make_room(
        self, backend: Backend, model: str, waiting: Mapping[str, int], now: float, worth: float | None = None
    ) -> tuple[Backend, str | None] | None:
        """Load ``model`` here: into a free place, or in place of the least recently used model
        that is unused here and either idle everywhere for at least its own load time or spared
        its loss (``worth``: the wait the load saves); on a server drained for ``model``, any
        model unused here (the drain weighed them). None when neither."""
        if model in backend.resident or self._paused(backend.name, model, now):
            return None
        places = set(backend.resident) | backend.active.keys() | backend.foreign_models
        if len(places) < backend.max_loaded_models:
            return backend, None
        reserved = backend.barrier == model  # drained for this model: what it held may go now
        cost = self.load_seconds(backend.name, model) or 0.0
        victims = []
        for m in backend.resident:
            if not self._unused_here(backend, m):
                continue
            idle_for = now - self._used.get((backend.name, m), now)
            settled = idle_for >= (self.load_seconds(backend.name, m) or 0.0)
            if (
                reserved
                or (self._idle(backend, m, waiting) and settled)
                or self._spared(backend, m, worth, cost)
            ):
                victims.append(m)
        if not victims:
            return None
        return backend, min(victims, key=lambda m: (self._used.get((backend.name, m), now), m))

    def _place(
        self,
        model: str,
        candidates: Iterable[Backend],
        waiting: Mapping[str, int],
        now: float,
        *,
        worth: float | None = None,
    ) -> tuple[Backend, str | None] | None:
        """The backend to load ``model`` on: one with a free place first, then the quickest to
        load it, then the least loaded. ``worth``: the wait a load saves; a backend whose learned
        load time is longer is not worth it."""
        options: list[tuple[bool, float, float, int, Backend, str | None]] = []
        for backend in candidates:
            room = self._make_room(backend, model, waiting, now, worth)
            if room is None:
                continue
            cost = self.load_seconds(backend.name, model)
            if worth is not None and cost is not None and cost >= worth:
                continue
            evict = room[1]
            options.append(
                (evict is not None, cost or 0.0, backend.load_ratio, backend.index, backend, evict)
            )
        if not options:
            return None
        best = min(options, key=lambda option: option[:4])
        return best[4], best[5]


def _serves(backend: Backend, model: str) -> bool:
    return backend.models is not None and model in backend.models


def _expected_wait(scheduler: Scheduler, model: str, without: Backend | None = None) -> float | None:
    """Seconds a request for ``model`` waits now with the replicas it has (``without`` one of
    them): infinite when it is loaded nowhere healthy; else its requests beyond the free slots,
    taken in turn by the slots of its replicas, each lease lasting its backend's learned mean
    (None before any lease ended there: not judged)."""
    replicas = [
        b
        for b in scheduler.table.resident_on.get(model, ())
        if b.health is Health.HEALTHY and not b.draining and not b.removed and b is not without
    ]
    if not replicas:
        return math.inf
    return wait_on(scheduler, model, replicas)


# --- what the caller does to the scheduler for placement ---------------------------------------


def place_models(scheduler: Scheduler, models: frozenset[str], managed: set[str]) -> bool:
    """The models the pool loads itself, on the backends whose servers load on request
    (``managed``): there each goes only where it is loaded. False: nothing changed."""
    table = scheduler.table
    if table.placed_models == models and table.managed == managed:
        return False
    table.place(models, managed)
    scheduler.dispatch.after_change(list(scheduler.backends.values()))
    return True


def reserve(scheduler: Scheduler, name: str, model: str) -> None:
    """Carry a ``Drain`` out: the backend's drain barrier for ``model``, as for a starving model.
    It takes no other model until ``model`` gets a slot there, or nothing of it waits any more."""
    backend = scheduler.backends.get(name)
    barriers = scheduler.dispatch.barriers
    if backend is None or backend.barrier is not None or model in barriers:
        return
    if scheduler.queues.by_model.get(model):
        backend.barrier = model
        barriers[model] = backend
        scheduler.table.touch(backend)


def unreserve(scheduler: Scheduler, name: str, model: str) -> None:
    """Carry an ``Undrain`` out: lift the backend's barrier for ``model``, if it still has it."""
    backend = scheduler.backends.get(name)
    if backend is not None and backend.barrier == model:
        scheduler.dispatch.clear_barrier(backend)
        scheduler.table.touch(backend)
        scheduler.dispatch.after_change([backend])
