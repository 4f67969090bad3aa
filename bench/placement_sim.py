"""Where models live, simulated: demand-driven placement against static placement and against
llama-swap-style per-server swapping, on a three-model workload whose demand shifts.

Run: ``.venv/bin/python bench/placement_sim.py`` (a few seconds; ``--seeds N`` for more runs).

The fleet: 4 servers of 4 slots, each holding one model at a time (``--models-max 1``); a load
costs ``LOAD_SECONDS`` during which the server serves nothing. The workload: three models, demand
shifting every ``PHASE`` seconds to another model (70% of requests, 15% each for the others),
Poisson arrivals at 80% of the fleet's capacity, answers of 5 to 15 s.

- *static*: the models stay where they start (A, B, C, A); nothing is ever loaded.
- *per-server swapping* (llama-swap on each server behind a round-robin balancer): each request
  goes to the next server in turn and waits in that server's line; a server whose next request
  needs another model finishes what runs, then swaps (load on first request). Its TTL unload frees
  nothing a one-model server could use, so it changes no figure here.
- *demand-driven* (this project): the pool's scheduler, with ``core/residency.py`` deciding loads:
  every model has ``load_after`` (``LOAD_AFTER``); a model's requests go only where it is loaded,
  and a load goes in place of the least recently used idle model when the expected wait is longer
  than ``load_after`` and than the load's learned cost.

Printed per policy, as the median over the seeds: makespan (the last answer), p95 and mean wait for
a slot (queueing plus any load the request waited for), and loads.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from local_inference_pool.core.residency import (
    Drain,
    Load,
    Residence,
    Residency,
    Undrain,
    Unload,
    place_models,
    reserve,
    unreserve,
)
from local_inference_pool.core.scheduler import Grant, Scheduler

LOAD_SECONDS = 30.0
PHASE = 180.0
DURATION = 1800.0
SERVERS = 4
SLOTS = 4
MODELS = ("A", "B", "C")
START = ("A", "B", "C", "A")
LOAD_AFTER = 20.0
STEP = 0.5


@dataclass
class Request:
    id: int
    model: str
    arrival: float
    service: float
    start: float = -1.0
    done: float = -1.0


@dataclass
class Result:
    makespan: float
    p95_wait: float
    mean_wait: float
    loads: int


def workload(seed: int) -> list[Request]:
    rng = random.Random(seed)
    rate = SERVERS * SLOTS / 10.0 * 0.8  # requests a second at 80% of capacity (mean answer 10 s)
    requests: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= DURATION:
            return requests
        hot = MODELS[int(t // PHASE) % len(MODELS)]
        weights = [0.7 if m == hot else 0.15 for m in MODELS]
        requests.append(Request(len(requests), rng.choices(MODELS, weights)[0], t, rng.uniform(5, 15)))


def result(requests: list[Request], loads: int) -> Result:
    waits = sorted(r.start - r.arrival for r in requests)
    return Result(
        makespan=max(r.done for r in requests),
        p95_wait=waits[int(0.95 * (len(waits) - 1))],
        mean_wait=statistics.fmean(waits),
        loads=loads,
    )


def run_steps(step: Callable[[float, list[Request]], bool], requests: list[Request]) -> None:
    """Advance time in steps, handing each step its arrivals, until every request is done."""
    pending = sorted(requests, key=lambda r: r.arrival)
    now, index = 0.0, 0
    while True:
        arrived = []
        while index < len(pending) and pending[index].arrival <= now:
            arrived.append(pending[index])
            index += 1
        if not step(now, arrived) and index == len(pending):
            return
        now += STEP
        if now > 20 * DURATION:  # a policy that stops serving is a bug to see, not to wait for
            raise RuntimeError(f"requests still waiting at {now:.0f} s: the policy stopped serving")


def static(requests: list[Request]) -> Result:
    running: list[list[Request]] = [[] for _ in range(SERVERS)]
    queues: dict[str, list[Request]] = {m: [] for m in MODELS}

    def step(now: float, arrived: list[Request]) -> bool:
        for request in arrived:
            queues[request.model].append(request)
        for server in range(SERVERS):
            running[server] = [r for r in running[server] if r.done > now]
            line = queues[START[server]]
            while line and len(running[server]) < SLOTS:
                request = line.pop(0)
                request.start, request.done = now, now + request.service
                running[server].append(request)
        return any(running) or any(queues.values())

    run_steps(step, requests)
    return result(requests, 0)


def per_server_swapping(requests: list[Request]) -> Result:
    loaded = list(START)
    ready_at = [0.0] * SERVERS
    running: list[list[Request]] = [[] for _ in range(SERVERS)]
    lines: list[list[Request]] = [[] for _ in range(SERVERS)]
    loads = 0
    turn = 0

    def step(now: float, arrived: list[Request]) -> bool:
        nonlocal loads, turn
        for request in arrived:
            lines[turn % SERVERS].append(request)
            turn += 1
        for server in range(SERVERS):
            running[server] = [r for r in running[server] if r.done > now]
            line = lines[server]
            if not line or ready_at[server] > now:
                continue
            if line[0].model != loaded[server]:
                if running[server]:
                    continue  # the swap waits for what runs
                loaded[server] = line[0].model
                ready_at[server] = now + LOAD_SECONDS
                loads += 1
                continue
            while line and line[0].model == loaded[server] and len(running[server]) < SLOTS:
                request = line.pop(0)
                request.start, request.done = now, now + request.service
                running[server].append(request)
        return any(running) or any(lines)

    run_steps(step, requests)
    return result(requests, loads)


@dataclass
class _Change:
    action: Load | Unload
    until: float


@dataclass
class _Pool:
    now: list[float] = field(default_factory=lambda: [0.0])

    def clock(self) -> float:
        return self.now[0]


def demand_driven(requests: list[Request]) -> Result:
    state = _Pool()
    scheduler = Scheduler(clock=state.clock, queue_limit=10**9)
    names = [f"s{i}" for i in range(SERVERS)]
    for name, model in zip(names, START, strict=True):
        scheduler.add_backend(name, f"sim://{name}", slots=SLOTS, models=MODELS, resident=[model])
    place_models(scheduler, frozenset(MODELS), set(names))
    residency = Residency(state.clock, {m: Residence(load_after=LOAD_AFTER) for m in MODELS})
    by_ticket: dict[int, Request] = {}
    running: list[tuple[float, Grant]] = []
    changes: list[_Change] = []
    loads = 0

    def start_granted(now: float) -> None:
        for ticket in scheduler.take_events().granted:
            assert ticket.grant is not None
            request = by_ticket.pop(ticket.id, None)
            if request is None:
                continue  # granted as it was submitted: started there
            request.start, request.done = now, now + request.service
            running.append((request.done, ticket.grant))

    def step(now: float, arrived: list[Request]) -> bool:
        nonlocal loads, running
        state.now[0] = now
        for change in [c for c in changes if c.until <= now]:
            changes.remove(change)
            action = change.action
            backend = scheduler.backends[action.backend]
            gone = {action.model, action.evict if isinstance(action, Load) else None}
            resident = [m for m in backend.resident if m not in gone]
            if isinstance(action, Load):
                resident.insert(0, action.model)
            scheduler.update_backend(action.backend, resident=resident, changing={})
            residency.ended(action, ok=True)
        for _, grant in [item for item in running if item[0] <= now]:
            scheduler.release(grant)
        running = [item for item in running if item[0] > now]
        for request in arrived:
            ticket = scheduler.submit(request.model)
            if ticket.grant is not None:
                request.start, request.done = now, now + request.service
                running.append((request.done, ticket.grant))
            else:
                by_ticket[ticket.id] = request
        for decision in residency.decide(scheduler, names):
            residency.began(decision)
            if isinstance(decision, Drain):
                reserve(scheduler, decision.backend, decision.model)
                continue
            if isinstance(decision, Undrain):
                unreserve(scheduler, decision.backend, decision.model)
                continue
            marks = {decision.model: "loading" if isinstance(decision, Load) else "unloading"}
            if isinstance(decision, Load):
                loads += 1
                if decision.evict is not None:
                    marks[decision.evict] = "unloading"
            scheduler.update_backend(decision.backend, changing=marks)
            changes.append(_Change(decision, now + (LOAD_SECONDS if isinstance(decision, Load) else 1.0)))
        start_granted(now)
        return bool(running or by_ticket or changes)

    run_steps(step, requests)
    return result(requests, loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    policies = {
        "static placement": static,
        "per-server swapping": per_server_swapping,
        "demand-driven (pool)": demand_driven,
    }
    rows: dict[str, list[Result]] = {name: [] for name in policies}
    for seed in range(args.seeds):
        base = workload(seed)
        for name, policy in policies.items():
            copy = [Request(r.id, r.model, r.arrival, r.service) for r in base]
            rows[name].append(policy(copy))
    print(
        f"{SERVERS} servers x {SLOTS} slots, one model each; 3 models, demand shifting every {PHASE:.0f} s; "
        f"load {LOAD_SECONDS:.0f} s; {DURATION:.0f} s of arrivals at 80% of capacity; "
        f"median of {args.seeds} seeds"
    )
    print(f"{'policy':24} {'makespan s':>11} {'p95 wait s':>11} {'mean wait s':>12} {'loads':>6}")
    for name, results in rows.items():
        median = {
            key: statistics.median(getattr(r, key) for r in results)
            for key in ("makespan", "p95_wait", "mean_wait", "loads")
        }
        print(
            f"{name:24} {median['makespan']:11.0f} {median['p95_wait']:11.1f} "
            f"{median['mean_wait']:12.1f} {median['loads']:6.0f}"
        )


if __name__ == "__main__":
    main()
