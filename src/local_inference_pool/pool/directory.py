"""What the pool knows of each backend beyond its slots: the configuration it was given, the key it
is called with, the models warmed on it, and the facts the status page shows (detected kind,
circuit, last error). The scheduler keeps the slots; this keeps the rest, and forgets all of it
when the backend leaves, so a backend added again under its name starts anew."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from local_inference_pool.config import BackendConfig

__all__ = ["BackendDirectory"]


class BackendDirectory:
    def __init__(self) -> None:
        self._configs: dict[str, BackendConfig] = {}
        self._warm: dict[str, dict[str, float]] = {}  # backend -> model -> when (wall clock)
        self._info: dict[str, dict[str, Any]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._configs

    def add(self, config: BackendConfig) -> None:
        self._configs[config.name] = config

    def remove(self, name: str) -> None:
        del self._configs[name]
        self._warm.pop(name, None)
        self._info.pop(name, None)

    def configs(self) -> list[BackendConfig]:
        """The configuration of every backend in the pool now."""
        return list(self._configs.values())

    def api_key(self, name: str) -> str | None:
        """The outbound key for the backend (never a client's)."""
        config = self._configs.get(name)
        return None if config is None else config.api_key

    def detected(self, name: str, *, slots: int | None, models: Iterable[str] | None) -> dict[str, Any]:
        """What a probe found of the slots and models, less what the configuration fixes (a
        configured slot count or model list wins over a detected one)."""
        config = self._configs[name]
        found: dict[str, Any] = {}
        if slots is not None and config.slots is None:
            found["slots"] = slots
        if models is not None and config.models is None:
            found["models"] = list(models)
        return found

    def kind(self, name: str) -> str:
        """The backend's kind: configured, else as detected (``auto`` until a probe says)."""
        config = self._configs.get(name)
        if config is not None and config.kind != "auto":
            return config.kind
        return str(self._info.get(name, {}).get("detected_kind", "auto"))

    def annotate(self, name: str, **info: Any) -> None:
        """Facts for the status page; a probe that ends after its backend went adds nothing."""
        if name in self._configs:
            self._info.setdefault(name, {}).update(info)

    def loads_models(self, name: str) -> bool:
        """Whether its server loads and unloads models on request, as a probe found."""
        return self._info.get(name, {}).get("loads_models") is True

    def model_info(self, name: str, model: str) -> dict[str, Any]:
        """What the backend's server said of ``model`` (``context_length``, ``tools``, ``vision``,
        ``embeddings``; only what it said)."""
        info = self._info.get(name, {}).get("model_info")
        facts = info.get(model) if isinstance(info, dict) else None
        return dict(facts) if isinstance(facts, dict) else {}

    def note_warm(self, name: str, model: str, when: float) -> None:
        """A model was warmed on the backend (wall-clock time): shown as ``warm_models``."""
        if name in self._configs:
            self._warm.setdefault(name, {})[model] = when

    def describe(self, name: str) -> dict[str, Any]:
        """The backend's entries in the status page's view of it."""
        config = self._configs.get(name)
        return {
            "kind": config.kind if config else "auto",
            "warm_models": sorted(self._warm.get(name, {})),
            **self._info.get(name, {}),
        }
