"""Property-based fuzzing of what clients send: never a 500, never a hang, always an OpenAI error.

The app runs once (its lifespan in a portal thread) against a scripted fake backend; every example is
one direct ASGI call, so headers and paths can carry any bytes a server might pass on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import anyio.from_thread
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message

from local_inference_pool import Pool
from local_inference_pool.gateway.app import create_pool_app

from ..fakes import FakeBackend, Fleet

LIMIT = 4096
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ALLOWED_UPSTREAM_HEADERS = {
    "host",
    "accept",
    "accept-encoding",
    "connection",
    "user-agent",
    "content-type",
    "content-length",
    "authorization",
    "x-request-id",
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    receive_calls: int


@dataclass
class Live:
    portal: anyio.from_thread.BlockingPortal
    app: ASGIApp
    fleet: Fleet
    pool: Pool

    def call(
        self, method: str, path: bytes, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
    ) -> Answer:
        return self.portal.call(_call, self.app, method, path, headers, chunks)


async def _call(
    app: ASGIApp, method: str, path: bytes, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> Answer:
    pending = list(chunks) or [b""]
    calls = 0
    done = anyio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("pool", 80),
        "state": {},
    }
    with anyio.fail_after(5):  # never a hang
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(
        start["status"], {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}, body, calls
    )


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    fleet = Fleet(a=FakeBackend())
    app = create_pool_app(fleet.config(max_body_size=LIMIT), transport=fleet.transport)

    async def manager_for_app() -> LifespanManager:
        return LifespanManager(app)  # built inside the portal's loop: it makes anyio primitives

    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(portal.call(manager_for_app)) as manager,
    ):

        async def healthy() -> None:
            with anyio.fail_after(5):
                while app.state.runtime.pool.scheduler.backends["a:8080"].health.value != "healthy":
                    await anyio.sleep(0.01)

        portal.call(healthy)
        yield Live(portal, manager.app, fleet, app.state.runtime.pool)


def assert_clean(answer: Answer, *, anthropic: bool = False) -> None:
    """A status the pool means, its error in the route's dialect (OpenAI's, or Anthropic's), no key."""
    assert answer.status != 500, answer.body
    assert answer.status in {200, 400, 401, 404, 405, 408, 413, 429, 502, 503, 504, 529}, answer.status
    if answer.status >= 400:
        body = json.loads(answer.body)
        error = body["error"]
        if anthropic:
            assert body["type"] == "error"
            assert set(error) == {"type", "message"}
        else:
            assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str)
        assert error["message"]
    assert b"key-a" not in answer.body
    assert "key-a" not in " ".join(answer.headers.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
nested = st.tuples(st.integers(0, 1200), st.sampled_from([(b"[", b"]"), (b'{"k":', b"}")])).map(
    lambda spec: b'{"model": "m", "x": ' + spec[1][0] * spec[0] + b"1" + spec[1][1] * spec[0] + b"}"
)
repeated_keys = st.lists(
    st.sampled_from(["model", "stream", "messages", "user"]), min_size=1, max_size=6
).map(lambda keys: ("{" + ", ".join(f'"{k}": "m"' for k in keys) + "}").encode())
bodies = st.one_of(
    nested,
    repeated_keys,
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "model": st.one_of(
                st.just("m"), st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=3))
            )
        },
        optional={
            "messages": json_values,
            "stream": st.booleans(),
            "user": st.text(max_size=10),
            "extra": json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
)


@SETTINGS
@given(body=bodies, cut=st.integers(1, 64))
def test_any_body_gets_a_clean_answer(live: Live, body: bytes, cut: int) -> None:
    chunks = [body[i : i + cut] for i in range(0, len(body), cut)]
    headers = [(b"content-type", b"application/json")]
    answer = live.call("POST", b"/chat/completions", headers, chunks)
    assert_clean(answer)
    if answer.status == 200:
        assert live.fleet.backends["a"].bodies[-1] == body  # forwarded byte for byte
    assert not live.pool.scheduler.grants  # nothing leaked


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"]),
    path=st.binary(min_size=0, max_size=40).map(lambda b: b"/" + b.replace(b"?", b"")),
)
def test_any_path_and_method_get_a_clean_answer(live: Live, method: str, path: bytes) -> None:
    answer = live.call(method, path, [], [b'{"model": "m"}'])
    assert answer.status != 500, (method, path, answer.body)
    if answer.status >= 400 and method != "HEAD":
        error = json.loads(answer.body)["error"]
        anthropic = path.startswith(b"/messages")
        assert set(error) == ({"type", "message"} if anthropic else {"message", "type", "param", "code"})


JSON_ROUTES = [b"/messages", b"/messages/count_tokens", b"/responses", b"/tokenize", b"/rerank", b"/infill"]


@SETTINGS
@given(route=st.sampled_from(JSON_ROUTES), body=bodies, cut=st.integers(1, 64))
def test_any_body_on_any_route_gets_a_clean_answer_in_its_dialect(
    live: Live, route: bytes, body: bytes, cut: int
) -> None:
    chunks = [body[i : i + cut] for i in range(0, len(body), cut)]
    answer = live.call("POST", route, [(b"content-type", b"application/json")], chunks)
    assert_clean(answer, anthropic=route.startswith(b"/messages"))
    assert not live.pool.scheduler.grants  # nothing leaked


@SETTINGS
@given(
    response_id=st.binary(min_size=1, max_size=300).map(
        lambda b: b.replace(b"/", b"").replace(b"?", b"") or b"x"
    ),
    tail=st.sampled_from([b"", b"/cancel", b"/input_items"]),
)
def test_any_response_id_gets_a_clean_answer(live: Live, response_id: bytes, tail: bytes) -> None:
    method = "POST" if tail == b"/cancel" else "GET"
    answer = live.call(method, b"/responses/" + response_id + tail, [], [b""])
    assert_clean(answer)
    assert answer.status in {400, 404}  # the pool made no response: none is looked for upstream


@SETTINGS
@given(
    boundary=st.sampled_from([b"", b"b0undary", b"x" * 80]),
    body=st.binary(max_size=600)
    | st.lists(
        st.tuples(st.sampled_from(["model", "file", "x"]), st.binary(max_size=40), st.booleans()), max_size=4
    ).map(
        lambda parts: (
            b"".join(
                b'--b0undary\r\nContent-Disposition: form-data; name="'
                + name.encode()
                + (b'"; filename="a.wav' if is_file else b"")
                + b'"\r\n\r\n'
                + value
                + b"\r\n"
                for name, value, is_file in parts
            )
            + b"--b0undary--\r\n"
        )
    ),
)
def test_any_multipart_upload_gets_a_clean_answer(live: Live, boundary: bytes, body: bytes) -> None:
    content_type = b"multipart/form-data; boundary=" + boundary if boundary else b"multipart/form-data"
    answer = live.call("POST", b"/audio/transcriptions", [(b"content-type", content_type)], [body])
    assert_clean(answer)
    assert not live.pool.scheduler.grants


header_names = st.sampled_from(
    [b"x-request-id", b"x-session-id", b"x-priority", b"authorization", b"x-injected"]
) | st.binary(min_size=1, max_size=12).map(lambda b: b.lower())


@SETTINGS
@given(headers=st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=6))
def test_headers_cannot_reach_the_backend_or_break_the_pool(
    live: Live, headers: list[tuple[bytes, bytes]]
) -> None:
    backend = live.fleet.backends["a"]
    seen_before = len(backend.requests)
    answer = live.call(
        "POST", b"/chat/completions", [(b"content-type", b"application/json"), *headers], [b'{"model": "m"}']
    )
    assert_clean(answer)
    for request in backend.requests[seen_before:]:
        names = {name.lower() for name in request.headers}
        assert names <= ALLOWED_UPSTREAM_HEADERS, names - ALLOWED_UPSTREAM_HEADERS
        assert request.headers["authorization"] == "Bearer key-a"  # never the client's
        request_id = request.headers.get("x-request-id", "")
        assert "\r" not in request_id
        assert "\n" not in request_id


def test_oversize_body_is_refused_before_it_is_all_read(live: Live) -> None:
    chunks = [b"x" * 1024] * 64  # 64 KiB against a 4 KiB limit, no content-length
    answer = live.call("POST", b"/chat/completions", [(b"content-type", b"application/json")], chunks)
    assert answer.status == 413
    assert answer.receive_calls <= LIMIT // 1024 + 2  # it stopped reading at the limit


def test_no_backend_key_in_any_log_line_at_info(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for body in (b'{"model": "m"}', b'{"model": "m", "stream": true}', b'{"model": "nope"}', b"{"):
        live.call("POST", b"/chat/completions", [(b"content-type", b"application/json")], [body])
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "local_inference_pool.access" in {r.name for r in caplog.records}
    assert "key-a" not in text


JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "m", "x": ' + b"[" * 70 + b"]" * 70 + b"}", "too_deep"),
        (b'{"model": "m", "x": ' + b"[" * 1900 + b"]" * 1900 + b"}", "too_deep"),
        (b'{"model": "m", "x": ' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}", "too_deep"),
        (b'{"model": "m", "model": "other"}', "duplicate_key"),
    ],
    ids=["deeper-than-64", "1900-deep", "600-deep-objects", "two-model-keys"],
)
def test_bodies_too_deep_or_with_a_key_twice_are_400(
    live: Live, body: bytes, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    answer = live.call("POST", b"/chat/completions", JSON, [body])
    assert_clean(answer)
    assert (answer.status, json.loads(answer.body)["error"]["code"]) == (400, code)
    assert not any(record.levelno >= logging.ERROR for record in caplog.records)


def test_a_body_nested_within_the_bound_and_keys_repeated_inside_are_forwarded(live: Live) -> None:
    body = b'{"model": "m", "x": ' + b"[" * 60 + b"]" * 60 + b', "messages": [{"a": 1}, {"a": 2}]}'
    assert live.call("POST", b"/chat/completions", JSON, [body]).status == 200


@pytest.mark.parametrize("value", [b"101", b"-101", b"9" * 5000, b"1.5", b""])
def test_x_priority_out_of_range_is_400_with_a_short_message(live: Live, value: bytes) -> None:
    answer = live.call("POST", b"/chat/completions", [*JSON, (b"x-priority", value)], [b'{"model": "m"}'])
    error = json.loads(answer.body)["error"]
    assert (answer.status, error["code"]) == (400, "invalid_priority")
    assert len(error["message"]) < 120


def test_priorities_at_the_ends_of_the_range_are_served(live: Live) -> None:
    for value in (b"-100", b"100", b"0"):
        answer = live.call("POST", b"/chat/completions", [*JSON, (b"x-priority", value)], [b'{"model": "m"}'])
        assert answer.status == 200


@pytest.mark.parametrize("path", [b"/chat/completions", b"/models", b"/pool/status"])
def test_two_authorization_headers_are_refused_on_every_route(live: Live, path: bytes) -> None:
    headers = [*JSON, (b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]
    answer = live.call("POST" if path == b"/chat/completions" else "GET", path, headers, [b'{"model": "m"}'])
    assert_clean(answer)
    assert (answer.status, json.loads(answer.body)["error"]["code"]) == (400, "duplicate_authorization")


def test_a_trailing_slash_is_a_404_naming_the_path_not_a_redirect(live: Live) -> None:
    answer = live.call("GET", b"/pool/status/", [(b"host", b"evil.example")], [b""])
    assert answer.status == 404
    assert "location" not in answer.headers
    assert "/pool/status/" in json.loads(answer.body)["error"]["message"]
    assert b"evil.example" not in answer.body
