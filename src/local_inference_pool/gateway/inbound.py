"""What a client sent to a completion route: read from the raw ASGI messages, checked, made ready to queue.

Raw ASGI rather than Starlette's ``Request``: this runs for every request the gateway forwards, and
the headers it needs are five lookups in one dict.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from local_inference_pool.config import PoolConfig
from local_inference_pool.core.prompt_index import Prompt
from local_inference_pool.errors import InvalidRequestError
from local_inference_pool.gateway.client_watch import within
from local_inference_pool.gateway.json_body import MAX_DEPTH, parse_body
from local_inference_pool.key_config import hash_key
from local_inference_pool.model_config import ModelConfig

__all__ = [
    "MAX_DEPTH",
    "PRIORITY_RANGE",
    "ClientGone",
    "Inbound",
    "authorization",
    "authorized",
    "given_priority",
    "key_holder",
    "key_priority",
    "parse_body",
    "priority",
    "read_body",
    "read_form",
    "read_inbound",
    "request_id",
    "single_header",
]

_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PRIORITY_RANGE: Final = range(-100, 101)


class ClientGone(Exception):
    """The client disconnected before its request was read: there is nobody to answer."""


@dataclass(slots=True)
class Inbound:
    body: bytes
    model: str
    priority: int
    session: str | None
    payload: Mapping[str, Any] = field(default_factory=dict)
    tenant: str = ""  # whose key: a [[keys]] name, api_keys[i], or '' on an open pool
    prompt: Prompt | None = None  # what the backends' prompt caches may hold of it
    asked: str = ""  # the model the client asked for, when an alias ([[models]]) served it
    alias: str = ""  # that alias, as configured (a pattern as written)
    fallback_from: str = ""  # the model that could not serve it well, when a fallback does
    fallback_reason: str = ""  # why: unhealthy, context or wait

    def served_as(self, model: str, alias: str, params: ModelConfig | None) -> None:
        """``[[models]]`` say how it goes upstream: naming ``model`` (the name its backends know;
        another than asked when an alias or a fallback serves it), with the model's ``params``."""
        if model != self.model:
            self.asked, self.alias, self.model = self.model, alias, model
        payload = {**self.payload, "model": model}
        self.payload = params.adjust(payload) if params is not None else payload
        self.body = json.dumps(self.payload, ensure_ascii=False).encode()


def request_id(headers: Mapping[bytes, bytes]) -> str:
    """The client's x-request-id when it is a plain token (it is sent on to the backend), else a new one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if _SAFE_REQUEST_ID.fullmatch(given) else secrets.token_hex(16)


def authorization(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The one ``Authorization`` header ('' when none). Two are refused on every route: servers
    disagree on which of them counts, and the pool must never check one while a backend reads another."""
    return single_header(headers, b"authorization", "Authorization")


def single_header(headers: Iterable[tuple[bytes, bytes]], name: bytes, shown: str) -> str:
    """The value of a credential header the request may have at most once ('' when none)."""
    found = [value for key, value in headers if key == name]
    if len(found) > 1:
        raise InvalidRequestError(
            f"the request has more than one {shown} header; send exactly one",
            code="duplicate_authorization",
        )
    return found[0].decode("latin-1") if found else ""


def authorized(authorization: str, config: PoolConfig, *, browser: bool = False) -> bool:
    """``Authorization: Bearer <key>``; for pages a browser opens, also Basic with the key as password."""
    return key_holder(authorization, config, browser=browser) is not None


def key_holder(authorization: str, config: PoolConfig, *, browser: bool = False) -> str | None:
    """Whose key the request carries: a ``[[keys]]`` name, ``api_keys[i]`` for the simple form, ''
    when the pool is open; None when the key is missing or wrong."""
    if not config.holders:
        return ""
    scheme, _, token = authorization.partition(" ")
    if browser and scheme.lower() == "basic":
        try:
            token = base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    elif scheme.lower() != "bearer":
        return None
    token = token.strip()
    # Looked up by its hash: the time a dict lookup takes says nothing of the secrets.
    return config.holders.get(hash_key(token)) if token else None


def key_priority(given: int | None, config: PoolConfig, holder: str) -> int:
    """A request's priority under its key: the key's default when it sends none, and never above
    the key's ``max_priority``, or the pool's for a plain ``api_keys`` key or none (lowered to it,
    not refused: the request still runs)."""
    entry = next((k for k in config.keys if k.name == holder), None)
    if entry is None:
        return min(0 if given is None else given, config.max_priority)
    return min(entry.priority if given is None else given, entry.max_priority)


SessionKey = Callable[[Mapping[bytes, bytes], Mapping[str, Any]], "str | None"]


async def read_inbound(
    receive: Receive,
    headers: Mapping[bytes, bytes],
    config: PoolConfig,
    *,
    session_key: SessionKey,
    model_required: bool = True,
) -> Inbound:
    """The checked request, or ``InvalidRequestError`` saying what is wrong, or ``ClientGone``.

    The body must arrive within ``config.body_timeout`` seconds (else 408), in any host server.
    Without ``model_required``, a body without ``model`` comes back with ``model`` empty.
    """
    body = await read_body(receive, headers, config)
    payload = parse_body(body)
    model = payload.get("model")
    if (model_required or model is not None) and (not isinstance(model, str) or not model):
        raise InvalidRequestError("'model' is required and must be a non-empty string", code="invalid_model")
    return Inbound(body, model or "", priority(headers), session_key(headers, payload), payload)


async def read_body(receive: Receive, headers: Mapping[bytes, bytes], config: PoolConfig) -> bytes:
    """The whole body, at most ``max_body_size`` bytes (else 413), within ``body_timeout`` (else 408)."""
    try:
        async with within(config.body_timeout):
            return await _read_body(receive, headers, config.max_body_size)
    except TimeoutError:
        raise InvalidRequestError(
            f"the request body did not arrive within {config.body_timeout:g}s",
            status=408,
            code="body_timeout",
        ) from None


async def read_form(receive: Receive, headers: Mapping[bytes, bytes], config: PoolConfig) -> Inbound:
    """A multipart form (an audio upload) and its ``model`` field. The body is bounded like any
    other (``max_body_size``); python-multipart's parser finds the field, skipping file parts."""
    kind, options = parse_options_header(headers.get(b"content-type", b""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            "the request body must be multipart/form-data (with a boundary)", code="invalid_body"
        )
    body = await read_body(receive, headers, config)
    model = _form_field(body, boundary, "model")
    if not model:
        raise InvalidRequestError("the form field 'model' is required", code="invalid_model")
    return Inbound(body, model, priority(headers), None)


def _form_field(body: bytes, boundary: bytes, wanted: str) -> str:
    """The value of one short text field of a multipart body (its first 256 bytes), '' if absent."""
    value = bytearray()
    part: dict[str, Any] = {"header": bytearray(), "value": bytearray(), "name": None}

    def header_field(data: bytes, start: int, end: int) -> None:
        part["header"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def header_end() -> None:
        if bytes(part["header"]).lower() == b"content-disposition":
            _, disposition = parse_options_header(bytes(part["value"]))
            if b"filename" not in disposition:  # a field, not a file
                part["name"] = disposition.get(b"name", b"").decode("latin-1")
        part["header"], part["value"] = bytearray(), bytearray()

    def part_data(data: bytes, start: int, end: int) -> None:
        if part["name"] == wanted and len(value) < 256:
            value.extend(data[start : min(end, start + 256 - len(value))])

    def part_end() -> None:
        part["name"] = None

    callbacks = {
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_part_end": part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        raise InvalidRequestError("the multipart form is malformed", code="invalid_body") from None
    return bytes(value).decode("utf-8", "replace").strip()


def priority(headers: Mapping[bytes, bytes]) -> int:
    """The request's ``x-priority`` (default 0), checked."""
    return given_priority(headers) or 0


def given_priority(headers: Mapping[bytes, bytes]) -> int | None:
    """The request's ``x-priority``, checked; None when it sends none."""
    if b"x-priority" not in headers:
        return None
    given = headers[b"x-priority"].decode("latin-1")
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
