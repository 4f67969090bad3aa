"""Client keys added, changed, disabled, rotated and removed while the pool serves (the admin API).

Each change is an overlay on the config file's ``[[keys]]`` and goes through ``FleetChanges``: it is
validated whole, and with ``[pool] state`` written to Redis first and applied by every process within
``POLL`` seconds (at once, where the notice arrives). A key's secret is hashed before it goes
anywhere: the overlay, Redis and the logs hold its SHA-256 and its name only. A secret the pool
makes (adding a key without one, or rotating one) is answered once and never kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from local_inference_pool.config import PoolConfig
from local_inference_pool.gateway.changes import ChangeRefused, FleetChanges
from local_inference_pool.gateway.overlay import Overlay
from local_inference_pool.key_config import LIMIT_KEYS, KeyConfig, hash_key, key_from_dict, key_with

__all__ = ["MAX_RUNTIME_KEYS", "KeyChanges", "new_secret"]

logger = logging.getLogger(__name__)

MAX_RUNTIME_KEYS = 10_000


def new_secret() -> str:
    """A key the pool makes: 256 random bits, in the ``sk-`` form clients expect."""
    return "sk-lip-" + secrets.token_urlsafe(32)


class KeyChanges:
    def __init__(self, changes: FleetChanges) -> None:
        self._changes = changes

    def keys(self) -> list[dict[str, Any]]:
        """Every key with its settings and where it comes from, never its secret nor its hash."""
        overlay = self._changes.overlay
        return [_described(key, overlay) for key in self._changes.configuration(overlay).keys]

    async def add(self, entry: Any, *, who: str) -> dict[str, Any]:
        """A new key: ``entry`` has the keys of a ``[[keys]]`` entry; without ``key`` (or
        ``key_sha256``) the pool makes the secret, answered this once under ``key``."""
        if not isinstance(entry, Mapping):
            raise ChangeRefused(
                400, "expected a JSON object with the keys of a [[keys]] entry", "invalid_key"
            )
        if "key_env" in entry:
            raise ChangeRefused(400, "key_env is for the config file; send key or key_sha256", "invalid_key")
        made = None if ("key" in entry or "key_sha256" in entry) else new_secret()
        given = dict(entry) if made is None else {**entry, "key": made}
        key: KeyConfig = _checked(lambda: key_from_dict(given, "key"))
        stored = key.to_dict()

        def change(overlay: Overlay) -> Overlay:
            current = self._changes.configuration(overlay, "invalid_key")
            if any(k.name == key.name for k in current.keys):
                raise ChangeRefused(
                    409, f"a key named {key.name!r} exists: change it with PATCH", "key_exists"
                )
            if len(overlay.keys) >= MAX_RUNTIME_KEYS:
                raise ChangeRefused(
                    409, f"at most {MAX_RUNTIME_KEYS} keys may be added at runtime", "too_many_keys"
                )
            wanted = overlay.with_key(stored)
            self._changes.configuration(wanted, "invalid_key")  # a secret another key has, say
            return wanted

        await self._changes.commit(change)
        logger.info("%s added key %s", who, key.name)
        answer = self._describe(key.name)
        return answer if made is None else {**answer, "key": made}

    async def patch(self, name: str, changes: Any, *, who: str) -> dict[str, Any]:
        """Change a key's limits, weight, models, expiry, or disable it (``disabled: true``)."""
        if not isinstance(changes, Mapping) or not changes or not set(changes) <= set(LIMIT_KEYS):
            raise ChangeRefused(
                400, f"expected a JSON object with some of {', '.join(LIMIT_KEYS)}", "invalid_key"
            )
        await self._commit_patch(name, dict(changes))
        logger.info("%s changed key %s: %s", who, name, ", ".join(sorted(changes)))
        return self._describe(name)

    async def rotate(self, name: str, *, who: str) -> dict[str, Any]:
        """A new secret for the key, answered once; the old one stops working at once."""
        secret = new_secret()
        await self._commit_patch(name, {"key_sha256": hash_key(secret)})
        logger.info("%s rotated key %s", who, name)
        return {**self._describe(name), "key": secret}

    async def remove(self, name: str, *, who: str) -> dict[str, Any]:
        def change(overlay: Overlay) -> Overlay:
            self._known(name, overlay)
            return overlay.without_key(name)

        await self._changes.commit(change)
        logger.info("%s removed key %s", who, name)
        return {"name": name, "removed": True}

    async def _commit_patch(self, name: str, changes: dict[str, Any]) -> None:
        changed = _checked(lambda: key_with(self._known(name, self._changes.overlay), changes, "key"))
        stored_changes = {field: _jsonable(getattr(changed, field)) for field in changes}

        def change(overlay: Overlay) -> Overlay:
            current = self._known(name, overlay)
            _checked(lambda: key_with(current, changes, "key"))
            wanted = overlay.with_key_patch(name, stored_changes)
            self._changes.configuration(wanted, "invalid_key")
            return wanted

        await self._changes.commit(change)

    def _known(self, name: str, overlay: Overlay) -> KeyConfig:
        config: PoolConfig = self._changes.configuration(overlay, "invalid_key")
        for key in config.keys:
            if key.name == name:
                return key
        raise ChangeRefused(404, f"no key named {name[:64]!r}", "key_not_found")

    def _describe(self, name: str) -> dict[str, Any]:
        return _described(self._known(name, self._changes.overlay), self._changes.overlay)


def _described(key: KeyConfig, overlay: Overlay) -> dict[str, Any]:
    shown = key.to_dict()
    del shown["key_sha256"]
    return {**shown, "source": overlay.key_source(key.name)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return list(value) if isinstance(value, tuple) else value


def _checked(make: Any) -> Any:
    try:
        return make()
    except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
        raise ChangeRefused(400, str(exc), "invalid_key") from None
