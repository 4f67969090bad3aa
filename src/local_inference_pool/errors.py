"""Errors raised by the pool, each knowing its HTTP status and OpenAI error type.

The tree::

    PoolError
    ├── ConfigError (also ValueError)       invalid configuration: names the field, value, what is allowed
    ├── InvalidRequestError                 400/401/413  a client's request the pool will not forward
    ├── ModelNotFoundError                  404  no backend lists the model
    ├── QueueFullError                      429  a model's waiting queue is at its limit
    │   └── TenantQueueFullError            429  one key's waiting requests are at its max_queued
    ├── KeyLimitError                       429  a key's rpm, tpm or token budget is reached
    ├── KeyRefusedError                     401/403  a key disabled, expired, or not allowed the model
    ├── NoCapacityError                     503  no healthy backend can serve the model now
    ├── QueueTimeoutError (also TimeoutError) 503  waited past the deadline for a slot
    ├── PoolClosedError                     503  the pool is shutting down or closed
    ├── StateUnavailableError               503  the shared state store (Redis) cannot be reached
    └── WrongEventLoopError (also RuntimeError) the pool was used from a second event loop

Each carries ``status``, ``error_type`` and ``code`` so that the app can turn any of them into the
OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` without a lookup table.
``retry_after`` (seconds) is set where a client may usefully retry.
"""

from __future__ import annotations

from typing import Any


class PoolError(Exception):
    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": None,
                "code": self.code,
            }
        }


class ConfigError(PoolError, ValueError):
    status = 500
    error_type = "configuration_error"
    code = "invalid_config"


class InvalidRequestError(PoolError):
    """A request refused before it reaches the queue; status and code vary with what is wrong."""

    error_type = "invalid_request_error"

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ModelNotFoundError(PoolError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.model = model


class QueueFullError(PoolError):
    status = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1.0


class TenantQueueFullError(QueueFullError):
    """One key's waiting requests are at its ``max_queued``: others are not refused."""

    code = "key_queue_full"


class KeyLimitError(PoolError):
    """A key's ``rpm``, ``tpm`` or token budget is reached: OpenAI's 429, whose ``type`` says which
    (``requests``, ``tokens``; a budget is ``budget_exceeded``). ``retry_after`` is when a request
    like it would be admitted; None when it never would (larger than the key's ``tpm``)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.error_type = limit
        self.retry_after = retry_after
        if limit == "budget":
            self.error_type, self.code = "insufficient_quota", "budget_exceeded"


class KeyRefusedError(PoolError):
    """A key that may not make this request: disabled or expired (401), or the model is not one it
    may use (403)."""

    error_type = "invalid_request_error"

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        if status == 403:
            self.error_type = "permission_error"


class NoCapacityError(PoolError):
    status = 503
    error_type = "service_unavailable"
    code = "no_backend_available"
    retry_after = 5.0

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.model = model


class QueueTimeoutError(PoolError, TimeoutError):
    status = 503
    error_type = "service_unavailable"
    code = "queue_timeout"
    retry_after = 1.0

    def __init__(self, message: str, *, model: str, waited: float) -> None:
        super().__init__(message)
        self.model = model
        self.waited = waited


class PoolClosedError(PoolError):
    status = 503
    error_type = "service_unavailable"
    code = "pool_closed"
    retry_after = 5.0


class StateUnavailableError(PoolError):
    """The fleet's shared state (``[pool] state``) cannot be reached: new work fails closed."""

    status = 503
    error_type = "service_unavailable"
    code = "state_unavailable"
    retry_after = 2.0


class WrongEventLoopError(PoolError, RuntimeError):
    status = 500
    error_type = "server_error"
    code = "wrong_event_loop"
