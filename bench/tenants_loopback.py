"""Fair shares between keys over HTTP: the pool on 127.0.0.1 in front of a simulated backend.

Run: ``.venv/bin/python bench/tenants_loopback.py`` (about 30 seconds). One backend with 4 slots,
each request 20 tokens at 200 tokens/s (0.1 s: 40 requests/s in all). One key sends 400 requests at
once (10 s of work, 10x a second of the fleet's capacity); another sends 10, one every 0.5 s. The
light key's latency (p50, p99) and the total throughput, with a key each (fair queueing) and with
the flood's key for both (one queue in arrival order: FIFO), measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import httpx

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.config import KeyConfig
from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

HERE = Path(__file__).parent
BODY = {"model": "sim", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


async def one_run(fair: bool) -> tuple[list[float], float]:
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=4, tokens_per_second=200))
    keys = (KeyConfig(name="flood", key="sk-flood"), KeyConfig(name="light", key="sk-light"))
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(running(backend))
        config = PoolConfig(
            backends=(BackendConfig(url=url, slots=4),),
            keys=keys,
            queue_limit=10_000,
            public_status=True,
        )
        base = await stack.enter_async_context(running(create_standalone_app(config)))
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"{base}/v1", trust_env=False, timeout=120, limits=limits)
        )
        while (await http.get("/pool/status")).json()["backends"][0]["health"] != "healthy":  # noqa: ASYNC110
            await anyio.sleep(0.05)
        light: list[float] = []
        finished: list[float] = []  # when each request ended, flood and light
        flood_done: list[float] = []

        async def flood_one() -> None:
            await http.post("/chat/completions", json=BODY, headers={"authorization": "Bearer sk-flood"})
            finished.append(time.perf_counter())
            flood_done.append(finished[-1])

        async def light_ones() -> None:
            for _ in range(10):
                await anyio.sleep(0.5)
                started = time.perf_counter()
                key = "sk-light" if fair else "sk-flood"  # FIFO: one key for both, so one queue
                answer = await http.post(
                    "/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}
                )
                assert answer.status_code == 200, answer.text
                finished.append(time.perf_counter())
                light.append(finished[-1] - started)

        started = time.perf_counter()
        async with anyio.create_task_group() as group:
            for _ in range(400):
                group.start_soon(flood_one)
            group.start_soon(light_ones)
        # Throughput while the backlog lasts: everything served until the flood's last answer.
        flood_end = max(flood_done)
        served = sum(1 for t in finished if t <= flood_end)
        return sorted(light), served / (flood_end - started)


async def main() -> None:
    fifo_light, fifo_rate = await one_run(fair=False)
    fair_light, fair_rate = await one_run(fair=True)
    lines = [
        f"FIFO (one queue): light key p50 {statistics.median(fifo_light):.2f} s, p99 {fifo_light[-1]:.2f} s; "
        f"{fifo_rate:.1f} req/s in all",
        f"fair (two keys):  light key p50 {statistics.median(fair_light):.2f} s, p99 {fair_light[-1]:.2f} s; "
        f"{fair_rate:.1f} req/s in all",
        f"light key's p99: {fair_light[-1]:.2f} s against {fifo_light[-1]:.2f} s; throughput "
        f"{fair_rate / fifo_rate:.3f}x of FIFO (a request alone takes 0.10 s)",
    ]
    for line in lines:
        print(line)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tenants_loopback.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    anyio.run(main)
