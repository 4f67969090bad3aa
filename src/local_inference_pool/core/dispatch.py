"""Dispatch: handing free slots to waiting tickets, and everything a grant changes.

Dispatch runs after every change that can free capacity and grants everything it can in one pass:
each backend's free slots go to the best waiting tickets (``fill``), and each model's waiting tickets
to the best free backends (``place``). Batching by model is bounded by overtaking (``placement``): a
starving head may force a swap, and if nothing is free for one, a *drain barrier* reserves one
backend for it: it admits no other model until the starving model gets a slot there, so a cold
model is served in bounded time. With spare capacity, new requests are served as they arrive, so
this is a wait of at most the bound; when the whole fleet is saturated and everyone waits, nobody is
being passed over, so no server is drained for nothing.

What dispatch does to waiting tickets (granted, failed, held) is recorded in ``events`` for the
scheduler's caller, never called back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

from local_inference_pool.core.backends import BackendTable
from local_inference_pool.core.learning import CacheModel
from local_inference_pool.core.model import (
    Affinity,
    Backend,
    Events,
    Grant,
    Health,
    Tenant,
    Ticket,
    TicketState,
)
from local_inference_pool.core.placement import Hold, Placement
from local_inference_pool.core.queues import Queues
from local_inference_pool.core.sessions import SessionMemory
from local_inference_pool.errors import ModelNotFoundError, PoolError, QueueTimeoutError

__all__ = ["Dispatch"]

STATS = (
    "granted", "released", "loads", "cancelled", "timed_out", "failed", "rejected",
    "affinity_hit", "affinity_miss", "affinity_waited", "affinity_moved", "affinity_prefix",
    "barriers",
)  # fmt: skip


class Dispatch:
    def __init__(
        self,
        clock: Callable[[], float],
        table: BackendTable,
        queues: Queues,
        placement: Placement,
        learning: CacheModel,
        sessions: SessionMemory,
        grants: dict[int, Grant],
    ) -> None:
        self.clock = clock
        self.table = table
        self.queues = queues
        self.placement = placement
        self.learning = learning
        self.sessions = sessions
        self.grants = grants
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self.ids = itertools.count(1)  # tickets and grants
        self.barriers: dict[str, Backend] = {}  # model -> the backend drained for it
        self.events = Events()

    def set_resident(self, backend: Backend, resident: Sequence[str]) -> None:
        """Record what the backend has loaded; what it no longer holds, its prompts went with."""
        for model in self.table.set_resident(backend, resident):
            self.learning.forget_model(backend.name, model)

    def unpark(self, tenant: Tenant) -> None:
        for model in sorted(self.queues.unpark(tenant)):
            if self.table.free:
                self.place(model)

    def release(self, grant: Grant) -> bool:
        """Free the grant's slot. Idempotent: only the first call frees anything."""
        if grant.released:
            return False
        grant.released = True
        grant.ticket.state = TicketState.RELEASED
        del self.grants[grant.id]
        self.stats["released"] += 1
        backend = grant.backend
        backend.lease_seconds.add(max(0.0, self.clock() - grant.granted_at))
        remaining = backend.active[grant.model] - 1
        if remaining:
            backend.active[grant.model] = remaining
        else:
            del backend.active[grant.model]
        backend.active_total -= 1
        tenant = grant.ticket.tenant
        was_capped = tenant.capped
        tenant.active -= 1
        if not backend.removed:
            self.table.touch(backend)
        if was_capped:  # its parked and pinned requests may go now, wherever there is room
            self.unpark(tenant)
            self.dispatch_all()
        if not backend.removed:
            self.fill(backend)
        if self.queues.by_model:
            self.serve_starving()
        self.queues.forget_if_idle(tenant)
        return True

    def expire(self, now: float) -> None:
        """Deadlines that passed fail their tickets; holds that ran out go back to their queues."""
        expired, ended = self.queues.due(now)
        for ticket in expired:
            waited = now - ticket.arrival
            self.stats["timed_out"] += 1
            self.fail(
                ticket,
                QueueTimeoutError(
                    f"no slot for model {ticket.model!r} within {waited:.1f}s; "
                    f"{self.queues.by_model.get(ticket.model, 0)} more waiting for it",
                    model=ticket.model,
                    waited=waited,
                ),
            )
        models: set[str] = set()
        for ticket in ended:
            if ticket.held_for is not None and ticket.state is TicketState.WAITING:
                self.queues.unhold(ticket)
                models.add(ticket.model)
        for model in sorted(models):
            if self.table.free:
                self.place(model)
        self.serve_starving()

    def fail(self, ticket: Ticket, error: PoolError) -> None:
        """End a waiting ticket with an error (its waiter raises it)."""
        if ticket.state is not TicketState.WAITING:
            return
        self.withdraw(ticket, TicketState.FAILED)
        ticket.error = error
        self.stats["failed"] += 1
        self.events.failed.append(ticket)
        self.queues.forget_if_idle(ticket.tenant)

    def after_change(self, changed: Iterable[Backend]) -> None:
        self.fail_unservable()
        self.queues.forget_models(self.table.serving)
        for backend in sorted(changed, key=lambda b: b.index):
            self.fill(backend)
        self.dispatch_all()
        self.serve_starving()

    def dispatch_all(self) -> None:
        for backend in sorted(self.table.free, key=lambda b: b.index):
            self.fill(backend)

    def place(self, model: str) -> None:
        """Give waiting tickets of one model the best free backends, head first."""
        placement = self.placement
        while (head := self.queues.head(model)) is not None:
            candidates = self._candidates(model, placement.starving(head) or placement.swap_worthwhile(model))
            if not candidates:
                return
            backend, _ = placement.choose_backend(head, candidates)
            self.offer(head, backend)

    def grant_new(self, ticket: Ticket) -> bool:
        """Grant a new ticket, for a model nothing else waits for, as ``place`` would once it were
        queued, without queueing it first (the common case of a gateway with room: no queue entry
        made and withdrawn per request). False: it must queue (no free backend may take it, its
        tenant is at its cap, or it is to wait for a busy backend's cache)."""
        tenant = ticket.tenant
        if tenant.max_concurrent is not None and tenant.capped:
            ticket.waited_for = "tenant_share"
            return False
        model, placement = ticket.model, self.placement
        # As if queued: the ticket would be its model's one waiter (``swap_worthwhile`` with one).
        candidates = self._candidates(
            model, placement.starving(ticket) or self.table.healthy_slots_with(model) <= 1
        )
        if not candidates:
            # A free slot whose backend the drain guard keeps for its own model, or none at all.
            guarded = any(not b.can_take(model) for b in self.table.free_serving(model))
            ticket.waited_for = "drain_guard" if guarded else "slots"
            return False
        backend, _ = placement.choose_backend(ticket, candidates)
        target = placement.offer(ticket, backend)
        if isinstance(target, Hold):
            ticket.waited_for = "cache_hold"
            return False  # queued, it is offered the same slot again and held then
        self.grant(ticket, target, placement.affinity_outcome(ticket, target), queued=True)
        return True

    def _candidates(self, model: str, may_swap: bool) -> list[Backend]:
        """The free backends that may take the model now: the drain guard allows it, and, unless
        a swap is allowed, it evicts nothing there."""
        return [
            b
            for b in self.table.free_serving(model)
            if b.can_take(model) and (may_swap or not b.needs_swap(model))
        ]

    def fill(self, backend: Backend) -> None:
        """Give a backend's free slots to the best waiting tickets."""
        while backend.free and backend.health is Health.HEALTHY and not backend.removed:
            ticket = self.choose_ticket(backend)
            if ticket is None:
                return
            self.offer(ticket, backend)

    def offer(self, ticket: Ticket, backend: Backend) -> None:
        """Offer a waiting ticket a slot: it takes it (or one on a backend caching more of its
        prompt), or it is held for a busy backend's cache."""
        target = self.placement.offer(ticket, backend)
        if isinstance(target, Hold):
            ticket.waited_for = "cache_hold"
            ticket.hold_started = self.clock()
            self.queues.hold(ticket, target.holder, ticket.hold_started + target.budget)
            self.events.held.append(ticket)
            return
        affinity = self.placement.affinity_outcome(ticket, target)
        self.withdraw(ticket, TicketState.WAITING)
        self.grant(ticket, target, affinity, queued=True)

    def choose_ticket(self, backend: Backend) -> Ticket | None:
        queues, placement = self.queues, self.placement
        pinned = queues.pinned_head(backend)
        if pinned is not None and backend.can_take(pinned.model, pinned=True) and not pinned.tenant.capped:
            return pinned
        if backend.models is None or backend.draining:
            return None
        held = queues.held_head(backend)
        if held is not None and (not backend.can_take(held.model) or held.tenant.capped):
            held = None
        waiting = queues.by_model
        models: Iterable[str] = (
            (m for m in waiting if m in backend.models)
            if len(waiting) <= len(backend.models)
            else (m for m in backend.models if m in waiting)
        )
        best: Ticket | None = None
        best_key: tuple[bool, int, bool, float, int] | None = None
        for model in models:
            if not backend.can_take(model):
                continue
            head = queues.head(model)
            if head is None:
                continue
            starving = placement.starving(head)
            if backend.needs_swap(model) and not starving and not placement.swap_worthwhile(model):
                continue
            key = (not starving, -head.priority, backend.needs_load(model), head.tag, head.id)
            if best_key is None or key < best_key:
                best, best_key = head, key
        if held is not None and (
            best is None or (best_key is not None and best_key[0] and held.priority >= best.priority)
        ):
            return held  # it waits for this backend's cache: first in line here but for those
        return best

    def serve_starving(self) -> None:
        """Starving heads may force a swap; if nothing is free for one, drain a backend for it."""
        for model in [m for m in self.queues.by_model if m not in self.barriers]:
            head = self.queues.head(model)
            if head is None or not self.placement.starving(head):
                continue
            self.place(model)
            serving = self.table.serving.get(model, ())
            if self.queues.head(model) is None or any(model in b.active for b in serving):
                continue  # already being served somewhere: it waits for load, not for a swap
            candidates = [
                b
                for b in serving
                if b.health is Health.HEALTHY
                and not b.draining
                and b.barrier is None
                and b.slots > b.external_busy
                and model not in b.placed  # the pool's placement drains for those (residency)
            ]
            if not candidates:
                continue
            target = min(candidates, key=lambda b: self.drain_cost(b, model))
            target.barrier = model
            self.barriers[model] = target
            self.stats["barriers"] += 1
            self.fill(target)

    def drain_cost(self, backend: Backend, model: str) -> tuple[float, float, int]:
        """How much draining this backend for ``model`` holds up: first the work waiting for the
        models it runs now (they lose this backend), then the leases it must finish first."""
        waiting = self.queues.by_model
        stranded = sum(waiting.get(m, 0) for m in backend.active if m != model)
        finishing = sum(n for m, n in backend.active.items() if m != model)
        return (stranded / backend.slots, finishing / backend.slots, backend.index)

    def grant(self, ticket: Ticket, backend: Backend, affinity: Affinity | None, *, queued: bool) -> Grant:
        model = ticket.model
        load = backend.needs_load(model)
        if load:
            backend.loads += 1
            self.stats["loads"] += 1
        if not backend.resident or backend.resident[0] != model:
            self.set_resident(backend, [model, *(m for m in backend.resident if m != model)])
        backend.residency_known = True
        backend.active[model] = backend.active.get(model, 0) + 1
        backend.active_total += 1
        backend.granted += 1
        ticket.tenant.active += 1
        ticket.tenant.granted += 1
        if ticket.tag > self.queues.virtual:
            self.queues.virtual = ticket.tag
        self.placement.newest_granted = max(self.placement.newest_granted, ticket.arrival)
        if backend.barrier == model:
            self.clear_barrier(backend)
        if ticket.prompt is not None and (ticket.prompt.blocks or ticket.hold_started or ticket.moved_from):
            self.learning.sent(ticket, backend, affinity)
        ticket.held_for = None
        grant = Grant(
            id=next(self.ids),
            ticket=ticket,
            backend=backend,
            model=model,
            granted_at=self.clock(),
            loaded_model=load,
            affinity=affinity,
        )
        self.grants[grant.id] = grant
        ticket.state = TicketState.GRANTED
        ticket.grant = grant
        self.stats["granted"] += 1
        if affinity is not None:
            self.stats[f"affinity_{affinity.value}"] += 1
            if ticket.affinity_key is not None:
                self.sessions.remember(ticket.affinity_key, backend.name)
        self.table.touch(backend)
        if queued:
            self.events.granted.append(ticket)
        return grant

    # --- bookkeeping -----------------------------------------------------------------------

    def withdraw(self, ticket: Ticket, state: TicketState) -> None:
        """A waiting ticket leaves every queue; a model with no waiter left frees its barrier."""
        if self.queues.withdraw(ticket):
            barrier = self.barriers.get(ticket.model)
            if barrier is not None:
                self.clear_barrier(barrier)
        ticket.state = state

    def release_holds(self, backend: Backend) -> None:
        """Tickets held for a backend that cannot serve them now go back to their queues."""
        serves = (
            backend.health is Health.HEALTHY
            and not backend.removed
            and not backend.draining
            and backend.models is not None
        )
        models = set()
        for ticket in self.queues.held_on(backend):
            if not serves or ticket.model not in (backend.models or ()):
                self.queues.unhold(ticket)
                models.add(ticket.model)
        for model in sorted(models):
            if self.table.free:
                self.place(model)

    def fail_unservable(self) -> None:
        """Once every model list is known, tickets for a model nobody serves fail at once."""
        if self.table.discovery_pending():
            return
        for model in [m for m in self.queues.by_model if not self.table.serving.get(m)]:
            error_text = f"model {model!r} is no longer served by any backend"
            for ticket in self.queues.waiting_for_model(model):
                if ticket.pin is None:
                    self.fail(ticket, ModelNotFoundError(error_text, model=model))

    def clear_barrier(self, backend: Backend) -> None:
        if backend.barrier is not None:
            self.barriers.pop(backend.barrier, None)
            backend.barrier = None
