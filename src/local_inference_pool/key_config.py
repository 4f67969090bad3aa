"""Client keys with names (``[[keys]]``): who shares the fleet, with what weight, caps and limits.

A key's secret is hashed (SHA-256) as soon as it is read, and only the hash is kept, compared and
stored (in Redis too): the configuration may give the secret, the environment variable that holds
it, or its hash alone. API keys are long random strings, so a plain SHA-256 is the right hash (a
slow password hash would cost every request a millisecond and protect nothing a 128-bit secret
does not), and looking a key up by its hash takes the same time whichever key came close.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from local_inference_pool import config_values as values
from local_inference_pool.errors import ConfigError

__all__ = [
    "BUDGET_PERIODS",
    "KEY_KEYS",
    "LIMIT_KEYS",
    "KeyConfig",
    "hash_key",
    "key_from_dict",
    "key_with",
]

BUDGET_PERIODS = ("day", "week", "month")
# What the admin API may change on a key (its name is its identity; its secret changes by rotation).
LIMIT_KEYS = (
    "weight",
    "max_concurrent",
    "max_queued",
    "priority",
    "max_priority",
    "rpm",
    "tpm",
    "max_tokens",
    "budget_period",
    "models",
    "expires",
    "disabled",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def hash_key(secret: str) -> str:
    """The hex SHA-256 of a key's secret: what is kept, compared and stored instead of it."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One client key with a name (``[[keys]]``). ``key`` is the secret itself, ``key_env`` the
    environment variable that holds it, or ``key_sha256`` its hash; whichever is given, only
    ``key_sha256`` is kept. ``name`` is what metrics, logs, status and the dashboard show."""

    name: str
    key: str | None = field(default=None, repr=False)
    key_env: str | None = None
    key_sha256: str = field(default="", repr=False)
    weight: float = 1.0  # share of contended slots against other keys
    max_concurrent: int | None = None  # leases at once, fleet-wide
    max_queued: int | None = None  # waiting requests (default: the pool's queue_limit)
    priority: int = 0  # of requests without x-priority
    max_priority: int = 100  # x-priority above it is lowered to it
    rpm: int | None = None  # requests per sliding minute, fleet-wide
    tpm: int | None = None  # input plus output tokens per sliding minute, fleet-wide
    max_tokens: int | None = None  # tokens per budget_period
    budget_period: str | float = "month"  # day, week, month (UTC calendar), or seconds
    models: tuple[str, ...] | None = None  # names and glob patterns it may use; None: any
    expires: dt.datetime | None = None  # when the key stops working (UTC)
    disabled: bool = False

    def __post_init__(self) -> None:
        where = f"keys[{self.name!r}]"
        for spec in fields(self):
            if spec.name in KEY_KEYS:
                object.__setattr__(
                    self, spec.name, KEY_KEYS[spec.name](f"{where}.{spec.name}", getattr(self, spec.name))
                )
        given = [name for name in ("key", "key_env", "key_sha256") if getattr(self, name)]
        if len(given) != 1:
            raise ConfigError(
                f"{where}: give exactly one of 'key' (the secret), 'key_env' (its variable) or "
                f"'key_sha256' (its hash)"
            )
        if self.key_env is not None:
            secret = os.environ.get(self.key_env)
            if not secret:
                raise ConfigError(f"{where}.key_env: the environment variable {self.key_env!r} is not set")
            object.__setattr__(self, "key_sha256", hash_key(values.key(f"{where}.key_env", secret)))
        elif self.key is not None:
            object.__setattr__(self, "key_sha256", hash_key(self.key))
        object.__setattr__(self, "key", None)  # only the hash is kept
        if self.priority > self.max_priority:
            raise ConfigError(
                f"{where}.priority: {self.priority} is above its max_priority {self.max_priority}"
            )

    @property
    def limited(self) -> bool:
        """Whether requests of this key are counted against a rate or a budget."""
        return self.rpm is not None or self.tpm is not None or self.max_tokens is not None

    def allows(self, model: str) -> bool:
        """Whether this key may use ``model`` (a name its ``models`` lists, or one a pattern matches)."""
        if self.models is None:
            return True
        return any(model == allowed or fnmatch.fnmatchcase(model, allowed) for allowed in self.models)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires.timestamp()

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON keeps it (the overlay of runtime keys): its hash, never a secret."""
        entry: dict[str, Any] = {"name": self.name, "key_sha256": self.key_sha256}
        for name in LIMIT_KEYS:
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                entry[name] = value.isoformat() if isinstance(value, dt.datetime) else value
        if isinstance(entry.get("models"), tuple):
            entry["models"] = list(entry["models"])
        return entry


def _optional(parse: values.Parser) -> values.Parser:
    return lambda where, value: None if value is None else parse(where, value)


def _sha256(where: str, value: Any) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise ConfigError(f"{where}: expected the key's SHA-256 as 64 hex digits")
    return value.lower()


def _budget_period(where: str, value: Any) -> str | float:
    if value in BUDGET_PERIODS:
        return str(value)
    if values.is_number(value) and value >= 1:
        return float(value)
    raise ConfigError(f"{where}: {value!r} is not allowed; expected day, week, month, or seconds >= 1")


def _expires(where: str, value: Any) -> dt.datetime | None:
    """A date (the key works through that day, UTC) or a date and time (naive: UTC); TOML's own
    or ISO 8601 text, as JSON carries it."""
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):  # not a date: refused below
            value = dt.date.fromisoformat(value) if len(value) == 10 else dt.datetime.fromisoformat(value)
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    raise ConfigError(
        f"{where}: expected a date like 2027-01-31, or a date and time like 2027-01-31T12:00:00Z"
    )


KEY_KEYS: dict[str, values.Parser] = {
    "name": values.key_name,
    "key": values.optional_key,
    "key_env": _optional(values.string),
    "key_sha256": _sha256,
    "weight": values.number(positive=True),
    "max_concurrent": _optional(values.int_at_least(1)),
    "max_queued": _optional(values.int_at_least(0)),
    "priority": values.int_between(-100, 100),
    "max_priority": values.int_between(-100, 100),
    "rpm": _optional(values.int_at_least(0)),
    "tpm": _optional(values.int_at_least(0)),
    "max_tokens": _optional(values.int_at_least(0)),
    "budget_period": _budget_period,
    "models": values.optional_string_list,
    "expires": _expires,
    "disabled": values.flag,
}

_DEFAULTS = {spec.name: spec.default for spec in fields(KeyConfig)}
assert set(KEY_KEYS) == set(_DEFAULTS)


def key_from_dict(entry: Any, where: str) -> KeyConfig:
    """A ``[[keys]]`` entry, checked as the config file's are."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a table with at least 'name' and the key")
    for name in entry:
        if name not in KEY_KEYS:
            raise ConfigError(f"{where}: unknown key {str(name)[:64]!r}; known keys: {', '.join(KEY_KEYS)}")
    if "name" not in entry:
        raise ConfigError(f"{where}.name: missing; every key needs a name")
    return KeyConfig(**entry)


def key_with(key: KeyConfig, changes: Any, where: str) -> KeyConfig:
    """``key`` with ``changes`` (some of ``LIMIT_KEYS``, or ``key_sha256`` for a rotation)."""
    allowed = (*LIMIT_KEYS, "key_sha256")
    if not isinstance(changes, Mapping) or not changes:
        raise ConfigError(f"{where}: expected a JSON object with one or more of {', '.join(LIMIT_KEYS)}")
    for name in changes:
        if name not in allowed:
            raise ConfigError(
                f"{where}.{str(name)[:64]}: may not be changed (changeable: {', '.join(LIMIT_KEYS)})"
            )
    current = {spec.name: getattr(key, spec.name) for spec in fields(KeyConfig)}
    current.update(changes)
    return KeyConfig(**current)
