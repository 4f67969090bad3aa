"""Waiting requests: each model's queue, the orders over them, and fair shares between tenants.

Every waiting ticket is in exactly one place it can be granted from: its model's queue, the queue
of the backend it is pinned to, its tenant's parked list (the tenant is at its ``max_concurrent``),
or the held list of the backend whose prompt cache it waits for. Besides, it is in its model's
arrival order (for the oldest wait), and in the deadline order when it has a deadline. ``withdraw``
takes it out of all of them at once, so no index outlives the tickets in it (see ``heap``).

Within a priority, tenants share contended slots in proportion to their weights: start-time fair
queueing. Each ticket is tagged with a virtual start time, ``max(now's virtual time, the tenant's
previous finish)``, and a tenant's tags advance by ``1 / weight`` per request, so a flood of one
tenant queues behind itself, not in front of the others, and a tenant alone gets every slot.
Why not deficit round robin: every request costs one slot, tags fit the per-model heaps the queues
already are (no round over tenants per grant), and a tenant that arrives joins at the current
virtual time, so it neither waits behind a backlog nor jumps a fair turn.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

from local_inference_pool.core.heap import TicketHeap
from local_inference_pool.core.model import Backend, Tenant, Ticket, TicketState

__all__ = ["Queues"]


class Queues:
    """The waiting tickets and the tenants they belong to; no decisions, only orders and counts."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = {}
        self.virtual = 0.0  # fair queueing's virtual time: the largest start tag granted
        self.total = 0  # waiting tickets, pinned and held included
        self.by_model: dict[str, int] = {}  # model -> waiting tickets (pinned and held included)
        self.held_by_model: dict[str, int] = {}  # model -> waiting tickets held for a cache
        # Per model, kept while a backend serves the model (``forget_model``): allocated once, not
        # once per request. Per backend and tenant, dropped when empty.
        self._queues: dict[str, TicketHeap[Ticket]] = {}  # model -> tickets free to go anywhere
        self._pinned: dict[str, TicketHeap[Ticket]] = {}  # backend -> tickets pinned to it
        self._held: dict[str, TicketHeap[Ticket]] = {}  # backend -> tickets waiting for its cache
        self._parked: dict[str, TicketHeap[Ticket]] = {}  # tenant -> tickets over its cap
        self._arrivals: dict[str, TicketHeap[Ticket]] = {}  # model -> every waiting ticket
        self._deadlines: TicketHeap[Ticket] = TicketHeap()
        self._hold_ends: TicketHeap[Ticket] = TicketHeap()
        self.declare("")  # the default tenant: requests that name none

    # --- tenants ---------------------------------------------------------------------------

    def declare(
        self,
        name: str,
        *,
        weight: float = 1.0,
        max_concurrent: int | None = None,
        max_queued: int | None = None,
    ) -> Tenant:
        """Declare (or change) a tenant's weight and caps; it is kept for good."""
        tenant = self.tenants.get(name)
        if tenant is None:
            tenant = self.tenants[name] = Tenant(name)
        tenant.declared = True
        tenant.weight = max(1e-6, weight)
        tenant.max_concurrent = max_concurrent
        tenant.max_queued = max_queued
        return tenant

    def tenant(self, name: str) -> Tenant:
        """A tenant by name. An undeclared one has weight 1 and no caps, and is forgotten once it
        has nothing waiting or running (``forget_if_idle``): a library caller's made-up names must
        not grow the table."""
        tenant = self.tenants.get(name)
        if tenant is None:
            tenant = self.tenants[name] = Tenant(name)
        return tenant

    def forget_if_idle(self, tenant: Tenant) -> None:
        idle = not (tenant.active or tenant.waiting or tenant.external)
        if idle and not tenant.declared and self.tenants.get(tenant.name) is tenant:
            del self.tenants[tenant.name]

    def start_tag(self, tenant: Tenant) -> float:
        """The virtual start time a new request of the tenant would get now."""
        return max(self.virtual, tenant.finish)

    def has_parked(self, tenant: Tenant) -> bool:
        return tenant.name in self._parked

    def unpark(self, tenant: Tenant) -> set[str]:
        """Put a tenant's parked tickets back in their queues once it has room under its cap; the
        models they wait for. All of them: a ticket is parked only when it reaches the head of its
        queue, so few are, and those that still cannot go are parked again when they next come up."""
        parked = self._parked.get(tenant.name)
        if parked is None or tenant.capped:
            return set()
        del self._parked[tenant.name]
        models: set[str] = set()
        for ticket in parked.clear():
            self._queue_of(ticket.model).push(ticket.order, ticket)
            models.add(ticket.model)
        return models

    # --- tickets in and out ----------------------------------------------------------------

    def enqueue(self, ticket: Ticket) -> None:
        if ticket.pin is not None:
            _heap(self._pinned, ticket.pin).push(ticket.id, ticket)
        else:
            self._queue_of(ticket.model).push(ticket.order, ticket)
        _heap(self._arrivals, ticket.model).push((ticket.arrival, ticket.id), ticket)
        self.by_model[ticket.model] = self.by_model.get(ticket.model, 0) + 1
        self.total += 1
        ticket.tenant.waiting += 1
        if ticket.deadline is not None:
            self._deadlines.push(ticket.deadline, ticket)

    def withdraw(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out of every order; True when its model has no waiter left.
        The ticket's state is the caller's to set."""
        model = ticket.model
        if ticket.held_for is not None:  # kept on the ticket: a grant on its holder says "waited"
            _discard(self._held, ticket.held_for.name, ticket)
            self._hold_ends.discard(ticket)
            self._count_unheld(model)
        if ticket.pin is not None:
            _discard(self._pinned, ticket.pin, ticket)
        else:
            self._queues[model].discard(ticket)
        if self._parked:
            _discard(self._parked, ticket.tenant.name, ticket)
        self._arrivals[model].discard(ticket)
        self._deadlines.discard(ticket)
        ticket.tenant.waiting -= 1
        self.total -= 1
        remaining = self.by_model[model] - 1
        if remaining:
            self.by_model[model] = remaining
            return False
        del self.by_model[model]
        return True

    def forget_models(self, served: Container[str]) -> None:
        """The orders of models no backend serves any more and nothing waits for go."""
        for model in [m for m in self._arrivals if m not in served and m not in self.by_model]:
            self._queues.pop(model, None)
            del self._arrivals[model]

    def forget_backend(self, name: str) -> list[Ticket]:
        """A backend is gone: its pinned tickets, for the caller to fail (its held ones are the
        caller's to give back first)."""
        pinned = self._pinned.get(name)
        return [] if pinned is None else pinned.clear()

    # --- heads -----------------------------------------------------------------------------

    def head(self, model: str) -> Ticket | None:
        """The model's next ticket in queue order (priority, then fair tag); pinned and held ones
        aside. A head whose tenant is at its cap is parked on the way (back when a lease ends)."""
        queue = self._queues.get(model)
        while queue:
            ticket = queue.peek()
            assert ticket is not None
            tenant = ticket.tenant
            if tenant.max_concurrent is None or not tenant.capped:
                return ticket
            queue.pop()
            ticket.waited_for = "tenant_share"
            _heap(self._parked, tenant.name).push(ticket.order, ticket)
        return None

    def pinned_head(self, backend: Backend) -> Ticket | None:
        pinned = self._pinned.get(backend.name)
        return None if pinned is None else pinned.peek()

    def pinned_to(self, backend: Backend) -> int:
        pinned = self._pinned.get(backend.name)
        return 0 if pinned is None else len(pinned)

    def oldest(self, model: str) -> Ticket | None:
        arrivals = self._arrivals.get(model)
        return None if arrivals is None else arrivals.peek()

    def waiting(self) -> Iterator[Ticket]:
        for arrivals in list(self._arrivals.values()):
            yield from list(arrivals)

    def waiting_for_model(self, model: str) -> list[Ticket]:
        arrivals = self._arrivals.get(model)
        return [] if arrivals is None else list(arrivals)

    # --- holds for a cache -----------------------------------------------------------------

    def hold(self, ticket: Ticket, holder: Backend, until: float) -> None:
        """Take a ticket out of its model's queue to wait for one backend until ``until``."""
        self._queues[ticket.model].discard(ticket)
        ticket.held_for = holder
        ticket.hold_until = until
        self.held_by_model[ticket.model] = self.held_by_model.get(ticket.model, 0) + 1
        _heap(self._held, holder.name).push(ticket.order, ticket)
        self._hold_ends.push(until, ticket)

    def unhold(self, ticket: Ticket) -> None:
        """A held ticket goes back to its queue, in its place."""
        holder = ticket.held_for
        if holder is None or ticket.state is not TicketState.WAITING:
            return
        _discard(self._held, holder.name, ticket)
        self._hold_ends.discard(ticket)
        self._count_unheld(ticket.model)
        ticket.held_for = None
        ticket.moved_from = holder.name
        self._queue_of(ticket.model).push(ticket.order, ticket)

    def held_head(self, backend: Backend) -> Ticket | None:
        held = self._held.get(backend.name)
        return None if held is None else held.peek()

    def held_on(self, backend: Backend) -> list[Ticket]:
        held = self._held.get(backend.name)
        return [] if held is None else list(held)

    # --- time ------------------------------------------------------------------------------

    def due(self, now: float) -> tuple[list[Ticket], list[Ticket]]:
        """The tickets whose deadline has passed, and those whose hold has run out (both left in
        place for the caller to fail or give back)."""
        expired = _due(self._deadlines, now)
        ended = _due(self._hold_ends, now)
        return expired, ended

    def next_due(self) -> float | None:
        """The earliest deadline or end of a hold, or None."""
        times = [t for t in (self._deadlines.peek_key(), self._hold_ends.peek_key()) if t is not None]
        return min(times) if times else None

    def sizes(self) -> dict[str, int]:
        """Entries in every index, dead ones included: what the soak benchmark watches stay flat."""

        def total(heaps: dict[str, TicketHeap[Ticket]]) -> int:
            return sum(h.footprint for h in heaps.values())

        return {
            "queues": total(self._queues),
            "pinned": total(self._pinned),
            "held": total(self._held),
            "parked": total(self._parked),
            "arrivals": total(self._arrivals),
            "deadlines": self._deadlines.footprint,
            "hold_ends": self._hold_ends.footprint,
            "tenants": len(self.tenants),
        }

    def _queue_of(self, model: str) -> TicketHeap[Ticket]:
        return _heap(self._queues, model)

    def _count_unheld(self, model: str) -> None:
        remaining = self.held_by_model[model] - 1
        if remaining:
            self.held_by_model[model] = remaining
        else:
            del self.held_by_model[model]


def _heap(heaps: dict[str, TicketHeap[Ticket]], key: str) -> TicketHeap[Ticket]:
    heap = heaps.get(key)
    if heap is None:
        heap = heaps[key] = TicketHeap()
    return heap


def _discard(heaps: dict[str, TicketHeap[Ticket]], key: str, ticket: Ticket) -> None:
    """Take a ticket out of one keyed heap; an emptied heap leaves its map."""
    heap = heaps.get(key)
    if heap is not None and heap.discard(ticket) and not heap:
        del heaps[key]


def _due(heap: TicketHeap[Ticket], now: float) -> list[Ticket]:
    due: list[Ticket] = []
    while (key := heap.peek_key()) is not None and key <= now:
        ticket = heap.pop()
        assert ticket is not None
        due.append(ticket)
    return due
