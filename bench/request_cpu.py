"""CPU time per chat request through the pool app, in process: no sockets, no load generator, so the
figure is the gateway's own work (reading the request, the scheduler, the upstream call through a
mock transport, the answer) and moves little between runs, unlike wrk over loopback on a shared
machine.

    .venv/bin/python bench/request_cpu.py                       # this checkout
    PYTHONPATH=/tmp/before/src .venv/bin/python bench/request_cpu.py --label before
    .venv/bin/python bench/request_cpu.py --state   # with [pool] state on a redis-server of its own

With ``--state`` the figure includes redis-py's work for the claim and the release (Redis itself
runs in its own process and is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from local_inference_pool import BackendConfig, PoolConfig, create_pool_app

ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/chat/completions",
    "raw_path": b"/chat/completions",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
    "client": ("127.0.0.1", 1),
    "server": ("pool", 80),
}


async def backend(request: httpx.Request) -> httpx.Response:
    """A llama-server as the probes and a chat completion see it."""
    path = request.url.path
    if path == "/health":
        return httpx.Response(200, json={"status": "ok"})
    if path == "/props":
        return httpx.Response(200, json={"total_slots": 64})
    if path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})
    if path == "/slots":
        return httpx.Response(200, json=[])
    return httpx.Response(200, content=ANSWER, headers={"content-type": "application/json"})


async def measure(requests: int, rounds: int, state: str | None = None) -> list[float]:
    # ``state`` only when given: older trees, measured beside this one, lack the key.
    extra: dict[str, Any] = {"state": state} if state else {}
    config = PoolConfig(
        backends=(BackendConfig(url="http://a:8080", kind="llamacpp"),), health_interval=60, **extra
    )
    app = create_pool_app(config, transport=lambda limits: httpx.MockTransport(backend))
    async with LifespanManager(app) as manager:
        asgi = manager.app
        lease = await app.state.runtime.pool.acquire("m", timeout=10)  # waits for the first probe
        lease.release()

        async def one() -> None:
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": BODY, "more_body": False}
                await asyncio.sleep(3600)  # the client stays until the answer is sent
                return {"type": "http.disconnect"}

            async def send(message: Any) -> None:
                return None

            await asgi({**SCOPE, "state": {}}, receive, send)

        for _ in range(500):  # warm up
            await one()
        figures = []
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(requests):
                await one()
            figures.append((time.process_time() - start) / requests * 1e6)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--state", action="store_true", help="with [pool] state on a redis-server of its own")
    args = parser.parse_args()
    if args.state:
        sys.path.insert(0, str(Path(__file__).parent))
        from shared_state import redis_server

        with redis_server() as (url, _port):
            figures = asyncio.run(measure(args.requests, args.rounds, url))
    else:
        figures = asyncio.run(measure(args.requests, args.rounds))
    shown = ", ".join(f"{f:.1f}" for f in figures)
    print(f"{args.label}: {min(figures):.1f} us of CPU per chat request (best of {args.rounds}: {shown})")


if __name__ == "__main__":
    main()
