"""The runtime changes on top of the config file, as one value: what the admin API added, changed,
removed and drained, which servers registered until when, and the client keys added, changed or
removed at runtime (kept by their hash: a key's secret is never in the overlay, nor in Redis).

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
from local_inference_pool.key_config import KeyConfig, key_from_dict, key_with

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
    # client keys: name -> the [[keys]] entry added at runtime (its hash, never its secret)
    keys: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    keys_patched: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # config keys' changes
    keys_removed: frozenset[str] = frozenset()  # config keys removed through the admin API

    def with_key(self, entry: Mapping[str, Any]) -> Overlay:
        name = str(entry["name"])
        return dataclasses.replace(
            self, keys={**self.keys, name: dict(entry)}, keys_removed=self.keys_removed - {name}
        )

    def with_key_patch(self, name: str, changes: Mapping[str, Any]) -> Overlay:
        if name in self.keys:
            return dataclasses.replace(self, keys={**self.keys, name: {**self.keys[name], **changes}})
        patched = {**self.keys_patched, name: {**self.keys_patched.get(name, {}), **changes}}
        return dataclasses.replace(self, keys_patched=patched)

    def without_key(self, name: str) -> Overlay:
        return dataclasses.replace(
            self,
            keys={n: e for n, e in self.keys.items() if n != name},
            keys_patched={n: c for n, c in self.keys_patched.items() if n != name},
            keys_removed=self.keys_removed if name in self.keys else self.keys_removed | {name},
        )

    def key_source(self, name: str) -> str:
        return "admin" if name in self.keys else "config"

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
        return dataclasses.replace(
            self,
            added={n: e for n, e in self.added.items() if n != name},
            expires={n: t for n, t in self.expires.items() if n != name},
            patched={n: c for n, c in self.patched.items() if n != name},
            removed=self.removed if name in self.added else self.removed | {name},
            drained=self.drained - {name},
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
                "keys": self.keys,
                "keys_patched": self.keys_patched,
                "keys_removed": sorted(self.keys_removed),
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
        keys, keys_patched = doc.get("keys", {}), doc.get("keys_patched", {})
        keys_removed = doc.get("keys_removed", [])
        if not (
            _mapping_of(added, dict)
            and _mapping_of(patched, dict)
            and _mapping_of(expires, int | float)
            and _list_of_names(removed)
            and _list_of_names(drained)
            and isinstance(reloads, int)
            and _mapping_of(keys, dict)
            and _mapping_of(keys_patched, dict)
            and _list_of_names(keys_removed)
        ):
            raise ValueError("a part of it has the wrong shape")
        return cls(
            added=added,
            expires={name: float(until) for name, until in expires.items()},
            patched=patched,
            removed=frozenset(removed),
            drained=frozenset(drained),
            reloads=reloads,
            keys=keys,
            keys_patched=keys_patched,
            keys_removed=frozenset(keys_removed),
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
    keys: list[KeyConfig] = []
    for key in base.keys:
        if key.name in overlay.keys_removed:
            continue
        changes = overlay.keys_patched.get(key.name)
        keys.append(key_with(key, changes, f"keys[{key.name!r}]") if changes else key)
    named = {k.name for k in base.keys}
    keys += [key_from_dict(e, f"keys[{n!r}]") for n, e in overlay.keys.items() if n not in named]
    return dataclasses.replace(base, backends=tuple(backends), keys=tuple(keys))


def _mapping_of(value: Any, kind: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items()
    )


def _list_of_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)
