"""Where a request goes: which free backend, and whether to wait for a busy one that caches its prompt.

Placement prefers no load, then the backend likely to hold the most of the prompt in its cache (a
prefix of at least ``prefix_min_tokens``), then the session's affinity backend, then the lowest
weighted load.

*Waiting for a cache*: when a slot is offered to a request on one backend while a busy one likely
holds more of its prompt, the request compares the prefill time the cache saves (the uncached
tokens on each side times that backend's learned prefill time per token, once more for each lease
running beside it) with the expected wait for a slot there (the time left of its leases, learned per
backend, and the requests already waiting for it). When waiting is cheaper it is *held* for that
backend (``Hold``), and meanwhile the offered slot goes to the next request; else it moves at once.

*Starvation*: a free slot prefers, per priority, a request whose model is already loaded over an
older one that would force a swap. Batching is bounded by overtaking, not by waiting: once a slot
has gone to a request that arrived ``starvation_bound`` seconds or more after a waiting one, the
waiting one *starves* and may force a swap or a drain barrier (``Scheduler``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from local_inference_pool.core.backends import BackendTable
from local_inference_pool.core.learning import CacheModel
from local_inference_pool.core.model import Affinity, Backend, Grant, Health, Ticket
from local_inference_pool.core.queues import Queues
from local_inference_pool.core.sessions import SessionMemory

__all__ = ["Hold", "Placement"]


class Hold(NamedTuple):
    """Wait for ``holder``'s cache for at most ``budget`` seconds."""

    holder: Backend
    budget: float


class Placement:
    def __init__(
        self,
        clock: Callable[[], float],
        table: BackendTable,
        queues: Queues,
        caches: CacheModel,
        sessions: SessionMemory,
        grants: Mapping[int, Grant],
        *,
        starvation_bound: float,
        cache_wait_max: float,
        prefix_min_tokens: int,
    ) -> None:
        self.clock = clock
        self.table = table
        self.queues = queues
        self.caches = caches
        self.sessions = sessions
        self.grants = grants
        self.starvation_bound = starvation_bound
        self.cache_wait_max = cache_wait_max
        self.prefix_min_tokens = prefix_min_tokens
        self.newest_granted = float("-inf")  # arrival time of the most recently arrived grant

    # --- starvation ------------------------------------------------------------------------

    def starving(self, ticket: Ticket) -> bool:
        """Passed over: a slot went to a request that arrived at least the bound after this one."""
        return self.newest_granted - ticket.arrival >= self.starvation_bound

    def swap_worthwhile(self, model: str) -> bool:
        """Evict a model for this one only if its backlog outgrows where it is already loaded."""
        return self.queues.by_model.get(model, 0) >= self.table.healthy_slots_with(model)

    # --- choosing a backend ----------------------------------------------------------------

    def choose_backend(self, ticket: Ticket, candidates: list[Backend]) -> tuple[Backend, Affinity | None]:
        session_backend = self.sessions.backend_of(ticket.affinity_key)
        if len(candidates) == 1:
            best = candidates[0]
        elif ticket.prompt is None or not ticket.prompt.cacheable:
            best = min(
                candidates,
                key=lambda b: (b.known_cold(ticket.model), b.name != session_backend, b.load_ratio, b.index),
            )
        else:  # a short cached prefix counts for nothing: load spreads
            least = self.prefix_min_tokens

            def cached(b: Backend) -> float:
                tokens = self.caches.cached_tokens(ticket, b, session_backend)
                return tokens if tokens >= least else 0.0

            best = min(
                candidates,
                key=lambda b: (
                    b.known_cold(ticket.model),
                    -cached(b),
                    b.name != session_backend,
                    b.load_ratio,
                    b.index,
                ),
            )
        return best, self.affinity_outcome(ticket, best)

    def affinity_outcome(self, ticket: Ticket, backend: Backend) -> Affinity | None:
        """Why the ticket goes to this backend (None: it has neither session nor prompt)."""
        if ticket.affinity_key is None and ticket.prompt is None:
            return None
        if ticket.held_for is backend:
            return Affinity.WAITED
        if ticket.moved_from is not None and ticket.moved_from != backend.name:
            return Affinity.MOVED
        session_backend = self.sessions.backend_of(ticket.affinity_key)
        if session_backend is not None:
            return Affinity.HIT if session_backend == backend.name else Affinity.MOVED
        if (
            ticket.prompt is not None
            and self.caches.cached_tokens(ticket, backend, None) >= self.prefix_min_tokens
        ):
            return Affinity.PREFIX
        return Affinity.MISS

    # --- waiting for a cache ---------------------------------------------------------------

    def offer(self, ticket: Ticket, offered: Backend) -> Backend | Hold:
        """Where a ticket offered a slot on ``offered`` goes: there; to a backend that likely
        caches more of its prompt and has a slot free too; or nowhere yet (a ``Hold`` for a busy
        one, because the prefill that backend saves outweighs the wait expected for it).

        A prefill costs its time to the request and as much again to each request running beside
        it, whose tokens wait while the server evaluates the prompt (llama.cpp and vLLM batch the
        two): so the saving weighs each side's prefill by the leases it would run beside.

        How long to wait: when nothing else waits for the offered slot, the wait is lost time, so at
        most the saving. When other requests wait that it can serve, the slot is not lost: it goes to
        one of them, who starts that much sooner, and the wait only reorders them; the fleet gains
        the whole saving. Then the request may wait what the holder is expected to take plus the
        saving. Both at most ``cache_wait_max``. A ticket that is not held is marked as moved from
        the holder it passed up (``moved_from``)."""
        prompt = ticket.prompt
        if prompt is None or ticket.pin is not None or ticket.held_for is offered or not prompt.cacheable:
            return offered
        model = ticket.model
        caches = self.caches
        session_backend = self.sessions.backend_of(ticket.affinity_key)
        tokens = prompt.chars / caches.chars_per_token(model)
        offered_cost = caches.prefill(
            offered, tokens - caches.cached_tokens(ticket, offered, session_backend)
        ) * (1 + offered.active_total)
        holder: Backend | None = None
        saving = 0.0
        for backend in self.table.serving.get(model, ()):
            if backend is offered or backend.health is not Health.HEALTHY or not backend.can_take(model):
                continue
            cached = caches.cached_tokens(ticket, backend, session_backend)
            if cached < self.prefix_min_tokens and backend.name != session_backend:
                continue  # a short shared prefix steers nothing; a conversation's own history does
            beside = backend.active_total if backend.free else backend.slots - 1
            gain = offered_cost - caches.prefill(backend, tokens - cached) * (1 + beside)
            if gain > saving or (gain == saving and holder is not None and backend.free > holder.free):
                holder, saving = backend, gain
        if holder is None:
            return offered
        if holder.free:
            return holder
        expected = self._expected_wait(holder, ticket)
        budget = min(self.cache_wait_max, expected + saving if self._backlog(offered, ticket) else saving)
        if ticket.hold_started is not None or self.starving(ticket) or expected >= budget:
            ticket.moved_from = holder.name
            return offered
        return Hold(holder, budget)

    def _backlog(self, offered: Backend, ticket: Ticket) -> bool:
        """Whether another waiting request (not one held for a cache) could take the offered slot."""
        models = offered.models or frozenset()
        held = self.queues.held_by_model
        return any(
            model in models
            and offered.can_take(model)
            and count - held.get(model, 0) > (1 if model == ticket.model else 0)
            for model, count in self.queues.by_model.items()
        )

    def _expected_wait(self, holder: Backend, ticket: Ticket) -> float:
        """Until a slot on a full backend comes to this ticket: the requests ahead of it there go
        first, each taking the next lease to end. A lease is expected to last the backend's mean
        (0 before one has ended), an overdue one a quarter of it more; past the leases running now,
        each further turn is a mean lease over the backend's slots."""
        ahead = self.queues.pinned_to(holder)
        ahead += sum(1 for held in self.queues.held_on(holder) if held.order < ticket.order)
        mean = holder.lease_seconds.get(0.0)
        now = self.clock()
        ending = sorted(
            mean - elapsed if (elapsed := now - g.granted_at) < mean else mean / 4
            for g in self.grants.values()
            if g.backend is holder
        )
        if ahead < len(ending):
            return ending[ahead]
        last = ending[-1] if ending else 0.0
        return last + (ahead - len(ending) + 1) * mean / max(1, holder.slots)
