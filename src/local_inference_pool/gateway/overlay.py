"""The runtime changes on top of the config file, as one value: what the admin API added, changed,
removed and drained, and which servers registered until when.

An ``Overlay`` is immutable; a change makes a new one (``with_*``), so a change that turns out to
be invalid, or that loses a race with another process, leaves nothing half done. With shared state
it travels as JSON (``to_json``, ``from_json``); a backend added at runtime is kept as its
``[[backends]]`` entry, validated, and read again wherever it is applied.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from local_inference_pool.config import BackendConfig, PoolConfig, backend_from_dict, backend_with

__all__ = ["PATCHABLE", "Overlay", "effective"]

PATCHABLE = ("slots", "weight", "models", "kind", "api_key", "max_loaded_models", "cache_tokens")


@dataclass(frozen=True)
class Overlay:
    # name -> the [[backends]] entry, as the admin API or a registration gave it (validated)
    added: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # registrations: name -> when it ends unless renewed, in seconds since the epoch
    expires: Mapping[str, float] = field(default_factory=dict)
    # config backends' changes: name -> the changed keys
    patched: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()  # config backends removed through the admin API
    drained: frozenset[str] = frozenset()
    # admin reloads asked for the whole fleet: each process reads its own file again when it grows
    reloads: int = 0

    def with_added(self, name: str, entry: Mapping[str, Any], expires: float | None) -> Overlay:
        registrations = {n: t for n, t in self.expires.items() if n != name}
        if expires is not None:
            registrations[name] = expires
        return dataclasses.replace(
            self,
            added={**self.added, name: dict(entry)},
            expires=registrations,
            removed=self.removed - {name},
        )

    def with_patch(self, name: str, changes: Mapping[str, Any]) -> Overlay:
        if name in self.added:
            return dataclasses.replace(self, added={**self.added, name: {**self.added[name], **changes}})
        patched = {**self.patched, name: {**self.patched.get(name, {}), **changes}}
        return dataclasses.replace(self, patched=patched)

    def with_drained(self, name: str, drained: bool) -> Overlay:
        return dataclasses.replace(self, drained=self.drained | {name} if drained else self.drained - {name})

    def with_reload(self) -> Overlay:
        """The same changes, with one more reload asked of every process."""
        return dataclasses.replace(self, reloads=self.reloads + 1)

    def without(self, name: str) -> Overlay:
        """The backend removed: an added one forgotten, a configured one marked removed."""
        return Overlay(
            added={n: e for n, e in self.added.items() if n != name},
            expires={n: t for n, t in self.expires.items() if n != name},
            patched={n: c for n, c in self.patched.items() if n != name},
            removed=self.removed if name in self.added else self.removed | {name},
            drained=self.drained - {name},
            reloads=self.reloads,
        )

    def source(self, name: str) -> str:
        """Where the backend comes from: ``config``, ``admin`` or ``registered``."""
        if name not in self.added:
            return "config"
        return "registered" if name in self.expires else "admin"

    def to_json(self) -> str:
        return json.dumps(
            {
                "added": self.added,
                "expires": self.expires,
                "patched": self.patched,
                "removed": sorted(self.removed),
                "drained": sorted(self.drained),
                "reloads": self.reloads,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Overlay:
        """Raises ``ValueError`` when ``text`` is not an overlay's JSON (the entries themselves are
        checked where they are applied, against the config file there)."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        added, expires, patched = doc.get("added", {}), doc.get("expires", {}), doc.get("patched", {})
        removed, drained, reloads = doc.get("removed", []), doc.get("drained", []), doc.get("reloads", 0)
        if not (
            _mapping_of(added, dict)
            and _mapping_of(patched, dict)
            and _mapping_of(expires, int | float)
            and _list_of_names(removed)
            and _list_of_names(drained)
            and isinstance(reloads, int)
        ):
            raise ValueError("a part of it has the wrong shape")
        return cls(
            added=added,
            expires={name: float(until) for name, until in expires.items()},
            patched=patched,
            removed=frozenset(removed),
            drained=frozenset(drained),
            reloads=reloads,
        )


def effective(base: PoolConfig, overlay: Overlay) -> PoolConfig:
    """The configuration to serve: the base with the overlay, validated whole (``ConfigError``)."""
    backends: list[BackendConfig] = []
    for backend in base.backends:
        if backend.name in overlay.removed:
            continue
        changes = overlay.patched.get(backend.name)
        if changes:
            backend = backend_with(backend, changes, f"backends[{backend.name!r}]", PATCHABLE)
        backends.append(backend)
    configured = {b.name for b in base.backends}
    for name, entry in overlay.added.items():
        if name not in configured:  # a reload named it in the file: the file wins
            backends.append(backend_from_dict(entry, f"backends[{name!r}]"))
    return dataclasses.replace(base, backends=tuple(backends))


def _mapping_of(value: Any, kind: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items()
    )


def _list_of_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)
