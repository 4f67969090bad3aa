"""A request's JSON body, checked: an object, at most ``MAX_DEPTH`` deep, with no key twice at its top level.

A key twice at the top level matters because a backend may read the first of two ``model`` keys
where the pool would route on the last. Python's ``json`` keeps the last silently; seeing both took
an ``object_pairs_hook``, a Python call for every object of the body, and the nesting was then
measured over every value, strings included. For an agent's request (225 kB, 200 messages, 20
tools) that was 879 µs against 258 µs for ``json.loads`` alone. Only the top level can route, so
only the top level is read pair by pair here, each value by the C decoder, and the nesting is
measured over the containers alone: 345 µs for the same body. A small body without escapes is
read by ``json.loads`` at once, and its keys looked for as text (4.8 µs against 5.8 µs before).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NoReturn

from local_inference_pool.errors import InvalidRequestError

__all__ = ["MAX_DEPTH", "parse_body"]

MAX_DEPTH: Final = 64  # nesting of arrays and objects in a request body
_DECODER = json.JSONDecoder()
_SMALL: Final = 4096  # bytes of a body whose keys are looked for as text first
_CONTAINERS = (dict, list)
_SPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between tokens


def parse_body(body: bytes) -> dict[str, Any]:
    """The body's object, or ``InvalidRequestError`` saying what is wrong with it."""
    try:
        payload = _object_of(body)
    except RecursionError:  # far deeper than MAX_DEPTH
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
    # Counting brackets rules out deep nesting in a small body for less than measuring it; in a
    # large one the count costs more than the measure (71 µs a bracket for 225 kB, 72 µs for all).
    if (len(body) > _SMALL or body.count(b"[") + body.count(b"{") > MAX_DEPTH) and _depth(
        payload
    ) > MAX_DEPTH:
        raise _too_deep()
    return payload


def _object_of(body: bytes) -> dict[str, Any]:
    """``json.loads``'s object, with a key twice at the top level refused. Raises ``ValueError``
    for what is not JSON."""
    if len(body) <= _SMALL and b"\\" not in body:
        # Without a single escape, each key is written one way only, so a key that is there twice
        # is its quoted name found twice; when each is found once, ``json.loads`` alone suffices.
        # (Searching a large body once per key would cost more than reading its top level.)
        payload = json.loads(body)
        if isinstance(payload, dict) and all(body.count(b'"%s"' % key.encode()) == 1 for key in payload):
            return payload
    text = body.decode(json.detect_encoding(body), "surrogatepass")
    pairs = _top_level_pairs(text)
    if pairs is None:
        _refuse_other_than_an_object(text)
    payload = dict(pairs)
    if len(payload) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidRequestError(
                    f"the request body has the key {key[:64]!r} more than once", code="duplicate_key"
                )
            seen.add(key)
    return payload


def _top_level_pairs(text: str) -> list[tuple[str, Any]] | None:
    """The top-level object's (key, value) pairs in order, repeats kept; None when the text is
    not an object. Raises ``ValueError`` for text that is not JSON."""
    space = _after_space
    at = space(text, 0)
    if text[at : at + 1] != "{":
        return None
    at = space(text, at + 1)
    pairs: list[tuple[str, Any]] = []
    if text[at : at + 1] == "}":
        at += 1
    else:
        while True:
            if text[at : at + 1] != '"':
                raise ValueError("a key must be a string")
            key, at = _DECODER.raw_decode(text, at)  # a string, as it starts with a quote
            at = space(text, at)
            if text[at : at + 1] != ":":
                raise ValueError("a key must be followed by ':'")
            value, at = _DECODER.raw_decode(text, space(text, at + 1))
            pairs.append((key, value))
            at = space(text, at)
            after = text[at : at + 1]
            at += 1
            if after == "}":
                break
            if after != ",":
                raise ValueError("a value must be followed by ',' or '}'")
            at = space(text, at)
    if space(text, at) != len(text):
        raise ValueError("text after the object")
    return pairs


def _after_space(text: str, at: int) -> int:
    found = _SPACE.match(text, at)
    return found.end() if found else at


def _refuse_other_than_an_object(text: str) -> NoReturn:
    """Raise the error for a body that is not an object: too deep, not JSON, or JSON of another kind."""
    try:
        json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
    raise InvalidRequestError("the request body must be a JSON object", code="invalid_body")


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(
        f"the request body is nested more than {MAX_DEPTH} levels deep", code="too_deep"
    )


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest (counted to ``MAX_DEPTH + 1`` at most), level by level
    over the containers alone."""
    level = [value]
    depth = 0
    while level and depth <= MAX_DEPTH:
        depth += 1
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, _CONTAINERS)
        ]
    return depth
