"""What a client sent to a completion route: read from the raw ASGI messages, checked, made ready to queue.

Raw ASGI rather than Starlette's ``Request``: this runs for every request the gateway forwards, and
the headers it needs are five lookups in one dict.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive

from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import InvalidRequestError

__all__ = ["ClientGone", "Inbound", "authorized", "read_inbound", "request_id", "session_key"]

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ClientGone(Exception):
    """The client disconnected before its request was read: there is nobody to answer."""


@dataclass(slots=True)
class Inbound:
    body: bytes
    model: str
    priority: int
    session: str | None


def request_id(headers: Mapping[bytes, bytes]) -> str:
    """The client's x-request-id when it is a plain token (it is sent on to the backend), else a new one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if _SAFE_REQUEST_ID.fullmatch(given) else secrets.token_hex(16)


def authorized(authorization: str, config: PoolConfig, *, browser: bool = False) -> bool:
    """``Authorization: Bearer <key>``; for pages a browser opens, also Basic with the key as password."""
    if not config.api_keys:
        return True
    scheme, _, token = authorization.partition(" ")
    if browser and scheme.lower() == "basic":
        try:
            token = base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    if not token:
        return False
    token_bytes = token.strip().encode()
    # Compare against every key so the time taken does not say which one came close.
    matches = [hmac.compare_digest(token_bytes, key.encode()) for key in config.api_keys]
    return any(matches)


async def read_inbound(receive: Receive, headers: Mapping[bytes, bytes], config: PoolConfig) -> Inbound:
    """The checked request, or ``InvalidRequestError`` saying what is wrong, or ``ClientGone``."""
    body = await _read_body(receive, headers, config.max_body_size)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_body")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required and must be a non-empty string", code="invalid_model")
    priority_header = headers.get(b"x-priority", b"0").decode("latin-1")
    try:
        priority = int(priority_header)
    except ValueError:
        raise InvalidRequestError(
            f"x-priority must be an integer, not {priority_header!r}", code="invalid_priority"
        ) from None
    return Inbound(body, model, priority, session_key(headers, payload))


async def _read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    too_large = InvalidRequestError(
        f"the request body is larger than {limit} bytes", status=413, code="body_too_large"
    )
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def session_key(headers: Mapping[bytes, bytes], payload: Mapping[str, Any]) -> str | None:
    """x-session-id, else the request's ``user``, else a hash of the conversation's start."""
    header = headers.get(b"x-session-id")
    if header:
        return "header:" + header.decode("latin-1")
    user = payload.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        prefix: list[Any] = []
        for message in messages:
            prefix.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        return "prefix:" + hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()[:32]
    prompt = payload.get("prompt")
    if isinstance(prompt, str) and prompt:
        return "prefix:" + hashlib.sha256(prompt[:1024].encode()).hexdigest()[:32]
    return None
