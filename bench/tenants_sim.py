"""Fair shares between keys: the real scheduler on seeded multi-tenant workloads, against FIFO.

Run: ``.venv/bin/python bench/tenants_sim.py`` (a few seconds). A discrete-event simulation on the
scheduler's injected clock: one model, 8 slots, service times exponential with a mean of 1 s.

1. A flood and a light key: the flood sends 800 requests over 10 s (10x what the slots serve), the
   light key one request a second. The light key's waits (p50, p99) and the total throughput, with
   keys (fair queueing) and without (one queue in arrival order: FIFO).
2. Weights 2:1 under saturation: both keys send 600 requests at once; the share of grants while
   both are backlogged.
3. A key with max_concurrent 2 next to an uncapped one: the capped key never holds more than 2, and
   the slots it cannot use go to the other (no capacity lost).
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from local_inference_pool.core.scheduler import Grant, Scheduler, Ticket, TicketState

SLOTS = 8
HERE = Path(__file__).parent


@dataclass
class Arrival:
    at: float
    key: str
    service: float
    ticket: Ticket | None = None
    granted: float | None = None
    done: float | None = None


@dataclass
class Run:
    arrivals: list[Arrival]
    peak: dict[str, int] = field(default_factory=dict)  # the most leases a key held at once
    grant_order: list[str] = field(default_factory=list)
    idle_while_waiting: float = 0.0  # slot-seconds free while a request its key's cap allows waited

    def waits(self, key: str) -> list[float]:
        return sorted(a.granted - a.at for a in self.arrivals if a.key == key and a.granted is not None)

    @property
    def throughput(self) -> float:
        end = max(a.done for a in self.arrivals if a.done is not None)
        return len(self.arrivals) / (end - min(a.at for a in self.arrivals))


def simulate(arrivals: list[Arrival], setup: Callable[[Scheduler], None], *, fair: bool) -> Run:
    now = 0.0
    events: list[tuple[float, int, str, object]] = []
    counter = itertools.count()
    by_ticket: dict[int, Arrival] = {}
    run = Run(arrivals)
    held: dict[str, int] = {}

    def granted(ticket: Ticket) -> None:
        arrival = by_ticket.get(ticket.id)
        if arrival is None or ticket.state is not TicketState.GRANTED or ticket.grant is None:
            return
        arrival.granted = now
        held[arrival.key] = held.get(arrival.key, 0) + 1
        run.peak[arrival.key] = max(run.peak.get(arrival.key, 0), held[arrival.key])
        run.grant_order.append(arrival.key)
        heapq.heappush(events, (now + arrival.service, next(counter), "done", ticket.grant))

    scheduler = Scheduler(clock=lambda: now, queue_limit=100_000)
    scheduler.add_backend("gpu", "http://gpu", slots=SLOTS, models=["m"])
    setup(scheduler)
    for arrival in arrivals:
        heapq.heappush(events, (arrival.at, next(counter), "arrive", arrival))
    while events:
        at, _, kind, item = heapq.heappop(events)
        gpu = scheduler.backends["gpu"]
        if gpu.free and any(not t.tenant.capped for t in scheduler.waiting_tickets()):
            run.idle_while_waiting += (at - now) * gpu.free
        now = at
        if kind == "arrive":
            assert isinstance(item, Arrival)
            ticket = scheduler.submit("m", tenant=item.key if fair else "")
            item.ticket = ticket
            by_ticket[ticket.id] = item
        else:
            assert isinstance(item, Grant)
            arrival = by_ticket[item.ticket.id]
            arrival.done = now
            held[arrival.key] -= 1
            scheduler.release(item)
        for ticket in scheduler.take_events().granted:
            granted(ticket)
    return run


def p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def flood_and_light(rng: random.Random) -> list[Arrival]:
    flood = [Arrival(rng.uniform(0, 10), "flood", rng.expovariate(1.0)) for _ in range(800)]
    light = [Arrival(float(t), "light", rng.expovariate(1.0)) for t in range(1, 11)]
    return sorted(flood + light, key=lambda a: a.at)


def main() -> None:
    lines = []
    rng = random.Random(11)
    workload = flood_and_light(rng)
    fifo = simulate([Arrival(a.at, a.key, a.service) for a in workload], lambda s: None, fair=False)
    fair = simulate([Arrival(a.at, a.key, a.service) for a in workload], lambda s: None, fair=True)
    fair_share_wait = 1.0 / (SLOTS / 2)  # half the slots: a new one frees every 0.25 s at worst
    for name, run in (("FIFO", fifo), ("fair", fair)):
        light, flood = run.waits("light"), run.waits("flood")
        lines.append(
            f"flood + light key, {name:4}: light waits p50 {statistics.median(light):6.2f} s, "
            f"p99 {p(light, 0.99):6.2f} s; flood waits p50 {statistics.median(flood):6.2f} s; "
            f"throughput {run.throughput:.2f} req/s"
        )
    lines.append(
        f"light key's p99 wait: {p(fair.waits('light'), 0.99):.2f} s fair against {p(fifo.waits('light'), 0.99):.2f} s "
        f"FIFO (its fair share of 8 slots frees one within about {fair_share_wait:.2f} s on average); "
        f"throughput {fair.throughput / fifo.throughput:.3f}x of FIFO (the same work on slots never idle "
        f"while anything waits; which request finishes last differs with the order)"
    )

    def weights(scheduler: Scheduler) -> None:
        scheduler.set_tenant("heavy", weight=2.0)
        scheduler.set_tenant("light", weight=1.0)

    rng = random.Random(12)
    backlog = [Arrival(0.0, key, rng.expovariate(1.0)) for _ in range(600) for key in ("heavy", "light")]
    weighted = simulate(backlog, weights, fair=True)
    window = weighted.grant_order[SLOTS : SLOTS + 600]  # after the first slots, while both wait
    share = window.count("heavy") / window.count("light")
    lines.append(
        f"weights 2:1 under saturation: grants {window.count('heavy')}:{window.count('light')} = {share:.3f}:1 ({abs(share - 2) / 2:.1%} off 2:1)"
    )

    def cap(scheduler: Scheduler) -> None:
        scheduler.set_tenant("capped", max_concurrent=2)

    rng = random.Random(13)
    mixed = sorted(
        [Arrival(rng.uniform(0, 10), "capped", rng.expovariate(1.0)) for _ in range(200)]
        + [Arrival(rng.uniform(0, 10), "free", rng.expovariate(1.0)) for _ in range(200)],
        key=lambda a: a.at,
    )
    capped = simulate(mixed, cap, fair=True)
    lines.append(
        f"max_concurrent 2 beside an uncapped key (200 requests each over 10 s): the capped key held at "
        f"most {capped.peak['capped']} at once; slots left idle while a request its cap allowed waited: "
        f"{capped.idle_while_waiting:.2f} slot-seconds (the flood runs: FIFO {fifo.idle_while_waiting:.2f}, "
        f"fair {fair.idle_while_waiting:.2f})"
    )
    for line in lines:
        print(line)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tenants_sim.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
