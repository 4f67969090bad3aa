"""The parsers of the configuration's values: each takes where a value is (``pool.queue_limit``)
and the value, and returns it checked (and normalized) or raises ``ConfigError`` naming the field,
the value and what is allowed. ``config`` lists which key takes which."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from local_inference_pool.errors import ConfigError

__all__ = [
    "Parser",
    "choice",
    "flag",
    "int_at_least",
    "int_between",
    "is_number",
    "key",
    "key_list",
    "key_name",
    "number",
    "optional_key",
    "optional_string",
    "optional_string_list",
    "route_path",
    "state_url",
    "string",
    "string_list",
]

Parser = Callable[[str, Any], Any]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(minimum: int) -> Parser:
    def parse(where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected an integer >= {minimum}")
        return value

    return parse


def number(*, positive: bool, optional: bool = False) -> Parser:
    allowed = "a number > 0" if positive else "a number >= 0"
    if optional:
        allowed += " (omit it for no limit)"

    def parse(where: str, value: Any) -> float | None:
        if value is None and optional:
            return None
        if not is_number(value) or value < 0 or (positive and value == 0):
            raise ConfigError(f"{where}: {value!r} is not allowed; expected {allowed}")
        return float(value)

    return parse


def flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not allowed; expected true or false")
    return value


def string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {value!r} is not allowed; expected a non-empty string")
    return value


def optional_string(where: str, value: Any) -> str | None:
    return None if value is None else string(where, value)


def key(where: str, value: Any) -> str:
    """A key goes into an HTTP header: printable ASCII without spaces."""
    if not isinstance(value, str) or not value or not all(33 <= ord(c) <= 126 for c in value):
        shown = (
            "a key with spaces or non-ASCII characters" if isinstance(value, str) and value else repr(value)
        )
        raise ConfigError(f"{where}: {shown} is not allowed; expected printable ASCII without spaces")
    return value


def optional_key(where: str, value: Any) -> str | None:
    return None if value is None else key(where, value)


def key_list(where: str, value: Any) -> tuple[str, ...]:
    return tuple(key(f"{where}[{i}]", v) for i, v in enumerate(string_list(where, value)))


def string_list(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {value!r} is not allowed; expected a list of non-empty strings")
    return tuple(value)


def optional_string_list(where: str, value: Any) -> tuple[str, ...] | None:
    return None if value is None else string_list(where, value)


def state_url(where: str, value: Any) -> str:
    """A Redis URL; never echoed, since it may hold the store's password."""
    if not isinstance(value, str) or urlsplit(value.strip()).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{where}: expected a URL like 'redis://host:6379/0' (rediss:// for TLS)")
    return value.strip()


def int_between(low: int, high: int) -> Parser:
    def parse(where: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected an integer from {low} to {high}")
        return value

    return parse


def route_path(where: str, value: Any) -> str:
    path = string(where, value)
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path) or {".", ".."} & set(path.split("/")):
        raise ConfigError(
            f"{where}: {path!r} is not allowed; a path like '/v1/something' (letters, digits, . _ ~ -)"
        )
    return path


def choice(*allowed: str) -> Parser:
    def parse(where: str, value: Any) -> str:
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; one of {', '.join(allowed)}")
        return str(value)

    return parse


def key_name(where: str, value: Any) -> str:
    name = string(where, value)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ConfigError(f"{where}: {name!r} is not allowed; 1-64 letters, digits, '.', '_' or '-'")
    return name
