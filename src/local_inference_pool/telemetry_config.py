"""What the pool tells about its requests (``[telemetry]``): the JSON request log, the ring of
recent requests the dashboard lists, the opt-in capture of bodies, and OpenTelemetry traces
(``gateway.tracing``).

Every part is off or small by default: no log file, no capture, no traces; the ring of recent
requests is bounded (``recent_requests``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from local_inference_pool import config_values as values
from local_inference_pool.errors import ConfigError

__all__ = ["TELEMETRY_KEYS", "TelemetryConfig", "telemetry_from_dict"]


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    request_log: str = ""  # '' (off), 'stderr', or a file's path (rotated)
    request_log_max_bytes: int = 100 * 1024 * 1024  # a file's size before it is rotated
    request_log_backups: int = 5  # rotated files kept
    recent_requests: int = 200  # requests the dashboard lists (a ring in memory)
    capture: bool = False  # keep the bodies of the last requests, secrets redacted (debugging)
    capture_max_bytes: int = 16 * 1024  # of each body kept
    capture_max_requests: int = 50  # requests whose bodies are kept
    traces: bool = False  # OpenTelemetry traces over OTLP/HTTP (also on with OTEL_TRACES_EXPORTER=otlp)
    otlp_endpoint: str | None = None  # default: the OTEL_EXPORTER_OTLP_* variables, else localhost:4318
    service_name: str = "local-inference-pool"  # OTEL_SERVICE_NAME wins when set
    sample_ratio: float | None = None  # of traces started here (parent-based); default: OTEL_TRACES_SAMPLER

    def __post_init__(self) -> None:
        for spec in fields(self):
            name = spec.name
            object.__setattr__(self, name, TELEMETRY_KEYS[name](f"telemetry.{name}", getattr(self, name)))


def _ratio(where: str, value: Any) -> float | None:
    if value is None:
        return None
    if not values.is_number(value) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: {value!r} is not allowed; expected a number from 0 to 1")
    return float(value)


def _request_log(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not allowed; expected '', 'stderr' or a file's path")
    return value.strip()


TELEMETRY_KEYS: dict[str, values.Parser] = {
    "request_log": _request_log,
    "request_log_max_bytes": values.int_at_least(1024),
    "request_log_backups": values.int_at_least(0),
    "recent_requests": values.int_at_least(0),
    "capture": values.flag,
    "capture_max_bytes": values.int_at_least(0),
    "capture_max_requests": values.int_at_least(0),
    "traces": values.flag,
    "otlp_endpoint": values.optional_string,
    "service_name": values.string,
    "sample_ratio": _ratio,
}
assert set(TELEMETRY_KEYS) == {spec.name for spec in fields(TelemetryConfig)}


def telemetry_from_dict(section: Any) -> TelemetryConfig:
    """The ``[telemetry]`` table, checked as the rest of the file is."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"telemetry: {section!r} is not allowed; expected a table")
    for name in section:
        if name not in TELEMETRY_KEYS:
            raise ConfigError(
                f"telemetry: unknown key {str(name)[:64]!r}; known keys: {', '.join(TELEMETRY_KEYS)}"
            )
    return TelemetryConfig(**section)
