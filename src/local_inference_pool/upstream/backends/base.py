"""What a probe of one backend found, in the scheduler's terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from local_inference_pool.core.scheduler import Health


@dataclass(frozen=True)
class Snapshot:
    """``None`` means "this probe cannot tell": the pool keeps what it knew."""

    health: Health
    models: list[str] | None = None  # models it can serve
    resident: list[str] | None = None  # models loaded now, most recent first when known
    slots: int | None = None  # slot total, when the server says
    busy: int | None = None  # slots busy on the server, ours included, when the server says
    context: int | None = None  # tokens of context per slot, when the server says
    # What the server says of each model: context_length, and whether it takes tools, images
    # (vision), or serves embeddings; only what it says. None: this probe cannot tell.
    model_info: dict[str, dict[str, Any]] | None = None
    error: str | None = None
    loads_models: bool = False  # it loads and unloads models on request (``model_control``)


def with_latest_alias(names: list[str]) -> list[str]:
    """Ollama names default to the ``latest`` tag: ``llama3.2`` and ``llama3.2:latest`` are one model."""
    out: list[str] = []
    for name in names:
        out.append(name)
        if name.endswith(":latest"):
            out.append(name[: -len(":latest")])
    return list(dict.fromkeys(out))


def positive_int(value: Any) -> int | None:
    """A count a server reported, if it is one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
