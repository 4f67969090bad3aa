"""Session affinity: which backend served each conversation last, for ``ttl`` seconds.

A conversation that goes back to the server that served it finds its prompt in that server's cache.
The memory is bounded twice: entries expire after ``ttl``, and beyond ``max_sessions`` the least
recently served go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["SessionMemory"]


class SessionMemory:
    def __init__(self, clock: Callable[[], float], *, enabled: bool, ttl: float, max_sessions: int) -> None:
        self.clock = clock
        self.enabled = enabled
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()  # key -> backend, expiry

    def __len__(self) -> int:
        return len(self._entries)

    def backend_of(self, key: str | None) -> str | None:
        """Where the session was last served, if that is remembered and not expired."""
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def remember(self, key: str | None, backend: str) -> None:
        if key is None or not self.enabled:
            return
        entries = self._entries
        entries[key] = (backend, self.clock() + self.ttl)
        entries.move_to_end(key)
        while len(entries) > self.max_sessions:
            entries.popitem(last=False)

    def expire(self, now: float) -> None:
        """Forget the sessions whose time is up (the oldest are first)."""
        entries = self._entries
        while entries:
            _, expires = next(iter(entries.values()))
            if expires > now:
                break
            entries.popitem(last=False)
