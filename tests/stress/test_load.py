"""2,000 concurrent clients against four simulated backends with 16 slots in all.

The pool and the backends run as separate processes (the real CLI), so the pool's memory is its own.
Every request must complete, no backend may ever run more than its slots, the pool's memory must stay
bounded, and afterwards nothing is held or queued. The figures are printed.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import Process
from httpx_aiohttp import AiohttpTransport

pytestmark = [pytest.mark.stress, pytest.mark.anyio]

CLIENTS = 2000
BACKENDS = 4
SLOTS = 4
CLI = [sys.executable, "-m", "local_inference_pool.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_for(url: str, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)


async def test_two_thousand_concurrent_clients_nothing_lost_nothing_leaked(tmp_path: Path) -> None:
    processes: list[Process] = []
    # A new connection per call: a kept-alive one idle past the servers' 5 s may be closed by them
    # just as it is reused, which httpx's own pool reports as an error instead of retrying.
    http = httpx.AsyncClient(trust_env=False, timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
    try:
        backend_urls = []
        for _ in range(BACKENDS):
            port = free_port()
            args = [
                "simulate",
                "--port",
                str(port),
                "--models",
                "sim",
                "--slots",
                str(SLOTS),
                "--tokens-per-second",
                "2000",
            ]
            processes.append(await anyio.open_process([*CLI, *args]))
            backend_urls.append(f"http://127.0.0.1:{port}")
        for url in backend_urls:
            await wait_for(f"{url}/health", http)
        config = tmp_path / "pool.toml"
        lines = ["[pool]", "queue_limit = 5000", "health_interval = 1.0", "public_status = true", ""]
        for index, url in enumerate(backend_urls):
            lines += ["[[backends]]", f'url = "{url}"', f'name = "sim{index}"', ""]
        config.write_text("\n".join(lines))
        pool_port = free_port()
        pool = await anyio.open_process(
            [*CLI, "serve", "--config", str(config), "--port", str(pool_port), "--log-level", "warning"]
        )
        processes.append(pool)
        base = f"http://127.0.0.1:{pool_port}/v1"
        await wait_for(f"{base}/pool/status", http)
        with anyio.fail_after(30):
            while any(
                b["health"] != "healthy" for b in (await http.get(f"{base}/pool/status")).json()["backends"]
            ):
                await anyio.sleep(0.1)
        baseline = rss_mib(pool.pid)
        peak_rss = baseline
        statuses: dict[int, int] = {}
        limits = httpx.Limits(max_connections=CLIENTS + 100, max_keepalive_connections=CLIENTS + 100)
        load = httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits, trust_env=False), timeout=300, trust_env=False
        )

        async def one(index: int) -> None:
            body: dict[str, Any] = {
                "model": "sim",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"q{index}"}],
            }
            if index % 2:
                body["stream"] = True
                async with load.stream("POST", f"{base}/chat/completions", json=body) as response:
                    text = b"".join([chunk async for chunk in response.aiter_bytes()])
                    ok = response.status_code == 200 and text.endswith(b"data: [DONE]\n\n")
                    statuses[response.status_code if ok else -1] = (
                        statuses.get(response.status_code if ok else -1, 0) + 1
                    )
            else:
                response = await load.post(f"{base}/chat/completions", json=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async def sample_memory(stop: anyio.Event) -> None:
            nonlocal peak_rss
            while not stop.is_set():
                peak_rss = max(peak_rss, rss_mib(pool.pid))
                await anyio.sleep(0.1)

        started = time.monotonic()
        stop = anyio.Event()
        async with load, anyio.create_task_group() as sampler:
            sampler.start_soon(sample_memory, stop)
            with anyio.fail_after(300):
                async with anyio.create_task_group() as clients:
                    for index in range(CLIENTS):
                        clients.start_soon(one, index)
            stop.set()
        elapsed = time.monotonic() - started
        after = (await http.get(f"{base}/pool/status")).json()
        stats = [(await http.get(f"{url}/sim/stats")).json() for url in backend_urls]
        print(
            f"\n{CLIENTS} concurrent clients, {BACKENDS}x{SLOTS} slots: {elapsed:.1f} s ({CLIENTS / elapsed:.0f} req/s), "
            f"statuses {statuses}, backend peaks {[s['peak_running'] for s in stats]}, "
            f"pool RSS {baseline:.0f} MiB at rest, {peak_rss:.0f} MiB peak"
        )
        assert statuses == {200: CLIENTS}  # every request completed
        assert all(s["peak_running"] <= SLOTS for s in stats)  # no backend ever ran more than its slots
        assert sum(s["completed"] for s in stats) == CLIENTS
        assert after["active_leases"] == 0  # nothing leaked
        assert after["queue"]["waiting"] == 0
        assert all(s["running"] == 0 for s in stats)
        assert peak_rss - baseline < 300  # bounded: no per-request buffering of answers
    finally:
        await http.aclose()
        for process in processes:
            process.terminate()
        for process in processes:
            with anyio.move_on_after(10):
                await process.wait()
