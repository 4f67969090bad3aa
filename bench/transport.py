"""Which HTTP transport should the pool's one shared client use? Measured, not assumed.

Run: ``.venv/bin/python bench/transport.py`` (about 45 s). A fast fake backend (a tiny ASGI app under
uvicorn) runs in a separate process; one shared client per transport posts a small chat body at
concurrency 1, 32 and 128 for a fixed time, after a warm-up. Prints requests/s per transport, its
ratio to httpx's default transport, and the client process's CPU time per request (what a gateway
pays for every request it forwards); writes ``bench/results/transport.txt``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

SECONDS = 3.0
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}'


async def fake_backend(
    scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any
) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": ANSWER})


def clients() -> dict[str, Callable[[], Any]]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    made: dict[str, Callable[[], Any]] = {
        "httpx 0.28 (default transport)": lambda: httpx.AsyncClient(limits=limits, trust_env=False),
    }
    try:
        import httpx2

        made["httpx2"] = lambda: httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=256, max_keepalive_connections=256), trust_env=False
        )
    except ImportError:
        made["httpx2"] = lambda: None
    from local_inference_pool.upstream.transport import AiohttpTransport as PoolTransport

    made["httpx + the pool's aiohttp transport"] = lambda: httpx.AsyncClient(
        transport=PoolTransport(limits), trust_env=False
    )
    try:
        from httpx_aiohttp import AiohttpTransport

        made["httpx + httpx-aiohttp transport"] = lambda: httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits, trust_env=False), trust_env=False
        )
    except ImportError:
        made["httpx + httpx-aiohttp transport"] = lambda: None
    return made


async def rate(make: Callable[[], Any], url: str, concurrency: int) -> tuple[float, float]:
    """Requests/s, and CPU µs per request in this process."""
    client = make()
    if client is None:
        return float("nan"), float("nan")
    async with client:
        done = 0
        stop_at = 0.0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                response = await client.post(url, json=BODY)
                assert response.status_code == 200
                done += 1

        stop_at = time.perf_counter() + 0.5
        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up
        done = 0
        start, cpu = time.perf_counter(), time.process_time()
        stop_at = start + SECONDS
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


def main() -> None:
    port = 18931
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "transport:fake_backend",
            "--port",
            str(port),
            "--log-level",
            "error",
        ],
        cwd=Path(__file__).parent,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(100):
            try:
                httpx.post(url, json=BODY, trust_env=False)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        lines = [
            f"requests/s through one shared client, {SECONDS:.0f} s per cell (fake backend in another process)"
        ]
        lines.append(f"{'transport':36} {'c=1':>14} {'c=32':>14} {'c=128':>14} {'CPU/request at c=32':>20}")
        baseline: dict[int, float] = {}
        for name, make in clients().items():
            cells = []
            cpu_at_32 = float("nan")
            for concurrency in (1, 32, 128):
                value, cpu = asyncio.run(rate(make, url, concurrency))
                baseline.setdefault(concurrency, value)
                cells.append(f"{value:6.0f} ({value / baseline[concurrency]:.1f}x)")
                if concurrency == 32:
                    cpu_at_32 = cpu
            lines.append(f"{name:36} " + " ".join(f"{c:>14}" for c in cells) + f" {cpu_at_32:17.0f} µs")
            print(lines[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "transport.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:2]))


if __name__ == "__main__":
    main()
