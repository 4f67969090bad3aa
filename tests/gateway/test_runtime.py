"""The upstream request as the proxy builds it: the same as httpx's own, head and body."""

from __future__ import annotations

import httpx
from hypothesis import given
from hypothesis import strategies as st

from local_inference_pool.gateway.runtime import prepared_request

names = st.sampled_from(
    [b"accept-encoding", b"x-request-id", b"content-type", b"authorization", b"traceparent"]
)
values = st.binary(min_size=0, max_size=16).filter(lambda v: b"\r" not in v and b"\n" not in v)


@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
    url=st.sampled_from(["http://127.0.0.1:8080/v1/chat/completions", "https://gpu.lan/x?y=1", "http://h/"]),
    headers=st.lists(st.tuples(names, values), max_size=4),
    body=st.binary(max_size=64),
)
def test_a_prepared_request_is_the_one_httpx_makes(
    method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    expected = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": {}})
    made = prepared_request(method, httpx.URL(url), headers, body, {})
    assert made.headers.raw == expected.headers.raw
    assert (made.method, made.url, made.content, made.extensions) == (
        expected.method,
        expected.url,
        expected.content,
        expected.extensions,
    )
