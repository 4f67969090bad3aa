"""Discrete-event simulation of placement by prompt cache: the pool's scheduler against today's
policy, an SGLang-style cache-aware router and round-robin, on seeded workloads.

Run: ``.venv/bin/python bench/cache_sim.py`` (a few seconds; ``--quick`` for a smoke run).

The simulated fleet is the ground truth. Each backend has slots and a prompt cache: the prompts it
was sent, with their answers, least recently used out beyond ``slots x context`` tokens (llama.cpp's
KV cache without its host-memory cache). A request reuses the longest prefix, in whole messages, of
any prompt its backend holds; it takes ``uncached tokens x PREFILL`` seconds to evaluate the rest,
then ``answer tokens x DECODE``. A server batches a prefill with the other slots' decoding (as
llama.cpp and vLLM do), so a request that starts delays every request running beside it on that
server by its prefill time. Policies see only what the real pool sees: the requests' text, the
backends' reports after each answer (cached tokens, prefill time), and their own grants.

Policies:
- ``today``: the pool before cache-aware placement: a session key (the conversation's start), its
  backend preferred while it has a free slot, else the request moves at once;
- ``cache-aware``: the pool now: prefix index, waiting for the cache holder when cheaper;
- ``sglang``: SGLang's cache-aware router: each request goes, at arrival, to the backend with the
  longest prefix match unless the load is imbalanced (``max - min > 2`` and ``max > 1.5 min``, in
  requests running and queued there) or less than half the prompt matches, then to the least loaded;
  it queues there (FIFO), as the worker's own queue;
- ``round-robin``: each request to the next backend, queued there.

Workloads (more sessions than slots, all speaking at once; shared long prefixes; mixed):
- ``chat``: 12 conversations of 6 turns on 2 backends x 2 slots; each turn a 150-400 token message,
  a 60-150 token answer; think time 0.5-2 s (everyone is typing at once);
- ``rag``: 4 documents of 3,000 tokens shared by Poisson questions (50 tokens) at 1.6/s, no sessions;
- ``mixed``: half independent short prompts (100-300 tokens), half 8 agent loops whose prompt grows
  by 300-800 tokens a step, on 3 backends x 2 slots.

``fleet``: the cache-aware policy with 2 pool processes in front of the same backends, each turn
going to either process at random (a load balancer that does not keep conversations sticky): each
process has its own prefix index and learned figures, sees the other's leases (as the shared
state's claims do) and learns a conversation's backend when it is told (the fleet-wide session).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from local_inference_pool.core.fleet import remember_affinity
from local_inference_pool.core.prompt_index import Prompt, prompt_of
from local_inference_pool.core.scheduler import Grant, Scheduler, Ticket, TicketState

PREFILL = 0.0008  # seconds per uncached prompt token (a 7-8B model on a consumer GPU, roughly)
DECODE = 0.02  # seconds per answer token
CONTEXT = 8192  # tokens per slot
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Segment:
    """One message: an id and its tokens; its text is made up from them."""

    id: int
    tokens: int

    @property
    def text(self) -> str:
        base = f"<{self.id}>"
        return (base * (self.tokens * CHARS_PER_TOKEN // len(base) + 1))[: self.tokens * CHARS_PER_TOKEN]


@dataclass(eq=False)
class Request:
    id: int
    arrival: float
    segments: tuple[Segment, ...]  # the prompt, oldest message first
    answer: int  # tokens
    session: str | None
    later_turn: bool
    next_turn: Callable[[float, Request], Request | None] | None = None  # a conversation's follow-up
    start: float = 0.0
    done: float = 0.0
    cached: int = 0
    backend: int = -1

    @property
    def prompt_tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    def prompt(self) -> Prompt:
        return prompt_of([s.text for s in self.segments], model="m")


class CacheModel:
    """A backend's prompt cache: prompts (with their answers), LRU beyond its capacity in tokens."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.prompts: OrderedDict[tuple[Segment, ...], int] = OrderedDict()
        self.tokens = 0

    def cached(self, segments: tuple[Segment, ...]) -> int:
        best = 0
        for held in self.prompts:
            common = 0
            for mine, theirs in zip(segments, held, strict=False):
                if mine != theirs:
                    break
                common += mine.tokens
            best = max(best, common)
        return min(best, sum(s.tokens for s in segments) - 1)

    def add(self, segments: tuple[Segment, ...]) -> None:
        """A prompt that extends a held one replaces it (a slot's cache grows with its conversation)."""
        size = sum(s.tokens for s in segments)
        if segments in self.prompts:
            self.prompts.move_to_end(segments)
            return
        for held in [h for h in self.prompts if segments[: len(h)] == h]:
            self.tokens -= self.prompts.pop(held)
        self.prompts[segments] = size
        self.tokens += size
        while self.tokens > self.capacity and len(self.prompts) > 1:
            _, gone = self.prompts.popitem(last=False)
            self.tokens -= gone


@dataclass
class Fleet:
    slots: list[int]
    caches: list[CacheModel] = field(default_factory=list)
    running: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.caches = [CacheModel(s * CONTEXT) for s in self.slots]
        self.running = [0] * len(self.slots)


class Policy:
    """Places requests; calls ``start(request, backend)`` when one gets a slot."""

    def __init__(
        self, fleet: Fleet, clock: Callable[[], float], start: Callable[[Request, int], None]
    ) -> None:
        self.fleet, self.clock, self.start = fleet, clock, start

    def arrive(self, request: Request) -> None:
        raise NotImplementedError

    def finished(self, request: Request) -> None:
        raise NotImplementedError

    def wakeup(self) -> float | None:
        return None

    def refresh(self) -> None:
        """Time passed."""


class PoolPolicy(Policy):
    """The pool's scheduler, one or more processes of it (``processes``) over the same backends."""

    def __init__(self, *args: object, cache_aware: bool, processes: int = 1, seed: int = 0) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.cache_aware = cache_aware
        self.rng = random.Random(seed)
        self.schedulers: list[Scheduler] = []
        for _ in range(processes):
            scheduler = Scheduler(
                clock=self.clock,
                cache_wait_max=10.0 if cache_aware else 0.0,
                prefill_seconds_per_token=0.0005,  # the pool's default, before it learns
            )
            for index, slots in enumerate(self.fleet.slots):
                scheduler.add_backend(
                    f"b{index}", f"http://b{index}", slots=slots, models=["m"], resident=["m"]
                )
            self.schedulers.append(scheduler)
        self.requests: dict[Ticket, tuple[Request, Scheduler]] = {}
        self.grants: dict[int, Grant] = {}

    def arrive(self, request: Request) -> None:
        scheduler = self.rng.choice(self.schedulers)
        ticket = scheduler.submit(
            "m", affinity_key=request.session, prompt=request.prompt() if self.cache_aware else None
        )
        self.requests[ticket] = (request, scheduler)
        self._collect()

    def _collect(self) -> None:
        """Start what the schedulers granted; telling the other processes may grant more."""
        progress = True
        while progress:
            progress = False
            for scheduler in self.schedulers:
                for ticket in scheduler.take_events().granted:
                    progress = True
                    self._granted(ticket)

    def _granted(self, ticket: Ticket) -> None:
        if ticket.state is not TicketState.GRANTED or ticket.grant is None:
            return
        entry = self.requests.get(ticket)
        if entry is None:
            return
        request, scheduler = entry
        if request.id in self.grants:
            return
        self.grants[request.id] = ticket.grant
        backend = int(ticket.grant.backend.name[1:])
        for other in self.schedulers:
            if other is not scheduler:
                name = f"b{backend}"
                other.update_backend(name, external_busy=other.backends[name].external_busy + 1)
                if request.session is not None:
                    remember_affinity(other, request.session, name)
        self.start(request, backend)

    def finished(self, request: Request) -> None:
        grant = self.grants.pop(request.id)
        scheduler = self.requests.pop(grant.ticket)[1]
        uncached = request.prompt_tokens - request.cached
        scheduler.learn(
            grant,
            prompt_tokens=request.prompt_tokens,
            cached_tokens=request.cached,
            prefill_seconds=uncached * PREFILL,
            evaluated_tokens=uncached,
        )
        for other in self.schedulers:
            if other is not scheduler:
                name = grant.backend.name
                other.update_backend(name, external_busy=max(0, other.backends[name].external_busy - 1))
                self._collect()  # what it grants is taken before this process grants again
        scheduler.release(grant)
        self._collect()

    def wakeup(self) -> float | None:
        times = [t for s in self.schedulers if (t := s.next_wakeup()) is not None]
        return min(times) if times else None

    def refresh(self) -> None:
        for scheduler in self.schedulers:
            scheduler.refresh()
        self._collect()


class QueuedPolicy(Policy):
    """Routes each request to one backend at arrival; it queues there, first come first served."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.queues: list[list[Request]] = [[] for _ in self.fleet.slots]

    def choose(self, request: Request) -> int:
        raise NotImplementedError

    def load(self, backend: int) -> int:
        return self.fleet.running[backend] + len(self.queues[backend])

    def arrive(self, request: Request) -> None:
        backend = self.choose(request)
        self.queues[backend].append(request)
        self._fill(backend)

    def finished(self, request: Request) -> None:
        self._fill(request.backend)

    def _fill(self, backend: int) -> None:
        while self.queues[backend] and self.fleet.running[backend] < self.fleet.slots[backend]:
            self.start(self.queues[backend].pop(0), backend)


class RoundRobin(QueuedPolicy):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.turn = itertools.cycle(range(len(self.fleet.slots)))

    def choose(self, request: Request) -> int:
        return next(self.turn)


class SGLangStyle(QueuedPolicy):
    """SGLang's cache-aware router (sgl-router ``cache_aware``): its defaults, scaled to slot counts
    (``balance_abs_threshold`` 32 requests is for large batches; 2 here), on what it can see: its own
    radix tree of the prompts it routed (here: the backends' prompts it sent, with no eviction)."""

    ABS, REL, THRESHOLD = 2, 1.5, 0.5

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.trees = [CacheModel(10**12) for _ in self.fleet.slots]

    def choose(self, request: Request) -> int:
        loads = [self.load(b) for b in range(len(self.queues))]
        least = min(range(len(loads)), key=lambda b: (loads[b], b))
        if max(loads) - min(loads) > self.ABS and max(loads) > self.REL * max(1, min(loads)):
            backend = least
        else:
            matches = [tree.cached(request.segments) for tree in self.trees]
            best = max(range(len(matches)), key=lambda b: (matches[b], -loads[b]))
            backend = best if matches[best] >= self.THRESHOLD * request.prompt_tokens else least
        self.trees[backend].add(request.segments)
        return backend


@dataclass
class Result:
    policy: str
    cached_share: float
    mean: float
    p99: float
    makespan: float


def measure(name: str, finished: list[Request]) -> Result:
    later = [r for r in finished if r.later_turn] or finished
    latencies = sorted(r.done - r.arrival for r in finished)
    return Result(
        name,
        sum(r.cached for r in later) / sum(r.prompt_tokens for r in later),
        statistics.fmean(latencies),
        latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        max(r.done for r in finished) - min(r.arrival for r in finished),
    )


# --- workloads ---------------------------------------------------------------------------------


class Ids:
    def __init__(self) -> None:
        self.segments = itertools.count(1)
        self.requests = itertools.count(1)


def conversations(
    rng: random.Random,
    ids: Ids,
    count: int,
    turns: int,
    *,
    system: Segment,
    message: tuple[int, int],
    answer: tuple[int, int],
    think: tuple[float, float],
    start_within: float,
) -> list[Request]:
    """Closed loops: each conversation's next turn comes a think time after its answer."""
    first: list[Request] = []
    for number in range(count):
        session = f"conversation-{number}"
        remaining = [turns - 1]

        def follow(
            at: float, done: Request, session: str = session, remaining: list[int] = remaining
        ) -> Request | None:
            if remaining[0] <= 0:
                return None
            remaining[0] -= 1
            history = (*done.segments, Segment(-done.id - 1, done.answer))
            return Request(
                next(ids.requests),
                at + rng.uniform(*think),
                (*history, Segment(next(ids.segments), rng.randint(*message))),
                rng.randint(*answer),
                session,
                later_turn=True,
                next_turn=follow,
            )

        request = Request(
            next(ids.requests),
            rng.uniform(0, start_within),
            (system, Segment(next(ids.segments), rng.randint(*message))),
            rng.randint(*answer),
            session,
            later_turn=False,
            next_turn=follow,
        )
        first.append(request)
    return first


def chat(seed: int, quick: bool) -> tuple[list[Request], list[int]]:
    rng, ids = random.Random(seed), Ids()
    system = Segment(next(ids.segments), 200)
    count = 6 if quick else 12
    return conversations(
        rng,
        ids,
        count,
        6,
        system=system,
        message=(150, 400),
        answer=(60, 150),
        think=(0.5, 2.0),
        start_within=2.0,
    ), [2, 2]


def rag(seed: int, quick: bool) -> tuple[list[Request], list[int]]:
    rng, ids = random.Random(seed), Ids()
    documents = [Segment(next(ids.segments), 3000) for _ in range(4)]
    system = Segment(next(ids.segments), 100)
    now, requests = 0.0, []
    for _ in range(60 if quick else 240):
        now += rng.expovariate(1.6)
        document = rng.choice(documents)
        question = Segment(next(ids.segments), 50)
        requests.append(
            Request(next(ids.requests), now, (system, document, question), rng.randint(40, 120), None, True)
        )
    return requests, [2, 2]


def mixed(seed: int, quick: bool) -> tuple[list[Request], list[int]]:
    rng, ids = random.Random(seed), Ids()
    system = Segment(next(ids.segments), 800)  # an agent's long instructions and tools
    agents = conversations(
        rng, ids, 4 if quick else 8, 8, system=system, message=(300, 800), answer=(40, 120), think=(0.0, 0.3),
        start_within=3.0,
    )  # fmt: skip
    now, short = 0.0, []
    for _ in range(40 if quick else 160):
        now += rng.expovariate(2.0)
        segment = Segment(next(ids.segments), rng.randint(100, 300))
        short.append(Request(next(ids.requests), now, (segment,), rng.randint(20, 80), None, False))
    return agents + short, [2, 2, 2]


def simulate(requests: list[Request], slots: list[int], factory: Callable[..., Policy]) -> list[Request]:
    """Run the requests (and the turns that follow them) to the end; the finished requests."""
    fleet = Fleet(slots)
    now = 0.0
    events: list[tuple[float, int, str, Request]] = []
    order = itertools.count()
    finished: list[Request] = []

    running: list[dict[Request, float]] = [{} for _ in slots]  # backend -> request -> when it ends

    def start(request: Request, backend: int) -> None:
        request.start, request.backend = now, backend
        request.cached = fleet.caches[backend].cached(request.segments)
        fleet.running[backend] += 1
        assert fleet.running[backend] <= slots[backend], "over slots"
        prefill = (request.prompt_tokens - request.cached) * PREFILL
        beside = running[backend]
        for other in beside:  # their decoding waits while this prompt is evaluated
            beside[other] += prefill
            heapq.heappush(events, (beside[other], next(order), "done", other))
        beside[request] = now + prefill + request.answer * DECODE
        heapq.heappush(events, (beside[request], next(order), "done", request))

    policy = factory(fleet, lambda: now, start)
    for request in requests:
        heapq.heappush(events, (request.arrival, next(order), "arrive", request))
    while events:
        wakeup = policy.wakeup()
        if wakeup is not None and wakeup < events[0][0]:
            now = max(now, wakeup)
            policy.refresh()
            continue
        at, _, kind, request = heapq.heappop(events)
        if kind == "done" and running[request.backend].get(request) != at:
            continue  # it was delayed: a later event ends it
        now = at
        if kind == "arrive":
            policy.arrive(request)
            continue
        del running[request.backend][request]
        request.done = now
        fleet.running[request.backend] -= 1
        fleet.caches[request.backend].add((*request.segments, Segment(-request.id - 1, request.answer)))
        finished.append(request)
        policy.finished(request)
        follow = request.next_turn(now, request) if request.next_turn is not None else None
        if follow is not None:
            heapq.heappush(events, (follow.arrival, next(order), "arrive", follow))
    assert all(r == 0 for r in fleet.running)
    return finished


POLICIES: dict[str, Callable[..., Policy]] = {
    "today": lambda *a: PoolPolicy(*a, cache_aware=False),
    "cache-aware": lambda *a: PoolPolicy(*a, cache_aware=True),
    "sglang": SGLangStyle,
    "round-robin": RoundRobin,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    for name, make in (("chat", chat), ("rag", rag), ("mixed", mixed)):
        print(
            f"\n{name}: cached share of later prompts' tokens, latency (s), makespan (s); mean of {len(seeds)} seeds"
        )
        print(f"  {'policy':<16}{'cached':>8}{'mean':>8}{'p99':>8}{'makespan':>10}")
        rows: dict[str, list[Result]] = {}
        for seed in seeds:
            factories = dict(POLICIES)
            if name == "chat":
                factories["fleet (2 procs)"] = lambda *a, seed=seed: PoolPolicy(
                    *a, cache_aware=True, processes=2, seed=seed
                )
                factories["today, 2 procs"] = lambda *a, seed=seed: PoolPolicy(
                    *a, cache_aware=False, processes=2, seed=seed
                )
            for policy, factory in factories.items():
                requests, slots = make(seed, args.quick)  # afresh: follow-up turns draw from its seed
                rows.setdefault(policy, []).append(measure(policy, simulate(requests, slots, factory)))
        for policy, results in rows.items():
            cached = statistics.fmean(r.cached_share for r in results)
            mean = statistics.fmean(r.mean for r in results)
            p99 = statistics.fmean(r.p99 for r in results)
            makespan = statistics.fmean(r.makespan for r in results)
            print(f"  {policy:<16}{cached:>8.2f}{mean:>8.2f}{p99:>8.2f}{makespan:>10.1f}")


if __name__ == "__main__":
    main()
