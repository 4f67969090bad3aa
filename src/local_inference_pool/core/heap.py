"""A priority queue of tickets that forgets a ticket the moment it is withdrawn.

The scheduler keeps several orders over the same tickets (each model's queue, arrival order,
deadlines, the ends of cache holds, a tenant's parked requests, a backend's pinned and held ones).
A ticket leaves most of them from the middle: it is granted elsewhere, cancelled, or times out. A
plain heap cannot remove from the middle, and a heap that drops such entries only when they reach
its top keeps them for as long as the queue never empties; on a busy gateway that is forever.

Here a withdrawn entry is forgotten at once (the membership map is the truth), and the heap array
is rebuilt whenever its dead entries outnumber the live ones, as asyncio does with cancelled timer
handles. So the memory of every order is bounded by a small multiple of the tickets still in it,
whatever the traffic, and every operation stays O(log n) amortised.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Keyed", "TicketHeap"]

# Below this many dead entries a rebuild costs more than it saves.
_MIN_COMPACT = 32


class Keyed(Protocol):
    """What a heap holds: anything with a unique integer id (a ticket)."""

    @property
    def id(self) -> int: ...


T = TypeVar("T", bound=Keyed)


class TicketHeap(Generic[T]):
    """Items ordered by a key given on ``push``; ``discard`` removes any of them in O(1)."""

    __slots__ = ("_dead", "_heap", "_live", "_seq")

    def __init__(self) -> None:
        # Entries are (key, sequence number, item): the sequence breaks ties between equal keys
        # (a ticket queued again in its old place), so items are never compared.
        self._heap: list[tuple[Any, int, T]] = []
        self._live: dict[int, int] = {}  # item id -> the sequence number of its one live entry
        self._dead = 0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __contains__(self, item: T) -> bool:
        return item.id in self._live

    def __iter__(self) -> Iterator[T]:
        """The live items, in no particular order."""
        live = self._live
        return (item for _, seq, item in self._heap if live.get(item.id) == seq)

    def push(self, key: Any, item: T) -> None:
        """Add an item, or move it to a new key (its old entry dies)."""
        if item.id in self._live:
            self._dead += 1
        self._seq += 1
        self._live[item.id] = self._seq
        heapq.heappush(self._heap, (key, self._seq, item))

    def discard(self, item: T) -> bool:
        """Forget an item; False when it was not here."""
        if self._live.pop(item.id, None) is None:
            return False
        self._dead += 1
        if self._dead > _MIN_COMPACT and self._dead > len(self._live):
            self._compact()
        return True

    def peek(self) -> T | None:
        """The item with the smallest key, or None."""
        heap, live = self._heap, self._live
        while heap:
            _, seq, item = heap[0]
            if live.get(item.id) == seq:
                return item
            heapq.heappop(heap)
            self._dead -= 1
        return None

    def peek_key(self) -> Any:
        """The smallest key, or None."""
        return None if self.peek() is None else self._heap[0][0]

    def pop(self) -> T | None:
        """Remove and return the item with the smallest key, or None."""
        item = self.peek()
        if item is not None:
            heapq.heappop(self._heap)
            del self._live[item.id]
        return item

    def clear(self) -> list[T]:
        """Empty the heap; the items it held, smallest key first."""
        live = self._live
        entries = sorted(entry for entry in self._heap if live.get(entry[2].id) == entry[1])
        self._heap, self._live, self._dead = [], {}, 0
        return [item for _, _, item in entries]

    @property
    def footprint(self) -> int:
        """Entries in the array, dead ones included (what memory it holds)."""
        return len(self._heap)

    def _compact(self) -> None:
        live = self._live
        self._heap = [entry for entry in self._heap if live.get(entry[2].id) == entry[1]]
        heapq.heapify(self._heap)
        self._dead = 0
