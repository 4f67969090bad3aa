"""What sharing the fleet's leases through Redis costs, against leases in one process.

Run: ``.venv/bin/python bench/shared_state.py`` (about 2 minutes; needs ``redis-server`` and
``wrk`` from Debian). Everything is on 127.0.0.1, each party in its own process where it matters:
a redis-server of its own (persistence off), the fake backend (``fake_backend.py``), the pool, wrk.

1. Added latency p50 at concurrency 1: the pool with ``state`` against the pool without, each over
   direct access measured in the same run (wrk ``-c1 --latency``).
2. Redis round trips per forwarded request, from Redis's own command counts (``INFO commandstats``).
3. Requests/s of ``serve --workers 2`` against one process at concurrency 32 (both with ``state``;
   the 2 cores are shared with wrk and the fake backend, so this is a floor, not a scaling figure).
4. Grant latency after a release in another pool: pool A holds every slot, pool B waits, A releases,
   B's acquire returns (through Redis pub/sub, as between processes); p50 and p99 of 200.
5. Queue throughput: 1,000 waiters spread over 4 pools on 8 slots, each lease released at once;
   grants per second against one in-process pool.
6. Queue order across pools: 4 pools on 4 slots, 600 requests arriving at 1.5x what the slots
   serve (20 ms each), 70% of them at one pool. For each request, how long it waited behind a
   request that arrived later at another pool (from the first such grant to its own): max and p99,
   and the mean queue wait at the busy pool against the quiet ones.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import httpx
import redis

from local_inference_pool import BackendConfig, Pool, PoolConfig

HERE = Path(__file__).parent
POST = """
wrk.method = "POST"
wrk.body = '{"model": "bench", "messages": [{"role": "user", "content": "hi"}]}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str) -> set[str]:
    """Until ``url`` (a /v1/models) lists a model: the server is up and, for the pool, the backend.
    The models it lists."""
    for _ in range(400):
        try:
            if data := httpx.get(url, trust_env=False, timeout=1).json().get("data"):
                return {entry["id"] for entry in data}
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} listed no model in time")


@contextmanager
def process(command: list[str], ready: str | None = None, **env: str) -> Iterator[None]:
    import os

    child = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        if ready is not None:
            wait_for(ready)
        yield
    finally:
        child.terminate()
        child.wait(timeout=20)


@contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A redis-server of its own on a free loopback port, persistence off: its URL and port."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("needs redis-server: apt-get install redis-server")
    port = free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(command):
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", port


def wrk(script: str, url: str, connections: int, seconds: int, latency: bool = False) -> str:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script, url]
    return subprocess.run(
        command + (["--latency"] if latency else []), capture_output=True, text=True, check=True
    ).stdout


def p50_ms(output: str) -> float:
    found = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", output)
    assert found is not None, output
    return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]


def rps(output: str) -> float:
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert found is not None, output
    return float(found.group(1))


def evalsha_calls(port: int) -> int:
    stats = redis.Redis(port=port).info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def gateway_figures(redis_url: str, redis_port: int, script: str) -> list[str]:
    backend_port = free_port()
    backends = f"http://127.0.0.1:{backend_port}"
    # The fake backend does not report its slots: configured, as a real fleet's would be (counted as
    # 1, every request would wait for the one before it, which measures a one-slot server).
    config = Path(tempfile.mkdtemp()) / "pool.toml"
    config.write_text(f'[pool]\nhealth_interval = 5\n\n[[backends]]\nurl = "{backends}"\nslots = 64\n')
    common = {"LIP_CONFIG": str(config)}
    lines = []
    serve = [sys.executable, "-m", "local_inference_pool.cli", "serve", "--log-level", "warning"]
    with process(
        [sys.executable, str(HERE / "fake_backend.py"), "--port", str(backend_port)], f"{backends}/v1/models"
    ):
        chat = f"{backends}/v1/chat/completions"
        wrk(script, chat, 1, 1)
        direct = p50_ms(wrk(script, chat, 1, 5, latency=True))
        added: dict[str, float] = {}
        for name, extra in (("in-process", {}), ("state", {"LIP_STATE": redis_url})):
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1"
            with process([*serve, "--port", str(port)], f"{url}/models", **common, **extra):
                wrk(script, f"{url}/chat/completions", 1, 2)
                before = evalsha_calls(redis_port)
                output = wrk(script, f"{url}/chat/completions", 1, 5, latency=True)
                calls = evalsha_calls(redis_port) - before
                requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
                added[name] = p50_ms(output) - direct
                lines.append(
                    f"{name:10} added p50 at c=1 {added[name]:.3f} ms (direct {direct:.3f} ms); "
                    f"Redis scripts per request {calls / requests:.2f}"
                )
        lines.append(f"state adds {added['state'] - added['in-process']:+.3f} ms at p50, c=1")
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        with process([*serve, "--port", str(port)], f"{url}/models", **common):
            wrk(script, f"{url}/chat/completions", 32, 2)
            value = rps(wrk(script, f"{url}/chat/completions", 32, 5))
            lines.append(f"serve, in-process, c=32: {value:,.0f} req/s")
        for workers in (1, 2):
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1"
            command = [*serve, "--port", str(port), "--workers", str(workers)]
            with process(command, f"{url}/models", **common, LIP_STATE=redis_url):
                wrk(script, f"{url}/chat/completions", 32, 2)
                value = rps(wrk(script, f"{url}/chat/completions", 32, 5))
                lines.append(f"serve --workers {workers}, state, c=32: {value:,.0f} req/s")
    return lines


async def grant_latency(redis_url: str) -> str:
    backend = BackendConfig(url="http://a:8080", name="a", slots=2, models=("m",))
    config = PoolConfig(backends=(backend,), state=redis_url, lease_ttl=300)  # no renewal pass meanwhile
    samples = []
    async with Pool(config) as holder, Pool(config) as waiter:
        for _ in range(200):
            held = [await holder.acquire("m") for _ in range(2)]
            waiting = asyncio.ensure_future(waiter.acquire("m", timeout=10))
            await asyncio.sleep(0.01)  # it is queued behind the full backend
            released = time.perf_counter()
            held.pop().release()
            lease = await waiting
            samples.append((time.perf_counter() - released) * 1000)
            lease.release()
            held.pop().release()
            await asyncio.sleep(0.005)
    samples.sort()
    return (
        f"grant latency after a release in another pool: p50 {statistics.median(samples):.2f} ms, "
        f"p99 {samples[int(len(samples) * 0.99) - 1]:.2f} ms (200 releases)"
    )


async def queue_throughput(redis_url: str | None, pools: int) -> float:
    backend = BackendConfig(url="http://a:8080", name="a", slots=8, models=("m",))
    config = PoolConfig(backends=(backend,), state=redis_url, queue_limit=10_000)
    async with AsyncExitStack() as stack:
        fleet = [await stack.enter_async_context(Pool(config)) for _ in range(pools)]

        async def one(pool: Pool) -> None:
            lease = await pool.acquire("m", timeout=60)
            lease.release()

        start = time.perf_counter()
        await asyncio.gather(*(one(fleet[i % pools]) for i in range(1000)))
        return 1000 / (time.perf_counter() - start)


async def queue_order(redis_url: str) -> str:
    backend = BackendConfig(url="http://a:8080", name="a", slots=4, models=("m",))
    config = PoolConfig(backends=(backend,), state=redis_url, queue_limit=10_000, lease_ttl=300)
    rng = random.Random(7)
    records: list[tuple[int, float, float]] = []  # pool, arrival, grant
    async with AsyncExitStack() as stack:
        fleet = [await stack.enter_async_context(Pool(config)) for _ in range(4)]

        async def one(index: int, delay: float) -> None:
            await asyncio.sleep(delay)
            arrival = time.perf_counter()
            lease = await fleet[index].acquire("m", timeout=60)
            records.append((index, arrival, time.perf_counter()))
            await asyncio.sleep(0.02)
            lease.release()

        rate = 1.5 * 4 / 0.02
        delays = list(itertools.accumulate(rng.expovariate(rate) for _ in range(600)))
        pools = [0 if rng.random() < 0.7 else rng.randrange(1, 4) for _ in delays]
        await asyncio.gather(*(one(index, delay) for index, delay in zip(pools, delays, strict=True)))
    behind = []
    for index, arrival, grant in records:
        overtaking = [g for i, a, g in records if i != index and a > arrival and g < grant]
        behind.append(grant - min(overtaking) if overtaking else 0.0)
    behind.sort()
    waits = {busy: [g - a for i, a, g in records if (i == 0) == busy] for busy in (True, False)}
    return (
        f"queue order over 4 pools: waited behind a later arrival elsewhere max "
        f"{behind[-1] * 1000:.1f} ms, p99 {behind[int(len(behind) * 0.99) - 1] * 1000:.1f} ms, "
        f"{sum(1 for b in behind if b > 0) / len(behind):.0%} of requests; mean wait at the busy pool "
        f"{statistics.mean(waits[True]) * 1000:.0f} ms, at the quiet ones "
        f"{statistics.mean(waits[False]) * 1000:.0f} ms"
    )


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install wrk")
    with redis_server() as (redis_url, redis_port), tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(POST)
        script.flush()
        lines = gateway_figures(redis_url, redis_port, script.name)
        lines.append(asyncio.run(grant_latency(redis_url)))
        local = asyncio.run(queue_throughput(None, 1))
        shared = asyncio.run(queue_throughput(redis_url, 4))
        lines.append(
            f"1,000 waiters on 8 slots: one in-process pool {local:,.0f} grants/s; "
            f"4 pools sharing state {shared:,.0f} grants/s ({shared / local:.2f}x)"
        )
        lines.append(asyncio.run(queue_order(redis_url)))
    for line in lines:
        print(line)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "shared_state.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
