"""Handing a backend's answer to the client (``relay.py``)."""

from __future__ import annotations

import httpx

from local_inference_pool.gateway.relay import client_headers


def test_hop_by_hop_headers_and_those_named_in_connection_never_reach_the_client() -> None:
    upstream = httpx.Response(
        200,
        headers=[
            ("Connection", "keep-alive, X-Backend-Secret, x-trace"),
            ("X-Backend-Secret", "s3cret"),
            ("x-trace", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
        ],
    )
    assert client_headers(upstream, [(b"x-backend", b"a")]) == [
        (b"content-type", b"application/json"),
        (b"x-backend", b"a"),
    ]
