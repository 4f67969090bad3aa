"""What the fleet's shared store says, and what a process tells it: plain values, no I/O (the
store's client is ``shared_state``; the pool reads these without loading it), and what the
scheduler makes of what other processes say."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from local_inference_pool.core.scheduler import Scheduler

__all__ = ["Claimed", "FleetView", "Head", "Standing", "granted_elsewhere", "remember_affinity"]


@dataclass(frozen=True)
class Standing:
    """What a script on one backend needs from this process: the backend as the process sees it,
    and the request (the process's best waiter for it) whose view of the fleet's queue it asks for."""

    capacity: int  # slots, less busy slots from outside the pool
    max_models: int
    models: tuple[str, ...]  # the backend's models: whose queues hold slots for earlier waiters
    priority: int = 0  # default: a request arriving now at the default priority
    waited: float = 0.0  # seconds


@dataclass(frozen=True)
class Head:
    """A process's next waiting request for one model: what the fleet's queue order compares."""

    priority: int
    waited: float  # seconds, when sent
    waiting: int  # how many wait for the model in that process


@dataclass(frozen=True)
class FleetView:
    """One backend as the store saw it: the other processes' leases (in all, and per model), the
    free slots held for earlier waiters elsewhere, and how long ago (s) the newest request granted
    anywhere arrived (None: none yet)."""

    leases: int
    models: dict[str, int] = field(default_factory=dict)
    reserved: int = 0
    newest_age: float | None = None

    @classmethod
    def from_reply(cls, reply: list[Any]) -> FleetView:
        pairs = reply[3:]
        newest = int(reply[2])
        return cls(
            int(reply[0]),
            {_text(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)},
            reserved=int(reply[1]),
            newest_age=None if newest < 0 else newest / 1000,
        )


class Claimed(IntEnum):
    """How a claim ended."""

    WON = 1
    FULL = 0  # the fleet holds every slot
    OTHER_MODEL = 2  # the drain guard: another model is active there, no room for a second
    QUEUED_ELSEWHERE = 3  # the free slots belong to requests that came earlier to other processes
    RELEASED = 4  # the lease was released before its claim arrived
    SESSION_ELSEWHERE = 5  # the fleet served the request's session on another backend
    KEY_FULL = 6  # the client's key holds its max_concurrent leases across the fleet


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def granted_elsewhere(scheduler: Scheduler, arrival: float) -> None:
    """A request that arrived at ``arrival`` was granted elsewhere (another process of the fleet):
    waiters here that arrived ``starvation_bound`` before it starve, as if it were here."""
    if arrival > scheduler.placement.newest_granted:
        scheduler.placement.newest_granted = arrival
        if scheduler.queues.by_model:
            scheduler.dispatch.serve_starving()


def remember_affinity(scheduler: Scheduler, key: str, backend: str) -> None:
    """Where a session was last served (another process of the fleet says): its next grant
    prefers that backend."""
    if backend in scheduler.backends:
        scheduler.sessions.remember(key, backend)
