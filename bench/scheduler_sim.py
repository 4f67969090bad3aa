"""Discrete-event simulation: the real scheduler against baselines on seeded workloads.

Run: ``.venv/bin/python bench/scheduler_sim.py`` (about a minute; ``--quick`` for a smoke run).

The simulated fleet is the ground truth: each backend has slots, and the models it really holds in
VRAM. A request whose model is not loaded waits ``LOAD_SECONDS`` for the load (one load at a time per
backend; requests arriving during a load wait for it), evicting the least recently used model when
the backend is full. Loading a model while another model still has requests running breaks those
streams in real servers (LM Studio's JIT swap): the simulation lets them finish but counts them as
"broken". Policies only see what they are told: the pool's scheduler learns residency from the
initial probe and from its own grants, like the real pool between probes.

Lower bound per workload: for every arrival time t, t + (service seconds of the requests arriving
from t on + one load of every model, on an average backend's slots) / total slots. No schedule can
beat it; it ignores queueing variance, cache savings and which models fit which backends, so it is
optimistic (a ratio of 1.00x is the floor, not a promise).

Dispatch cost: microseconds per scheduling decision at 10/100/1,000 backends and 1k/100k waiting
tickets, for a release that hands the slot on and for a submit into a full queue.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from local_inference_pool.config import PoolConfig
from local_inference_pool.core.scheduler import Grant, Scheduler

LOAD_SECONDS = 30.0
STARVATION_BOUND = PoolConfig().starvation_bound


@dataclass(eq=False)
class Request:
    id: int
    model: str
    arrival: float
    service: float
    session: str | None = None
    start: float = 0.0  # when it got a slot
    done: float = 0.0
    backend: int = -1


@dataclass
class Workload:
    name: str
    slots: list[int]  # per backend
    models: list[str]
    requests: list[Request]
    max_loaded: int = 1
    serves: list[set[str]] | None = None  # per backend; None: every backend serves every model


@dataclass
class SimBackend:
    slots: int
    max_loaded: int
    loaded: list[str]  # truth, most recent first
    running: dict[str, int] = field(default_factory=dict)
    loading_until: float = 0.0
    loads: int = 0
    broken: int = 0
    last_session_turn: dict[str, int] = field(default_factory=dict)

    def start(self, request: Request, now: float) -> float:
        """Begin serving; returns the completion time."""
        ready = now
        if request.model not in self.loaded:
            begin = max(now, self.loading_until)
            self.loading_until = begin + LOAD_SECONDS
            ready = self.loading_until
            self.loads += 1
            self.loaded.insert(0, request.model)
            while len(self.loaded) > self.max_loaded:
                evicted = self.loaded.pop()
                self.broken += self.running.get(evicted, 0)
        else:
            self.loaded.remove(request.model)
            self.loaded.insert(0, request.model)
            ready = max(now, self.loading_until) if self.loading_until > now else now
        self.running[request.model] = self.running.get(request.model, 0) + 1
        return ready + request.service

    def finish(self, request: Request) -> None:
        self.running[request.model] -= 1


# --- policies ------------------------------------------------------------------------------


class Policy:
    name = ""

    def __init__(self, workload: Workload, clock: Callable[[], float]) -> None:
        self.workload = workload
        self.clock = clock

    def arrive(self, request: Request) -> list[tuple[Request, int]]:
        raise NotImplementedError

    def complete(self, request: Request) -> list[tuple[Request, int]]:
        raise NotImplementedError

    def wakeup(self) -> float | None:
        return None

    def tick(self) -> list[tuple[Request, int]]:
        return []


class PoolPolicy(Policy):
    name = "pool (this project)"

    def __init__(self, workload: Workload, clock: Callable[[], float], initial: list[list[str]]) -> None:
        super().__init__(workload, clock)
        self.started: list[tuple[Request, int]] = []
        self.by_ticket: dict[int, Request] = {}
        self.grants: dict[int, Grant] = {}
        self.scheduler = Scheduler(
            clock=clock,
            queue_limit=10**9,
            starvation_bound=STARVATION_BOUND,
        )
        for index, slots in enumerate(workload.slots):
            serves = workload.serves[index] if workload.serves else set(workload.models)
            self.scheduler.add_backend(
                str(index),
                f"sim://{index}",
                slots=slots,
                models=serves,
                max_loaded_models=workload.max_loaded,
                resident=initial[index],
            )

    def _drain(self) -> list[tuple[Request, int]]:
        """The requests the scheduler's last calls granted, with their backends."""
        started = []
        for ticket in self.scheduler.take_events().granted:
            assert ticket.grant is not None
            request = self.by_ticket.pop(ticket.id)
            self.grants[request.id] = ticket.grant
            started.append((request, int(ticket.grant.backend.name)))
        return started

    def arrive(self, request: Request) -> list[tuple[Request, int]]:
        ticket = self.scheduler.submit(request.model, session=request.session)
        self.by_ticket[ticket.id] = request
        return self._drain()

    def complete(self, request: Request) -> list[tuple[Request, int]]:
        self.scheduler.release(self.grants.pop(request.id))
        return self._drain()

    def wakeup(self) -> float | None:
        return self.scheduler.next_wakeup()

    def tick(self) -> list[tuple[Request, int]]:
        self.scheduler.refresh()
        return self._drain()


class QueuePolicy(Policy):
    """A FIFO queue scanned in order; ``pick`` chooses a backend for one request, or None."""

    def __init__(self, workload: Workload, clock: Callable[[], float]) -> None:
        super().__init__(workload, clock)
        self.queue: list[Request] = []
        self.active = [0] * len(workload.slots)
        self.active_model: list[dict[str, int]] = [{} for _ in workload.slots]
        self.serves = workload.serves or [set(workload.models) for _ in workload.slots]

    def candidates(self, model: str) -> list[int]:
        return [
            b
            for b, slots in enumerate(self.workload.slots)
            if self.active[b] < slots and model in self.serves[b]
        ]

    def pick(self, request: Request) -> int | None:
        raise NotImplementedError

    def _scan(self) -> list[tuple[Request, int]]:
        started: list[tuple[Request, int]] = []
        waiting: list[Request] = []
        for request in self.queue:
            backend = self.pick(request)
            if backend is None:
                waiting.append(request)
                continue
            self.active[backend] += 1
            self.active_model[backend][request.model] = self.active_model[backend].get(request.model, 0) + 1
            started.append((request, backend))
        self.queue = waiting
        return started

    def arrive(self, request: Request) -> list[tuple[Request, int]]:
        self.queue.append(request)
        return self._scan()

    def complete(self, request: Request) -> list[tuple[Request, int]]:
        self.active[request.backend] -= 1
        self.active_model[request.backend][request.model] -= 1
        if not self.active_model[request.backend][request.model]:
            del self.active_model[request.backend][request.model]
        return self._scan()


class FifoDrainGuard(QueuePolicy):
    """v0.7: FIFO scan, least-busy server whose current model is this one or which is drained."""

    name = "v0.7 FIFO + drain guard"

    def pick(self, request: Request) -> int | None:
        eligible = [
            b
            for b in self.candidates(request.model)
            if not self.active_model[b] or set(self.active_model[b]) == {request.model}
        ]
        return min(eligible, key=lambda b: self.active[b], default=None)


class LeastBusy(QueuePolicy):
    name = "least-busy (no model awareness)"

    def pick(self, request: Request) -> int | None:
        return min(self.candidates(request.model), key=lambda b: self.active[b], default=None)


class RoundRobin(QueuePolicy):
    name = "round-robin"

    def __init__(self, workload: Workload, clock: Callable[[], float]) -> None:
        super().__init__(workload, clock)
        self.next = 0

    def pick(self, request: Request) -> int | None:
        count = len(self.workload.slots)
        for offset in range(count):
            backend = (self.next + offset) % count
            if backend in self.candidates(request.model):
                self.next = backend + 1
                return backend
        return None


# --- simulation ----------------------------------------------------------------------------


@dataclass
class Result:
    policy: str
    makespan: float
    loads: int
    broken: int
    mean_wait: float
    p99_wait: float
    affinity_reuse: float
    decisions_us: float


def simulate(workload: Workload, make_policy: Callable[..., Policy], initial: list[list[str]]) -> Result:
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    policy = (
        make_policy(workload, clock, initial) if make_policy is PoolPolicy else make_policy(workload, clock)
    )
    backends = [
        SimBackend(slots=slots, max_loaded=workload.max_loaded, loaded=list(initial[i]))
        for i, slots in enumerate(workload.slots)
    ]
    requests = [Request(r.id, r.model, r.arrival, r.service, r.session) for r in workload.requests]
    events: list[tuple[float, int, str, Request]] = []
    seq = itertools.count()
    for request in requests:
        heapq.heappush(events, (request.arrival, next(seq), "arrive", request))
    reuse = turns = 0
    decision_time = 0.0
    decisions = 0

    def start(started: list[tuple[Request, int]]) -> None:
        nonlocal reuse, turns
        for request, index in started:
            backend = backends[index]
            request.start = now[0]
            request.backend = index
            service = request.service
            if request.session is not None:
                turns += 1
                if backend.last_session_turn.get(request.session) is not None:
                    reuse += 1
                    service *= 0.7  # the conversation's prefix is cached: prompt processing skipped
                for other in backends:
                    other.last_session_turn.pop(request.session, None)
                backend.last_session_turn[request.session] = request.id
            request.service = service
            request.done = backend.start(request, now[0])
            heapq.heappush(events, (request.done, next(seq), "done", request))

    while events:
        at, _, kind, event_request = heapq.heappop(events)
        wake = policy.wakeup()
        if wake is not None and wake < at:
            now[0] = wake
            t0 = time.perf_counter()
            started = policy.tick()
            decision_time += time.perf_counter() - t0
            decisions += 1
            start(started)
            heapq.heappush(events, (at, next(seq), kind, event_request))
            continue
        now[0] = at
        t0 = time.perf_counter()
        if kind == "arrive":
            started = policy.arrive(event_request)
        else:
            backends[event_request.backend].finish(event_request)
            started = policy.complete(event_request)
        decision_time += time.perf_counter() - t0
        decisions += 1
        start(started)

    waits = sorted(r.start - r.arrival for r in requests)
    return Result(
        policy=policy.name,
        makespan=max(r.done for r in requests),
        loads=sum(b.loads for b in backends),
        broken=sum(b.broken for b in backends),
        mean_wait=statistics.fmean(waits),
        p99_wait=waits[min(len(waits) - 1, int(0.99 * len(waits)))],
        affinity_reuse=reuse / turns if turns else float("nan"),
        decisions_us=decision_time / max(1, decisions) * 1e6,
    )


def lower_bound(workload: Workload) -> float:
    """No schedule finishes earlier: work arriving from time t on needs t + work / slots, plus loads."""
    total_slots = sum(workload.slots)
    mean_slots = total_slots / len(workload.slots)
    loads = len(workload.models) * LOAD_SECONDS * mean_slots
    by_arrival = sorted(workload.requests, key=lambda r: r.arrival)
    bound, suffix = 0.0, loads
    for request in reversed(by_arrival):
        suffix += request.service
        bound = max(bound, request.arrival + suffix / total_slots, request.arrival + request.service)
    return bound


# --- workloads -----------------------------------------------------------------------------


def workloads(seed: int, quick: bool) -> list[Workload]:
    rng = random.Random(seed)
    scale = 0.25 if quick else 1.0
    made: list[Workload] = []

    def service() -> float:
        return rng.choice([rng.uniform(2, 8), rng.uniform(8, 30), rng.uniform(30, 90)])

    # A batch consumer: everything at once, two models interleaved (the v0.7 use case).
    models = ["qwen-7b", "llama-8b"]
    reqs = [Request(i, models[i % 2], 0.0, service()) for i in range(int(400 * scale))]
    made.append(Workload("batch, 2 models, 2x4 slots", [4, 4], models, reqs))

    # Steady interactive traffic near capacity, four models, Poisson arrivals.
    models = [f"m{i}" for i in range(4)]
    slots = [4, 4, 2, 2]
    reqs, t = [], 0.0
    for i in range(int(1200 * scale)):
        t += rng.expovariate(sum(slots) / 22.0 * 0.8)
        reqs.append(Request(i, rng.choice(models), t, service()))
    made.append(Workload("steady 80%, 4 models, 4 backends", slots, models, reqs))

    # Skewed popularity in bursts on a mid-size fleet.
    models = [f"z{i}" for i in range(6)]
    weights = [1 / (k + 1) for k in range(6)]
    slots = [2] * 8
    reqs, t, rid = [], 0.0, 0
    for _burst in range(int(12 * scale) or 1):
        t += rng.uniform(60, 240)
        for _ in range(rng.randint(20, 80)):
            reqs.append(Request(rid, rng.choices(models, weights)[0], t + rng.uniform(0, 5), service()))
            rid += 1
    made.append(Workload("zipf bursts, 6 models, 8x2 slots", slots, models, reqs))

    # Large fleet, mixed slots, models only on some backends, two models resident at once.
    models = [f"L{i}" for i in range(5)]
    slots = [rng.randint(1, 8) for _ in range(16)]
    serves = [set(rng.sample(models, 3)) for _ in slots]
    reqs, t = [], 0.0
    for i in range(int(3000 * scale)):
        t += rng.expovariate(sum(slots) / 22.0 * 0.9)
        reqs.append(Request(i, rng.choice(sorted(set().union(*serves))), t, service()))
    made.append(Workload("16 backends 1-8 slots, subsets, 2 loaded", slots, models, reqs, 2, serves))

    # Chat sessions: multi-turn conversations, affinity matters for the prompt cache.
    models = ["chat-a", "chat-b"]
    slots = [4, 4, 4]
    reqs, rid = [], 0
    for session in range(int(150 * scale)):
        t = rng.uniform(0, 1800)
        model = rng.choice(models)
        for _turn in range(rng.randint(2, 8)):
            reqs.append(Request(rid, model, t, rng.uniform(3, 20), session=f"s{session}"))
            rid += 1
            t += rng.uniform(20, 120)
    reqs.sort(key=lambda r: r.arrival)
    made.append(Workload("chat sessions, 2 models, 3x4 slots", slots, models, reqs))
    return made


def initial_residency(workload: Workload, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    serves = workload.serves or [set(workload.models) for _ in workload.slots]
    return [[rng.choice(sorted(s))] for s in serves]


# --- dispatch cost ---------------------------------------------------------------------------


def dispatch_cost(backends: int, queued: int) -> tuple[float, float]:
    """Microseconds for (a release that hands its slot on, a submit into a full queue)."""
    now = [0.0]
    granted: list[Grant] = []
    scheduler = Scheduler(clock=lambda: now[0], queue_limit=10**9, starvation_bound=1e9)

    def collect() -> None:
        granted.extend(t.grant for t in scheduler.take_events().granted if t.grant is not None)

    models = [f"m{i}" for i in range(5)]
    for b in range(backends):
        scheduler.add_backend(f"b{b}", f"sim://{b}", slots=4, models=models, resident=[models[b % 5]])
    for b in range(backends):
        for _ in range(4):
            scheduler.submit(models[b % 5])
    collect()
    rng = random.Random(1)
    for _ in range(queued):
        scheduler.submit(rng.choice(models))
    collect()
    rounds = min(2000, queued // 2)  # fewer than any model's share of the queue: every release hands on
    t0 = time.perf_counter()
    for i in range(rounds):
        scheduler.release(granted[i])  # each release grants the next waiter: the list grows
        collect()
    release_us = (time.perf_counter() - t0) / rounds * 1e6
    assert len(granted) == backends * 4 + rounds, "a release did not hand its slot on"
    t0 = time.perf_counter()
    for _ in range(rounds):
        scheduler.submit(rng.choice(models))
    submit_us = (time.perf_counter() - t0) / rounds * 1e6
    return release_us, submit_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    args = parser.parse_args()
    lines: list[str] = []

    def out(text: str = "") -> None:
        print(text)
        lines.append(text)

    out(
        f"scheduler simulation, seed {args.seed}, load {LOAD_SECONDS:.0f}s, starvation bound {STARVATION_BOUND:.0f}s"
    )
    header = f"{'policy':34} {'makespan':>9} {'/bound':>7} {'loads':>6} {'broken':>6} {'mean wait':>10} {'p99 wait':>9} {'reuse':>6}"
    for workload in workloads(args.seed, args.quick):
        bound = lower_bound(workload)
        initial = initial_residency(workload, args.seed)
        out()
        out(f"## {workload.name}: {len(workload.requests)} requests, lower bound {bound:.0f}s")
        out(header)
        for make in (PoolPolicy, FifoDrainGuard, LeastBusy, RoundRobin):
            r = simulate(workload, make, initial)
            reuse = "-" if r.affinity_reuse != r.affinity_reuse else f"{r.affinity_reuse:.0%}"
            out(
                f"{r.policy:34} {r.makespan:8.0f}s {r.makespan / bound:6.2f}x {r.loads:6d} {r.broken:6d} "
                f"{r.mean_wait:9.1f}s {r.p99_wait:8.1f}s {reuse:>6}"
            )
    out()
    out("## dispatch cost (microseconds per decision, real scheduler)")
    out(f"{'backends':>8} {'queued':>8} {'release+hand-on':>16} {'submit (full)':>14}")
    sizes = [(10, 1000), (100, 1000), (1000, 1000), (10, 100_000), (1000, 100_000)]
    if args.quick:
        sizes = sizes[:3]
    for backends, queued in sizes:
        release_us, submit_us = dispatch_cost(backends, queued)
        out(f"{backends:8d} {queued:8d} {release_us:15.1f} {submit_us:14.1f}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    name = "scheduler_sim_quick.txt" if args.quick else "scheduler_sim.txt"
    (results / name).write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {results / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
