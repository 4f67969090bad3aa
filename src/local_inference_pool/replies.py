"""The pool's own error answers, in OpenAI's shape: the one place errors become HTTP responses.

``errors.py`` knows each error's status, type and code; this module, in the app layer, turns them
into Starlette responses, so the layers below never depend on an HTTP framework.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from local_inference_pool.errors import PoolError

__all__ = ["error_response", "openai_error"]


def openai_error(
    status: int, message: str, error_type: str, code: str | None, *, retry_after: float | None = None
) -> JSONResponse:
    """An answer in OpenAI's error shape, with ``retry-after`` when a retry may help."""
    headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(error: PoolError) -> JSONResponse:
    """A pool error as its answer: its status, its OpenAI body, and ``retry-after`` where set."""
    return openai_error(
        error.status, error.message, error.error_type, error.code, retry_after=error.retry_after
    )
