"""What every module that talks to the shared state store (Redis or Valkey) says the same way: a
store that cannot be reached, and the text of a reply."""

from __future__ import annotations

from local_inference_pool.errors import StateUnavailableError

__all__ = ["text", "unavailable"]


def unavailable(exc: BaseException) -> StateUnavailableError:
    """The pool's error for a Redis error. redis-py's messages name the host and port, never the
    password; they are kept short all the same."""
    return StateUnavailableError(
        f"the shared state store cannot be reached: {(str(exc) or type(exc).__name__)[:200]}"
    )


def text(value: object) -> str:
    """A reply's value as text (redis-py gives bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)
