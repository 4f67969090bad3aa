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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
from starlette.types import Receive

from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import InvalidRequestError

__all__ = [
    "MAX_DEPTH",
    "PRIORITY_RANGE",
    "ClientGone",
    "Inbound",
    "authorization",
    "authorized",
    "parse_body",
    "read_inbound",
    "request_id",
    "session_key",
]

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_DEPTH: Final = 64  # nesting of arrays and objects in a request body
PRIORITY_RANGE: Final = range(-100, 101)


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


def authorization(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The one ``Authorization`` header ('' when none). Two are refused on every route: servers
    disagree on which of them counts, and the pool must never check one while a backend reads another."""
    found = [value for name, value in headers if name == b"authorization"]
    if len(found) > 1:
        raise InvalidRequestError(
            "the request has more than one Authorization header; send exactly one",
            code="duplicate_authorization",
        )
    return found[0].decode("latin-1") if found else ""


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
    """The checked request, or ``InvalidRequestError`` saying what is wrong, or ``ClientGone``.

    The body must arrive within ``config.body_timeout`` seconds (else 408), in any host server.
    """
    body: bytes | None = None
    with anyio.move_on_after(config.body_timeout):
        body = await _read_body(receive, headers, config.max_body_size)
    if body is None:
        raise InvalidRequestError(
            f"the request body did not arrive within {config.body_timeout:g}s",
            status=408,
            code="body_timeout",
        )
    payload = parse_body(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required and must be a non-empty string", code="invalid_model")
    return Inbound(body, model, _priority(headers), session_key(headers, payload))


def _priority(headers: Mapping[bytes, bytes]) -> int:
    given = headers.get(b"x-priority", b"0").decode("latin-1")
    try:
        priority = int(given) if len(given) <= 8 else None
    except ValueError:
        priority = None
    if priority is None or priority not in PRIORITY_RANGE:
        shown = given if len(given) <= 16 else given[:16] + "..."
        raise InvalidRequestError(
            f"x-priority must be an integer from {PRIORITY_RANGE.start} to {PRIORITY_RANGE.stop - 1}, not {shown!r}",
            code="invalid_priority",
        )
    return priority


def parse_body(body: bytes) -> dict[str, Any]:
    """A JSON object, at most ``MAX_DEPTH`` deep, with no key twice at its top level (a backend
    may read the first of two ``model`` keys where the pool would route on the last)."""
    top: list[list[tuple[str, Any]]] = [[]]

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        top[0] = pairs  # the outermost object is decoded last
        return dict(pairs)

    try:
        payload = json.loads(body, object_pairs_hook=keep_pairs)
    except RecursionError:
        payload = None  # far deeper than MAX_DEPTH
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
    if payload is None or (body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(payload) > MAX_DEPTH):
        raise InvalidRequestError(
            f"the request body is nested more than {MAX_DEPTH} levels deep", code="too_deep"
        )
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_body")
    if len(top[0]) != len(payload):
        seen: set[str] = set()
        for key, _ in top[0]:
            if key in seen:
                raise InvalidRequestError(
                    f"the request body has the key {key[:64]!r} more than once", code="duplicate_key"
                )
            seen.add(key)
    return payload


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend(
                    (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
                )
    return deepest


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
