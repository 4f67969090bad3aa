"""The pool's own answers to a client, sent instead of a backend's: a refusal in the route's
dialect (recorded under its error code), and the record of a client that left before any answer."""

from __future__ import annotations

import logging

from starlette.responses import Response
from starlette.types import Message, Send

from local_inference_pool.gateway.dialects import Dialect
from local_inference_pool.gateway.metrics import RequestRecord
from local_inference_pool.gateway.runtime import Runtime

__all__ = ["client_gone", "send_refusal", "send_upstream_refusal"]

logger = logging.getLogger(__name__)


def client_gone(record: RequestRecord, runtime: Runtime) -> None:
    record.status, record.outcome = 499, "client_gone"
    runtime.finish(record)


async def send_upstream_refusal(
    send: Send,
    dialect: Dialect,
    status: int,
    message: str,
    code: str,
    record: RequestRecord,
    runtime: Runtime,
) -> None:
    """The pool's answer when the backend could not give one (a ``server_error``)."""
    await send_refusal(send, dialect.error(status, message, "server_error", code), record, runtime)


async def send_refusal(send: Send, response: Response, record: RequestRecord, runtime: Runtime) -> None:
    """Answer with the pool's own error, recorded under its OpenAI error code (unless already known)."""
    record.status = response.status_code
    for name, value in record.headers:  # the key's rate-limit standing, on every answer
        response.headers[name.decode()] = value.decode()
    if record.outcome == "ok":
        record.outcome = _error_code(response)
    if record.capture is not None:
        record.capture.add_response(bytes(response.body))
    runtime.finish(record)
    try:
        await response({"type": "http"}, _nothing_to_receive, send)
    except OSError:  # ASGI 2.4: the client left before its answer; nobody to tell
        logger.debug("client left before the pool's %d answer", response.status_code)


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


def _error_code(response: Response) -> str:
    code = getattr(response, "code", None)  # the pool's own answers (replies.ErrorReply) carry it
    return str(code) if code else f"status_{response.status_code}"
