"""Several serving processes, one fleet: the FastAPI example as two replicas and under ``uvicorn
--workers 2``, in front of one backend with 2 slots. Without shared state each process believes it
owns both slots (two replicas put 4 requests on the backend at once); with ``state`` the backend
never has more requests than its slots, running or waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from anyio.abc import Process

from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from ..redis_store import Store, free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent.parent
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}


def fastapi_example(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port), *extra]


def pool_serve(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "local_inference_pool.cli", "serve", "--port", str(port), *extra]


@asynccontextmanager
async def serving_process(command: list[str], port: int, env: dict[str, str]) -> AsyncIterator[str]:
    """A server in a process of its own, until its pool says the backend is healthy."""
    async with serving_process_handle(command, port, env) as (base, _process):
        yield base


@asynccontextmanager
async def serving_process_handle(
    command: list[str], port: int, env: dict[str, str], *, own_group: bool = False
) -> AsyncIterator[tuple[str, Process]]:
    """``own_group``: in a process group (and session) of its own, as a terminal runs a command;
    its output on stdout, stderr included."""
    process: Process = await anyio.open_process(
        [*command, "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        start_new_session=own_group,
        stderr=subprocess.STDOUT if own_group else None,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    async with httpx.AsyncClient(base_url=base, trust_env=False) as once:
                        if (await once.get("/v1/pool/status")).json()["backends"][0]["health"] == "healthy":
                            break
                except (httpx.TransportError, KeyError, IndexError, ValueError):
                    pass
                await anyio.sleep(0.05)
        yield base, process
    finally:
        if process.returncode is None:
            process.terminate()
        with anyio.fail_after(20):
            await process.wait()


def fleet_env(backend_url: str, store: Store, **pool: str) -> dict[str, str]:
    """What every serving process of one test's fleet gets: the backend, the store, its settings.
    Probes every 5 s: they read busy slots too, and the store alone must hold the slots here."""
    settings = {
        "backends": backend_url,
        "state": store.url,
        "health_interval": "5",
        "public_status": "true",
        **pool,
    }
    return {**os.environ, **{f"LIP_{key.upper()}": value for key, value in settings.items()}}


async def ask(base: str, statuses: list[int]) -> None:
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as own:
        statuses.append((await own.post("/v1/chat/completions", json=CHAT)).status_code)


@pytest.mark.parametrize("shape", ["two-replicas", "two-uvicorn-workers", "serve-workers-2"])
async def test_several_processes_never_exceed_a_backends_slots(store: Store, shape: str) -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=40))
    async with running(backend) as backend_url:
        env = fleet_env(backend_url, store)
        statuses: list[int] = []
        async with AsyncExitStack() as stack:
            ports = [free_port(), free_port()]
            commands = {
                "two-replicas": [fastapi_example(ports[0]), fastapi_example(ports[1])],
                "two-uvicorn-workers": [fastapi_example(ports[0], "--workers", "2")],
                "serve-workers-2": [pool_serve(ports[0], "--workers", "2")],
            }[shape]
            bases = [
                await stack.enter_async_context(serving_process(command, port, env))
                for command, port in zip(commands, ports, strict=False)
            ]
            async with anyio.create_task_group() as group:
                for index in range(12):
                    group.start_soon(ask, bases[index % len(bases)], statuses)
    assert statuses == [200] * 12
    assert backend.stats.peak_in_flight <= 2  # never a request beyond its slots, running or waiting
    assert backend.stats.completed == 12
    assert store.leases(backend_url.removeprefix("http://")) == 0


async def test_a_replica_killed_mid_stream_gives_its_slot_back_within_lease_ttl(store: Store) -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=20))
    async with running(backend) as backend_url:
        env = fleet_env(backend_url, store, lease_ttl="2")
        ports = [free_port() for _ in range(3)]
        async with AsyncExitStack() as stack:
            replicas = [
                await stack.enter_async_context(serving_process_handle(pool_serve(port), port, env))
                for port in ports
            ]
            body = {**CHAT, "stream": True, "max_tokens": 400}  # 20 s of tokens: long past the kill
            doomed = await stack.enter_async_context(
                httpx.AsyncClient(base_url=replicas[0][0], trust_env=False, timeout=30)
            )
            stream = await stack.enter_async_context(doomed.stream("POST", "/v1/chat/completions", json=body))
            chunks = stream.aiter_bytes()
            await anext(chunks)  # replica 0 holds one of the 2 slots, mid-stream
            survivor = await stack.enter_async_context(
                httpx.AsyncClient(base_url=replicas[1][0], trust_env=False, timeout=30)
            )
            held = await stack.enter_async_context(survivor.stream("POST", "/v1/chat/completions", json=body))
            held_chunks = held.aiter_bytes()  # kept: a dropped iterator closes its response
            await anext(held_chunks)  # the other slot, held by a live replica all along
            replicas[0][1].kill()  # SIGKILL: no release, no goodbye
            await replicas[0][1].wait()
            statuses: list[int] = []
            with anyio.fail_after(10):  # only once the dead replica's lease expires (lease_ttl 2 s)
                await ask(replicas[2][0], statuses)
            with anyio.fail_after(10):  # the fleet, as any replica shows it: the two alive
                while True:
                    status = (await survivor.get("/v1/pool/status")).json()["shared_state"]
                    if len(status["processes"]) == 2:
                        break
                    await anyio.sleep(0.1)
            assert {p["leases"] for p in status["processes"]} <= {0, 1}
            assert status["process"] in {p["process"] for p in status["processes"]}
    assert statuses == [200]
    assert backend.stats.peak_in_flight <= 2
    assert store.leases(backend_url.removeprefix("http://")) == 0


async def test_the_store_killed_and_restarted_mid_load_fails_closed_then_recovers(store: Store) -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=20))
    async with running(backend) as backend_url:
        env = fleet_env(backend_url, store, lease_ttl="3")
        port = free_port()
        async with AsyncExitStack() as stack:
            base = await stack.enter_async_context(serving_process(pool_serve(port), port, env))
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=base, trust_env=False, timeout=30)
            )
            body = {**CHAT, "stream": True, "max_tokens": 60}  # 3 s of tokens
            in_flight = await stack.enter_async_context(
                client.stream("POST", "/v1/chat/completions", json=body)
            )
            chunks = in_flight.aiter_bytes()
            received = await anext(chunks)
            store.stop()  # the store goes away mid-stream
            with anyio.fail_after(10):  # a clear answer within a few seconds, never a hang
                refused = await client.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "state_unavailable"
            async for chunk in chunks:  # the request already under way finishes
                received += chunk
            assert received.rstrip().endswith(b"data: [DONE]")
            store.start()  # back, and empty: no persistence
            with anyio.fail_after(15):
                while (answer := await client.post("/v1/chat/completions", json=CHAT)).status_code != 200:
                    assert answer.json()["error"]["code"] == "state_unavailable"
                    await anyio.sleep(0.2)
            statuses: list[int] = []
            async with anyio.create_task_group() as group:
                for _ in range(6):
                    group.start_soon(ask, base, statuses)
            with anyio.fail_after(10):  # releases sent while the store was away are sent now
                while store.leases(backend_url.removeprefix("http://")):
                    await anyio.sleep(0.05)
    assert statuses == [200] * 6
    assert backend.stats.peak_in_flight <= 2


async def test_ctrl_c_to_the_group_of_serve_workers_stops_gracefully(store: Store) -> None:
    """A terminal's Ctrl-C is one SIGINT to the whole process group. Each worker must take it once
    (graceful: its streams finish), not once from the terminal and once from its parent (which
    would be a second signal: everything cut at once)."""
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=8, tokens_per_second=20))
    async with running(backend) as backend_url:
        env = fleet_env(backend_url, store, shutdown_grace="20")
        port = free_port()
        command = pool_serve(port, "--workers", "2")
        async with serving_process_handle(command, port, env, own_group=True) as (base, process):
            body = {**CHAT, "stream": True, "max_tokens": 40}  # 2 s of tokens each
            started = anyio.Event()
            streaming: list[int] = []
            bodies: list[bytes] = []

            async def stream() -> None:
                async with (
                    httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as own,
                    own.stream("POST", "/v1/chat/completions", json=body) as answer,
                ):
                    received = b""
                    async for chunk in answer.aiter_bytes():
                        if not received:
                            streaming.append(1)
                            if len(streaming) == 8:
                                started.set()  # all eight are mid-stream
                        received += chunk
                    bodies.append(received)

            workers = children_of(process.pid)
            assert len(workers) >= 2
            # The terminal's signal reaches the parent's group only; the parent passes it on once.
            assert all(os.getpgid(pid) != os.getpgid(process.pid) for pid in workers)
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(stream)
                await started.wait()
                os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            assert process.stdout is not None
            with anyio.fail_after(30):
                code = await process.wait()
            output = (await process.stdout.receive()).decode(errors="replace")
    assert len(bodies) == 8
    for received in bodies:  # every stream ran to its end: 40 tokens, then [DONE]
        assert received.rstrip().endswith(b"data: [DONE]"), received[-200:]
        assert received.count(b'"content"') >= 40
    assert "again: stopped at once" not in output, output
    assert output.count("SIGINT: stopping worker") == 2, output
    assert code == 0, output
    assert store.leases(backend_url.removeprefix("http://")) == 0


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc), serving workers and multiprocessing's helper."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return [child for child in found if b"local_inference_pool" in _cmdline(child) or _is_spawned(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_spawned(pid: int) -> bool:
    return b"multiprocessing.spawn" in _cmdline(pid) and b"resource_tracker" not in _cmdline(pid)


async def test_workers_stop_by_themselves_when_serve_is_killed(store: Store) -> None:
    """``serve --workers`` killed with SIGKILL cannot pass anything on: its workers see their
    parent gone and stop (their port closes), rather than serve on as orphans."""
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2))
    async with running(backend) as backend_url:
        port = free_port()
        command = pool_serve(port, "--workers", "2")
        async with serving_process_handle(command, port, fleet_env(backend_url, store)) as (_, process):
            workers = [pid for pid in children_of(process.pid) if _is_spawned(pid)]
            assert len(workers) == 2
            process.kill()
            await process.wait()
            with anyio.fail_after(20):
                while any(_alive(pid) for pid in workers):
                    await anyio.sleep(0.05)


def _alive(pid: int) -> bool:
    """Not yet exited (a zombie waiting for a parent that is gone counts as exited; reading /proc
    is a local file system, not I/O worth a thread)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
