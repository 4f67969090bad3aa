"""What the serving stack costs with no pool in it: the floor under ``serve``'s figures.

    python bench/stack_floor.py PORT                   # uvicorn alone: answers at once
    python bench/stack_floor.py PORT --proxy UPSTREAM  # uvicorn + one aiohttp session: a bare proxy

Both run on what ``serve`` runs on (uvicorn with ``serve``'s bounded httptools protocol, asyncio's own
loop), as raw ASGI apps. The bare proxy reads the request, posts it to ``UPSTREAM`` (a chat
completions URL) and sends the answer back: no slot, no queue, no checks, no metrics. Whatever
``serve`` costs above it is the pool's own work. ``hot_path_ab.py --floors`` measures both beside
the trees it compares.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

from local_inference_pool.config import PoolConfig
from local_inference_pool.gateway.server_limits import bounded_protocol

ANSWER = (
    b'{"id":"chatcmpl-floor","object":"chat.completion","model":"bench","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
)


async def _body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Alone:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await _body(receive)
            await _answer(send, 200, ANSWER)


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=0)
            self.session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        body = await _body(receive)
        headers = {"content-type": "application/json"}
        async with self.session.post(self.upstream, data=body, headers=headers) as response:
            await _answer(send, response.status, await response.read())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("port", type=int)
    parser.add_argument("--proxy", metavar="UPSTREAM", help="a chat completions URL to forward to")
    args = parser.parse_args()
    app = BareProxy(args.proxy) if args.proxy else Alone()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        loop="asyncio",
        http=bounded_protocol(PoolConfig()),
        lifespan="off",
    )


if __name__ == "__main__":
    main()
