"""Pool configuration: frozen, typed, loaded from a dict, a TOML file or the environment.

Every invalid value raises ConfigError naming the field, the value and what is allowed. The TOML
file is a public contract: README.md documents every key listed in POOL_KEYS and BACKEND_KEYS.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from local_inference_pool import config_values as values
from local_inference_pool.errors import ConfigError
from local_inference_pool.key_config import KEY_KEYS, KeyConfig, hash_key, key_from_dict
from local_inference_pool.model_config import MODEL_KEYS, ModelConfig, check_models, models_from_list
from local_inference_pool.telemetry_config import TelemetryConfig, telemetry_from_dict

__all__ = [
    "BACKEND_KINDS",
    "KEY_KEYS",
    "MODEL_KEYS",
    "BackendConfig",
    "BackendKind",
    "ConfigSource",
    "KeyConfig",
    "ModelConfig",
    "PoolConfig",
    "RouteConfig",
    "backend_from_dict",
    "backend_with",
    "load_config",
    "normalize_url",
]

BackendKind = Literal["auto", "llamacpp", "lmstudio", "ollama", "vllm", "openai"]
BACKEND_KINDS: tuple[BackendKind, ...] = ("auto", "llamacpp", "lmstudio", "ollama", "vllm", "openai")
ENV_PREFIX = "LIP_"


def without_userinfo(url: object) -> object:
    """``url`` as it may be shown: any ``user:password@`` taken out (other values as they are)."""
    if isinstance(url, str) and "@" in url:
        scheme, sep, rest = url.partition("://")
        authority, slash, path = rest.partition("/")
        return scheme + sep + authority.rpartition("@")[2] + slash + path
    return url


def normalize_url(url: str, *, where: str = "url") -> str:
    """Strip whitespace, trailing slashes and one trailing ``/v1``: both spellings mean one server."""
    if not isinstance(url, str):
        raise ConfigError(f"{where}: {url!r} is not allowed; expected a string like 'http://host:port'")
    cleaned = url.strip().rstrip("/")
    if cleaned.endswith("/v1"):
        cleaned = cleaned[: -len("/v1")].rstrip("/")
    try:
        parts = urlsplit(cleaned)
        userinfo = "@" in parts.netloc
    except ValueError:
        raise ConfigError(f"{where}: not a URL like 'http://host:port'") from None
    if userinfo:  # said without the URL: it holds a password, which must not reach a log
        raise ConfigError(
            f"{where}: a backend URL must not carry a user name or password (status pages and logs "
            "show backend URLs); put the backend's key in api_key instead"
        )
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: {url!r} is not allowed; the scheme must be http or https")
    if not parts.hostname:
        raise ConfigError(f"{where}: {url!r} is not allowed; it names no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"{where}: {url!r} is not allowed; the port is not a number 1-65535") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: {url!r} is not allowed; a backend URL has no query or fragment")
    return cleaned


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One inference server. ``slots``/``models`` None means: detect from the server."""

    url: str
    name: str = ""
    kind: BackendKind = "auto"
    slots: int | None = None
    models: tuple[str, ...] | None = None
    max_loaded_models: int = 1
    weight: float = 1.0
    api_key: str | None = field(default=None, repr=False)
    cache_tokens: int | None = None  # prompt tokens its cache holds; default slots x context

    def __post_init__(self) -> None:
        shown = self.name or without_userinfo(self.url)
        _validate_fields(self, BACKEND_KEYS, f"backend {shown!r}", skip_empty={"name"})
        url = self.url
        if not self.name:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            object.__setattr__(self, "name", f"{parts.hostname}:{port}")


ROUTE_MODELS = ("body", "optional", "form")
ROUTE_DIALECTS = ("openai", "responses", "anthropic")


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One more route of a kind the pool knows (``[[routes]]``): ``path`` under the mount, passed to
    the backend's ``upstream`` path; ``model`` from the JSON body (``body``), optional there when the
    pool serves one model (``optional``), or a multipart form field (``form``); ``slot``: whether it
    takes a slot; ``dialect``: the shape of the pool's own errors."""

    path: str
    upstream: str
    model: str = "body"
    slot: bool = True
    dialect: str = "openai"

    def __post_init__(self) -> None:
        _validate_fields(self, ROUTE_KEYS, f"route {self.path!r}")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    backends: tuple[BackendConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    keys: tuple[KeyConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()  # [[models]]: names and aliases
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # [telemetry]
    queue_limit: int = 1000
    queue_timeout: float | None = None
    starvation_bound: float = 30.0
    affinity: bool = True
    affinity_ttl: float = 1800.0
    affinity_max_sessions: int = 10_000
    cache_wait_max: float = 10.0
    prefill_ms_per_token: float = 0.5
    prefix_min_tokens: int = 256
    prefix_index_blocks: int = 65_536
    health_interval: float = 5.0
    health_timeout: float = 3.0
    connect_timeout: float = 5.0
    read_timeout: float | None = 600.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_priority: int = 100  # x-priority above it is lowered to it, for requests under no [[keys]]
    public_status: bool = False
    max_body_size: int = 16 * 1024 * 1024
    shutdown_grace: float = 30.0
    circuit_failures: int = 3
    circuit_cooldown: float = 10.0
    send_timeout: float = 60.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_size: int = 32 * 1024
    max_headers: int = 100
    state: str | None = field(default=None, repr=False)  # redis:// URL: leases shared by processes
    lease_ttl: float = 30.0
    midstream_failovers: int = 1
    midstream_replay_tokens: int = 256
    response_ttl: float = 3600.0
    response_max_ids: int = 10_000
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # the admin API's; off when empty
    drain_timeout: float = 120.0  # a drain's bound: leases still running then are cut
    # Who holds each client key, by its SHA-256: a [[keys]] name, or api_keys[i]. Made, not given.
    holders: Mapping[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate_fields(self, POOL_KEYS, "pool")
        object.__setattr__(self, "models", tuple(self.models))
        check_models(self.models)
        seen_urls: dict[str, int] = {}
        seen_names: dict[str, int] = {}
        for index, backend in enumerate(self.backends):
            if backend.url in seen_urls:
                raise ConfigError(
                    f"backends[{index}].url: {backend.url!r} is not allowed; it duplicates "
                    f"backends[{seen_urls[backend.url]}] (a trailing '/' or '/v1' names the same server)"
                )
            if backend.name in seen_names:
                raise ConfigError(
                    f"backends[{index}].name: {backend.name!r} is not allowed; it duplicates "
                    f"backends[{seen_names[backend.name]}]; names must be unique"
                )
            seen_urls[backend.url] = index
            seen_names[backend.name] = index
        key_names: set[str] = set()
        hashes = {hash_key(key) for key in self.api_keys}
        for entry in self.keys:
            if entry.name in key_names:
                raise ConfigError(f"keys: the name {entry.name!r} is given twice; names must be unique")
            if entry.key_sha256 in hashes:
                raise ConfigError(f"keys[{entry.name!r}]: its key is also another key's (or in api_keys)")
            key_names.add(entry.name)
            hashes.add(entry.key_sha256)
        holders = {hash_key(key): f"api_keys[{index}]" for index, key in enumerate(self.api_keys)}
        holders.update((entry.key_sha256, entry.name) for entry in self.keys)
        object.__setattr__(self, "holders", holders)
        if hashes & {hash_key(key) for key in self.admin_keys}:
            raise ConfigError(
                "pool.admin_keys: an admin key is also a user key (in api_keys or [[keys]]); an admin "
                "key must be a secret of its own"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolConfig:
        """Build from the TOML shape: ``{"pool": {...}, "backends": [{...}, ...]}``."""
        _reject_unknown(data, {"pool", "backends", "routes", "keys", "models", "telemetry"}, "config")
        pool_section = data.get("pool", {})
        if not isinstance(pool_section, Mapping):
            raise ConfigError(f"pool: {pool_section!r} is not allowed; expected a table")
        backends_section = data.get("backends", [])
        if not isinstance(backends_section, list):
            raise ConfigError(f"backends: {backends_section!r} is not allowed; expected an array of tables")
        backends = tuple(
            backend_from_dict(entry, f"backends[{index}]") for index, entry in enumerate(backends_section)
        )
        routes = tuple(RouteConfig(**entry) for entry in _tables(data, "routes", ROUTE_KEYS))
        keys_section = data.get("keys", [])
        if not isinstance(keys_section, list):
            raise ConfigError(f"keys: {keys_section!r} is not allowed; expected an array of tables")
        keys = tuple(key_from_dict(entry, f"keys[{index}]") for index, entry in enumerate(keys_section))
        telemetry = telemetry_from_dict(data.get("telemetry", {}))
        models = models_from_list(data.get("models", []))
        _check_backend_names(models, backends)
        return cls(
            backends=backends,
            routes=routes,
            keys=keys,
            models=models,
            telemetry=telemetry,
            **_parse_section(pool_section, POOL_KEYS, "pool"),
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> PoolConfig:
        try:
            with Path(path).open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(data)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> PoolConfig:
    """The file (``path`` or ``$LIP_CONFIG``), then ``LIP_*`` pool keys from the environment on top.

    Backends from the environment (``LIP_BACKENDS`` as comma-separated URLs, or the older
    ``LOCAL_INFERENCE_SERVER_<N>`` / ``LOCAL_INFERENCE_SERVER_<N>_KEY`` list) are added to the file's.
    """
    env = os.environ if environ is None else environ
    path = path if path is not None else env.get(f"{ENV_PREFIX}CONFIG") or None
    base = PoolConfig.from_toml(path) if path is not None else PoolConfig()
    return _apply_env(base, env)


# --- field specifications -------------------------------------------------------------------

Parser = values.Parser


def _kind(where: str, value: Any) -> BackendKind:
    if value not in BACKEND_KINDS:
        raise ConfigError(f"{where}: {value!r} is not allowed; expected one of {' | '.join(BACKEND_KINDS)}")
    return cast(BackendKind, value)


def shown_state(url: str | None) -> str | None:
    """The state store's URL as it may be shown or logged: any password replaced by ***."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _url(where: str, value: Any) -> str:
    return normalize_url(value, where=where)


POOL_KEYS: dict[str, Parser] = {
    "queue_limit": values.int_at_least(0),
    "queue_timeout": values.number(positive=True, optional=True),
    "starvation_bound": values.number(positive=False),
    "affinity": values.flag,
    "affinity_ttl": values.number(positive=True),
    "affinity_max_sessions": values.int_at_least(1),
    "cache_wait_max": values.number(positive=False),
    "prefill_ms_per_token": values.number(positive=False),
    "prefix_min_tokens": values.int_at_least(1),
    "prefix_index_blocks": values.int_at_least(1),
    "health_interval": values.number(positive=True),
    "health_timeout": values.number(positive=True),
    "connect_timeout": values.number(positive=True),
    "read_timeout": values.number(positive=True, optional=True),
    "api_keys": values.key_list,
    "max_priority": values.int_between(-100, 100),
    "public_status": values.flag,
    "max_body_size": values.int_at_least(1),
    "shutdown_grace": values.number(positive=False),
    "circuit_failures": values.int_at_least(1),
    "circuit_cooldown": values.number(positive=True),
    "send_timeout": values.number(positive=True),
    "header_timeout": values.number(positive=True),
    "body_timeout": values.number(positive=True),
    "max_header_size": values.int_at_least(1024),
    "max_headers": values.int_at_least(8),
    "state": lambda where, value: None if value is None else values.state_url(where, value),
    "lease_ttl": values.number(positive=True),
    "midstream_failovers": values.int_at_least(0),
    "midstream_replay_tokens": values.int_at_least(0),
    "response_ttl": values.number(positive=True),
    "response_max_ids": values.int_at_least(1),
    "admin_keys": values.key_list,
    "drain_timeout": values.number(positive=False),
}


ROUTE_KEYS: dict[str, Parser] = {
    "path": values.route_path,
    "upstream": values.route_path,
    "model": values.choice(*ROUTE_MODELS),
    "slot": values.flag,
    "dialect": values.choice(*ROUTE_DIALECTS),
}

BACKEND_KEYS: dict[str, Parser] = {
    "url": _url,
    "name": values.string,
    "kind": _kind,
    "slots": lambda where, value: None if value is None else values.int_at_least(1)(where, value),
    "models": values.optional_string_list,
    "max_loaded_models": values.int_at_least(1),
    "weight": values.number(positive=True),
    "api_key": values.optional_key,
    "cache_tokens": lambda where, value: None if value is None else values.int_at_least(1)(where, value),
}

assert set(POOL_KEYS) == {f.name for f in fields(PoolConfig) if f.init} - {
    "backends",
    "routes",
    "keys",
    "models",
    "telemetry",
}
assert set(BACKEND_KEYS) == {f.name for f in fields(BackendConfig)}


def _check_backend_names(models: tuple[ModelConfig, ...], backends: tuple[BackendConfig, ...]) -> None:
    """Each ``serve_as`` names a backend of the file or a kind (a backend that joins later, by its
    kind), and each ``preload`` a backend of the file. Checked as the file is read, not on runtime
    changes: removing a backend keeps working."""
    known = {backend.name for backend in backends} | set(BACKEND_KINDS)
    for index, model in enumerate(models):
        for where, _ in model.serve_as:
            if where not in known:
                raise ConfigError(
                    f"models[{index}].serve_as: {where!r} is neither a backend's name nor a kind "
                    f"({', '.join(BACKEND_KINDS)})"
                )
        if not isinstance(model.preload, bool):
            for where in model.preload:
                if where not in known - set(BACKEND_KINDS):
                    raise ConfigError(f"models[{index}].preload: {where!r} is not a backend's name")


def _validate_fields(
    obj: object, spec: Mapping[str, Parser], where: str, skip_empty: set[str] | None = None
) -> None:
    """Run every field through its parser, storing the normalised value (lists become tuples)."""
    for key, parse in spec.items():
        value = getattr(obj, key)
        if skip_empty and key in skip_empty and not value:
            continue
        object.__setattr__(obj, key, parse(f"{where}.{key}", value))


def _reject_unknown(data: Mapping[str, Any], known: set[str] | Mapping[str, Any], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _parse_section(data: Mapping[str, Any], spec: Mapping[str, Parser], where: str) -> dict[str, Any]:
    _reject_unknown(data, spec, where)
    return {key: spec[key](f"{where}.{key}", value) for key, value in data.items()}


def _tables(data: Mapping[str, Any], name: str, spec: Mapping[str, Parser]) -> list[dict[str, Any]]:
    """An array of tables (``[[name]]``), each checked against ``spec``."""
    section = data.get(name, [])
    if not isinstance(section, list) or not all(isinstance(entry, Mapping) for entry in section):
        raise ConfigError(f"{name}: {section!r} is not allowed; expected an array of tables")
    return [_parse_section(entry, spec, f"{name}[{index}]") for index, entry in enumerate(section)]


def backend_from_dict(entry: Any, where: str) -> BackendConfig:
    """A ``[[backends]]`` entry (a table, or a URL alone), checked as the config file's are."""
    if isinstance(entry, str):
        entry = {"url": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: {entry!r} is not allowed; expected a table with at least 'url'")
    if "url" not in entry:
        raise ConfigError(f"{where}.url: missing; every backend needs a url like 'http://127.0.0.1:8080'")
    return BackendConfig(**_parse_section(entry, BACKEND_KEYS, where))


def backend_with(backend: BackendConfig, changes: Any, where: str, allowed: tuple[str, ...]) -> BackendConfig:
    """``backend`` with ``changes`` (a table of some of its keys, only ``allowed`` ones), checked as
    the config file's are."""
    if not isinstance(changes, Mapping) or not changes:
        raise ConfigError(f"{where}: expected a JSON object with one or more of {', '.join(allowed)}")
    for key in changes:
        if key not in allowed:
            known = BACKEND_KEYS if key in BACKEND_KEYS else allowed
            hint = "may not be changed; remove the backend and add it" if key in known else "is not a key"
            raise ConfigError(f"{where}.{str(key)[:64]}: {hint} (changeable: {', '.join(allowed)})")
    values = {f.name: getattr(backend, f.name) for f in fields(BackendConfig)}
    values.update(_parse_section(changes, BACKEND_KEYS, where))
    return BackendConfig(**values)


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where a served configuration comes from, to read again on a reload: the file (``path``, or
    ``$LIP_CONFIG``) with the environment's ``LIP_*`` on top, as ``load_config`` reads it."""

    path: str | None = None

    @classmethod
    def at(cls, path: str | os.PathLike[str] | None) -> ConfigSource:
        given = os.fspath(path) if path is not None else os.environ.get(f"{ENV_PREFIX}CONFIG") or None
        return cls(given)

    def load(self) -> PoolConfig:
        return load_config(self.path)

    def __str__(self) -> str:
        return self.path or "the environment (no config file)"


# --- environment ----------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LEGACY_SERVER = re.compile(r"^LOCAL_INFERENCE_SERVER_(\d+)$")


def _env_value(key: str, raw: str) -> Any:
    """Turn an environment string into the type the field's parser expects."""
    default = next(f.default for f in fields(PoolConfig) if f.name == key)
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        return text
    if isinstance(default, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    if text.lower() in ("", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _apply_env(base: PoolConfig, env: Mapping[str, str]) -> PoolConfig:
    overrides: dict[str, Any] = {}
    for key, parse in POOL_KEYS.items():
        name = f"{ENV_PREFIX}{key.upper()}"
        if name in env:
            overrides[key] = parse(name, _env_value(key, env[name]))
    backends = list(base.backends)
    for index, url in enumerate(u.strip() for u in env.get(f"{ENV_PREFIX}BACKENDS", "").split(",")):
        if url:
            backends.append(BackendConfig(url=_url(f"{ENV_PREFIX}BACKENDS[{index}]", url)))
    legacy = sorted(
        (int(match.group(1)), value)
        for name, value in env.items()
        if (match := _LEGACY_SERVER.match(name)) and value.strip()
    )
    for number, legacy_url in legacy:
        where = f"LOCAL_INFERENCE_SERVER_{number}"
        backends.append(BackendConfig(url=_url(where, legacy_url), api_key=env.get(f"{where}_KEY") or None))
    if not overrides and len(backends) == len(base.backends):
        return base
    values = {f.name: getattr(base, f.name) for f in fields(PoolConfig) if f.init}
    values.update(overrides, backends=tuple(backends))
    return PoolConfig(**values)
