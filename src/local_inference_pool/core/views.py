"""What the scheduler's state says, read only: its queues, models and backends, for the pool, the
gateway and status. Apart from ``Scheduler``, whose methods decide and change."""

from __future__ import annotations

from collections.abc import Iterator

from local_inference_pool.core.backends import BackendTable
from local_inference_pool.core.model import Backend, Ticket
from local_inference_pool.core.queues import Queues

__all__ = ["SchedulerViews"]


class SchedulerViews:
    """Read-only questions to a scheduler's indexes (``Scheduler`` makes them)."""

    table: BackendTable
    backends: dict[str, Backend]
    queues: Queues

    @property
    def waiting(self) -> int:
        return self.queues.total

    def waiting_tickets(self) -> Iterator[Ticket]:
        return self.queues.waiting()

    def head(self, model: str) -> Ticket | None:
        """The model's next waiting ticket in queue order (priority, then arrival); pinned ones aside."""
        return self.queues.head(model)

    def waiting_models(self) -> list[str]:
        """The models with waiting tickets (pinned included)."""
        return list(self.queues.by_model)

    def waiting_for(self, model: str) -> int:
        return self.queues.by_model.get(model, 0)

    def oldest_waiting(self, model: str) -> Ticket | None:
        return self.queues.oldest(model)

    def models(self) -> list[str]:
        """Every model some backend lists (healthy or not), sorted."""
        return sorted(self.table.serving)

    def serves(self, model: str) -> bool:
        """Whether any backend lists the model (healthy or not)."""
        return bool(self.table.serving.get(model))

    def check_servable(self, model: str, pin: str | None = None) -> None:
        """Raise as ``submit`` would when the model cannot be served now."""
        self.table.check_servable(model, pin)

    def drained(self, name: str) -> bool:
        """Whether the backend is drained: draining, and no lease of this process runs on it."""
        backend = self.backends.get(name)
        return backend is None or (backend.draining and not backend.active_total)

    def held_on(self, backend: Backend) -> int:
        """Requests waiting for the backend's prompt cache."""
        return len(self.queues.held_on(backend))
