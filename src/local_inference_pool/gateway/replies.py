"""The pool's own error answers, in OpenAI's shape: the one place errors become HTTP responses.

``errors.py`` knows each error's status, type and code; this module, in the app layer, turns them
into Starlette responses, so the layers below never depend on an HTTP framework.
"""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

from local_inference_pool.errors import PoolError

__all__ = ["ErrorReply", "error_response", "openai_error"]


class ErrorReply(JSONResponse):
    """One of the pool's own error answers, in any API's shape; ``code`` is the pool's machine code
    for it (what metrics and the access log record), whether or not the shape has room for it."""

    def __init__(self, body: object, *, status: int, code: str | None, retry_after: float | None) -> None:
        headers = None
        if retry_after is not None:
            # Rounded up: a client that waits what it is told must not come back too early.
            # ``retry-after-ms`` is what the OpenAI and Anthropic SDKs read first.
            headers = {
                "retry-after": str(max(1, math.ceil(retry_after))),
                "retry-after-ms": str(max(1, math.ceil(retry_after * 1000))),
            }
        super().__init__(body, status_code=status, headers=headers)
        self.code = code


def openai_error(
    status: int, message: str, error_type: str, code: str | None, *, retry_after: float | None = None
) -> ErrorReply:
    """An answer in OpenAI's error shape, with ``retry-after`` when a retry may help."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return ErrorReply(body, status=status, code=code, retry_after=retry_after)


def error_response(error: PoolError) -> ErrorReply:
    """A pool error as its answer: its status, its OpenAI body, and ``retry-after`` where set."""
    return openai_error(
        error.status, error.message, error.error_type, error.code, retry_after=error.retry_after
    )
