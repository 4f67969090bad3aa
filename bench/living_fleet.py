"""A fleet that changes while it serves: how fast a change reaches every process, and what reloads
cost the requests running through them.

Run: ``.venv/bin/python bench/living_fleet.py`` (about 1 minute; needs ``redis-server`` and ``wrk``). Everything
is on 127.0.0.1: a redis-server of its own, two fake backends (``fake_backend.py``), the pools, and
wrk (Debian's) for the load.

1. Propagation: three ``serve --watch`` processes on one store. An admin call (drain, then undrain,
   alternately, through each process in turn) and a config file rewrite (one backend's slots), each
   40 times: from the call (or the write) to the change shown in ``/pool/status`` of every process
   (polled every 2 ms, so figures are at most 2 ms late). Goal: p99 under 1 s.
2. Reloads under load: one ``serve --watch`` process, wrk with 32 connections sending chat requests
   as fast as they are answered (the fake backend answers in 2 ms), for 10 s without a change and 10 s with 20 rewrites of the config file (a
   backend removed, added again, its slots halved and restored, in turn). Failed requests (goal: 0)
   and requests/s of the two windows, in the same run.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

from shared_state import POST, free_port, process, redis_server

HERE = Path(__file__).parent
ADMIN = {"authorization": "Bearer bench-admin"}
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}


def config_text(backends: dict[str, tuple[str, int]], state: str | None = None) -> str:
    pool = '[pool]\nhealth_interval = 1\nadmin_keys = ["bench-admin"]\n'
    if state is not None:
        pool += f'state = "{state}"\n'
    return pool + "".join(
        f'[[backends]]\nname = "{name}"\nurl = "{url}"\nslots = {slots}\n'
        for name, (url, slots) in backends.items()
    )


def write(path: Path, text: str) -> None:
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    fresh.replace(path)


def serve(config: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "local_inference_pool.cli",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--watch",
    ]


async def shown(client: httpx.AsyncClient, base: str) -> dict[str, dict[str, Any]]:
    status = (await client.get(f"{base}/v1/pool/status")).json()
    return {b["name"]: b for b in status["backends"]}


async def seen_everywhere(
    client: httpx.AsyncClient,
    bases: list[str],
    check: Callable[[dict[str, dict[str, Any]]], bool],
    start: float,
) -> float:
    """Seconds from ``start`` until every process shows what ``check`` wants (the slowest one)."""
    latest = 0.0

    async def one(base: str) -> None:
        nonlocal latest
        with anyio.fail_after(10):
            # Another process's state: read until it shows the change (no event crosses processes).
            while not check(await shown(client, base)):  # noqa: ASYNC110
                await anyio.sleep(0.002)
        latest = max(latest, time.perf_counter() - start)

    async with anyio.create_task_group() as group:
        for base in bases:
            group.start_soon(one, base)
    return latest


def a_is_active(active: bool, shown: dict[str, dict[str, Any]]) -> bool:
    return bool(shown["a"]["admin_state"] == "active") == active


def b_has_slots(slots: int, shown: dict[str, dict[str, Any]]) -> bool:
    return bool(shown["b"]["slots"] == slots)


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"p50 {1000 * statistics.median(ordered):.0f} ms, p99 {1000 * p99:.0f} ms, "
        f"max {1000 * ordered[-1]:.0f} ms ({len(ordered)} changes)"
    )


async def propagation(urls: list[str], redis_url: str) -> list[str]:
    config = Path(tempfile.mkdtemp()) / "pool.toml"
    config.write_text(config_text({"a": (urls[0], 64), "b": (urls[1], 64)}, redis_url))
    ports = [free_port() for _ in range(3)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    with (
        process(serve(config, ports[0]), f"{bases[0]}/v1/models"),
        process(serve(config, ports[1]), f"{bases[1]}/v1/models"),
        process(serve(config, ports[2]), f"{bases[2]}/v1/models"),
    ):
        admin_times: list[float] = []
        file_times: list[float] = []
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            for index in range(40):
                action = "drain" if index % 2 == 0 else "undrain"
                start = time.perf_counter()
                answer = await client.post(
                    f"{bases[index % 3]}/v1/pool/admin/backends/a/{action}", headers=ADMIN
                )
                answer.raise_for_status()
                admin_times.append(
                    await seen_everywhere(client, bases, partial(a_is_active, action == "undrain"), start)
                )
            for index in range(40):
                slots = 32 if index % 2 == 0 else 64
                start = time.perf_counter()
                write(config, config_text({"a": (urls[0], 64), "b": (urls[1], slots)}, redis_url))
                file_times.append(await seen_everywhere(client, bases, partial(b_has_slots, slots), start))
    return [
        "Propagation to all of 3 serve processes on one store:",
        f"  admin call (drain/undrain) -> applied everywhere: {quantiles(admin_times)}",
        f"  config file rewrite (--watch) -> applied everywhere: {quantiles(file_times)}",
    ]


async def load(base: str, seconds: int, reloads: Callable[[], Any] | None) -> tuple[int, int, str]:
    """wrk with 32 connections for ``seconds``: (requests answered, failed, wrk's error lines)."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(POST)
    command = ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(script), f"{base}/v1/chat/completions"]
    output = ""

    async def run_wrk() -> None:
        nonlocal output
        output = (await anyio.run_process(command, check=True)).stdout.decode()

    async with anyio.create_task_group() as group:
        group.start_soon(run_wrk)
        if reloads is not None:
            group.start_soon(reloads)
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    failed = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    )
    errors = "; ".join(
        line.strip() for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line
    )
    return total - failed, failed, errors


async def under_load(urls: list[str]) -> list[str]:
    config = Path(tempfile.mkdtemp()) / "pool.toml"
    fleets = [
        {"a": (urls[0], 64), "b": (urls[1], 64)},
        {"a": (urls[0], 64)},
        {"a": (urls[0], 64), "b": (urls[1], 64)},
        {"a": (urls[0], 32), "b": (urls[1], 64)},
    ]
    config.write_text(config_text(fleets[0]))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    applied = 0

    async def reload_twenty_times() -> None:
        nonlocal applied
        for index in range(1, 21):
            await anyio.sleep(0.45)
            write(config, config_text(fleets[index % len(fleets)]))
        applied = 20

    with process(serve(config, port), f"{base}/v1/models"):
        await load(base, 2, None)  # warm-up, not measured
        quiet_ok, quiet_failed, _ = await load(base, 10, None)
        busy_ok, busy_failed, errors = await load(base, 10, reload_twenty_times)
    lines = [
        "Reloads under load (1 serve process, wrk -c32, 10 s each window):",
        f"  without reloads: {quiet_ok / 10:,.0f} req/s, {quiet_failed} failed",
        f"  with {applied} reloads: {busy_ok / 10:,.0f} req/s ({busy_ok / max(1, quiet_ok):.2f}x), "
        f"{busy_failed} failed",
    ]
    if errors:
        lines.append(f"    wrk: {errors}")
    return lines


async def main() -> None:
    ports = [free_port() for _ in range(2)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    backend = [sys.executable, str(HERE / "fake_backend.py"), "--answer-ms", "2"]
    with (
        process([*backend, "--port", str(ports[0])], f"{urls[0]}/v1/models"),
        process([*backend, "--port", str(ports[1])], f"{urls[1]}/v1/models"),
        redis_server() as (redis_url, _),
    ):
        lines = [f"living_fleet.py, {time.strftime('%Y-%m-%d')}"]
        lines += await propagation(urls, redis_url)
        lines += await under_load(urls)
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "living_fleet.txt").write_text(text + "\n")


if __name__ == "__main__":
    anyio.run(main)
