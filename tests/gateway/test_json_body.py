"""parse_body: the top level read pair by pair must agree with ``json.loads`` on every body."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from local_inference_pool.errors import InvalidRequestError
from local_inference_pool.gateway.json_body import MAX_DEPTH, parse_body

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
)
spaces = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])


def _code(body: bytes) -> str:
    try:
        parse_body(body)
    except InvalidRequestError as exc:
        return str(exc.code)
    return "ok"


@given(
    pairs=st.lists(st.tuples(st.sampled_from(["model", "messages", 'é"x', "a"]), values), max_size=5),
    space=spaces,
)
def test_the_top_level_is_read_as_json_reads_it_and_a_key_twice_is_refused(
    pairs: list[tuple[str, Any]], space: str
) -> None:
    text = (
        "{" + ",".join(f"{space}{json.dumps(k)}{space}:{space}{json.dumps(v)}{space}" for k, v in pairs) + "}"
    )
    body = (space + text + space).encode()
    if len({key for key, _ in pairs}) < len(pairs):
        assert _code(body) == "duplicate_key"
    else:
        assert parse_body(body) == json.loads(body)


@given(st.binary(max_size=40) | st.text(alphabet='{}[]":,0 a\\', max_size=24).map(str.encode))
def test_any_bytes_get_the_verdict_json_loads_gives(body: bytes) -> None:
    try:
        expected = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        assert _code(body) == "invalid_json"
        return
    if not isinstance(expected, dict):
        assert _code(body) == "invalid_body"
    else:
        assert parse_body(body) == expected


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5000])
def test_nesting_is_counted_to_the_bound(depth: int) -> None:
    inner = "[" * (depth - 1) + "]" * (depth - 1)  # inside the top-level object: one level more
    body = f'{{"model": "m", "x": {inner}}}'.encode()
    assert _code(body) == ("ok" if depth <= MAX_DEPTH else "too_deep")


def test_other_encodings_json_reads_are_read() -> None:
    body = json.dumps({"model": "m", "x": "é"}).encode("utf-16")
    assert parse_body(body) == {"model": "m", "x": "é"}


def test_a_large_body_is_checked_as_a_small_one() -> None:
    messages = [{"role": "user", "content": "x\\" * 50} for _ in range(100)]
    large = json.dumps({"model": "m", "messages": messages})
    assert len(large) > 4096
    assert parse_body(large.encode()) == json.loads(large)
    assert _code(large[:-1].encode() + b', "model": "n"}') == "duplicate_key"
    assert _code(large[:-1].encode() + b', "deep": ' + b"[" * 70 + b"]" * 70 + b"}") == "too_deep"
