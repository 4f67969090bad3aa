"""A fleet that changes while `serve` serves: the config file rewritten under load (``--watch``),
reloaded on SIGHUP, swapped as a Kubernetes ConfigMap is, and a server that registers itself."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import Process

from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from ..redis_store import Store
from .test_serve import free_port, serve_command

pytestmark = pytest.mark.anyio

ADMIN = "admin-secret"
STREAM = {"model": "sim", "stream": True, "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}


def config_text(backends: dict[str, tuple[str, int]], *, admin: bool = True) -> str:
    pool = f'[pool]\nhealth_interval = 0.2\ndrain_timeout = 10\nadmin_keys = ["{ADMIN}"]\n' if admin else ""
    entries = "".join(
        f'[[backends]]\nname = "{name}"\nurl = "{url}"\nslots = {slots}\n'
        for name, (url, slots) in backends.items()
    )
    return pool + entries


def write_atomically(path: Path, text: str) -> None:
    """As editors save: a new file renamed over the old one."""
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    fresh.replace(path)


@asynccontextmanager
async def serving_pool(
    config: Path, *extra: str, key: str | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Process]]:
    """``serve`` on ``config`` in a process of its own; its log goes to ``config``'s ``.log``. The
    client sends ``key`` (a user key) unless a request says otherwise."""
    port = free_port()
    command = serve_command(config, port, *extra)
    log = config.with_suffix(".log").open("ab")
    async with (
        await anyio.open_process(command, stderr=log) as process,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/v1",
            trust_env=False,
            timeout=30,
            headers={"authorization": f"Bearer {key}"} if key else None,
        ) as client,
    ):
        try:
            with anyio.fail_after(20):
                while True:
                    try:
                        if (await client.get("/models")).json().get("data"):
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)
            yield client, process
        finally:
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(20):
                await process.wait()
            log.close()


async def fleet(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    status = (await client.get("/pool/status")).json()
    return {b["name"]: b for b in status["backends"]}


async def until(check: Callable[[dict[str, dict[str, Any]]], bool], client: httpx.AsyncClient) -> None:
    with anyio.fail_after(15):
        while not check(await fleet(client)):
            await anyio.sleep(0.02)


def sims(count: int) -> list[SimulatedBackend]:
    return [
        SimulatedBackend(SimulatorConfig(models=("sim",), slots=8, tokens_per_second=400))
        for _ in range(count)
    ]


async def test_rewriting_the_config_under_load_drops_no_request(tmp_path: Path) -> None:
    a, b, c = sims(3)
    async with running(a) as url_a, running(b) as url_b, running(c) as url_c:
        config = tmp_path / "pool.toml"
        config.write_text(config_text({"a": (url_a, 4), "b": (url_b, 4)}))
        async with serving_pool(config, "--watch") as (client, _):
            answers: list[httpx.Response] = []
            done = anyio.Event()

            async def user() -> None:
                while not done.is_set():
                    answers.append(await client.post("/chat/completions", json=STREAM))

            async with anyio.create_task_group() as group:
                for _ in range(50):
                    group.start_soon(user)
                await until(lambda f: f["a"]["granted"] > 0 and f["b"]["granted"] > 0, client)

                write_atomically(config, config_text({"b": (url_b, 4)}))  # a removed
                await until(lambda f: f.get("a", {}).get("admin_state", "drained") != "active", client)
                shown = await fleet(client)
                granted_a = shown["a"]["granted"] if "a" in shown else None
                await until(lambda f: "a" not in f, client)
                if granted_a is not None:
                    assert a.stats.requests == granted_a  # nothing new reached it once it drained

                config.write_text(config_text({"b": (url_b, 4), "c": (url_c, 4)}))  # c added
                await until(lambda f: "c" in f and f["c"]["granted"] > 0, client)

                config.write_text(config_text({"b": (url_b, 2), "c": (url_c, 4)}))  # b halved
                await until(lambda f: f["b"]["slots"] == 2, client)
                await until(lambda f: f["b"]["busy"] <= 2, client)
                done.set()
    assert len(answers) > 100
    assert [r.status_code for r in answers] == [200] * len(answers)
    assert all(r.text.endswith("data: [DONE]\n\n") for r in answers)
    assert b.stats.peak <= 4


async def test_sighup_reloads_and_an_invalid_file_keeps_the_old_configuration(tmp_path: Path) -> None:
    a, b = sims(2)
    async with running(a) as url_a, running(b) as url_b:
        config = tmp_path / "pool.toml"
        config.write_text(config_text({"a": (url_a, 2)}, admin=False))
        async with serving_pool(config) as (client, process):
            config.write_text(config_text({"a": (url_a, 2), "b": (url_b, 2)}, admin=False))
            process.send_signal(signal.SIGHUP)
            await until(lambda f: set(f) == {"a", "b"}, client)
            config.write_text("[pool]\nqueue_limit = -1\n")
            process.send_signal(signal.SIGHUP)
            log = config.with_suffix(".log")
            with anyio.fail_after(15):
                while "refused" not in log.read_text():
                    await anyio.sleep(0.02)
            assert set(await fleet(client)) == {"a", "b"}  # the old configuration serves on
            config.write_text(config_text({"a": (url_a, 3), "b": (url_b, 2)}, admin=False))
            process.send_signal(signal.SIGHUP)
            await until(lambda f: f["a"]["slots"] == 3, client)
            answer = await client.post("/chat/completions", json=STREAM)
    assert answer.status_code == 200
    logged = config.with_suffix(".log").read_text()
    refused = [line for line in logged.splitlines() if "refused" in line]
    assert len(refused) == 1
    assert "pool.queue_limit" in refused[0]
    assert str(config) in refused[0]


async def test_a_swapped_configmap_symlink_is_seen(tmp_path: Path) -> None:
    """As Kubernetes updates a mounted ConfigMap: the file is a symlink through ``..data``, itself
    a symlink to a timestamped directory, and an update swaps ``..data`` atomically."""
    a, b = sims(2)
    async with running(a) as url_a, running(b) as url_b:
        mount = tmp_path / "config"
        mount.mkdir()

        def publish(version: int, text: str) -> None:
            directory = mount / f"..2026_12_04_{version}"
            directory.mkdir()
            (directory / "pool.toml").write_text(text)
            link = mount / "..data_tmp"
            link.symlink_to(directory.name)
            os.replace(link, mount / "..data")

        publish(1, config_text({"a": (url_a, 2)}))
        (mount / "pool.toml").symlink_to("..data/pool.toml")
        async with serving_pool(mount / "pool.toml", "--watch") as (client, _):
            publish(2, config_text({"a": (url_a, 2), "b": (url_b, 2)}))
            await until(lambda f: set(f) == {"a", "b"}, client)


async def test_register_joins_a_server_and_removes_it_on_sigint(tmp_path: Path) -> None:
    a, b = sims(2)
    async with running(a) as url_a, running(b) as url_b:
        config = tmp_path / "pool.toml"
        config.write_text(config_text({"a": (url_a, 2)}))
        async with serving_pool(config) as (client, _):
            pool_url = str(client.base_url).rstrip("/")
            command = [
                sys.executable,
                "-m",
                "local_inference_pool.cli",
                "register",
                "--pool",
                pool_url,
                "--admin-key-env",
                "TEST_ADMIN_KEY",
                "--url",
                url_b,
                "--name",
                "b",
                "--ttl",
                "3",
            ]
            env = {**os.environ, "TEST_ADMIN_KEY": ADMIN}
            async with await anyio.open_process(command, env=env) as registering:
                await until(lambda f: "b" in f and f["b"]["health"] == "healthy", client)
                shown = (await fleet(client))["b"]
                assert (shown["source"], shown["admin_state"]) == ("registered", "active")
                assert shown["registered_until"] is not None
                registering.send_signal(signal.SIGINT)
                with anyio.fail_after(15):
                    code = await registering.wait()
            assert code == 0
            assert "b" not in await fleet(client)
            wrong = await anyio.run_process(
                [*command[:-4], "--ttl", "3"], env={**os.environ, "TEST_ADMIN_KEY": "nope"}, check=False
            )
    assert wrong.returncode == 2
    assert b"refused" in wrong.stdout


async def test_changes_through_one_process_hold_in_every_process_of_the_fleet(
    tmp_path: Path, store: Store
) -> None:
    """With ``state``: a drain made through one replica holds in the other (it sends no new work
    there), a backend registered through that other replica is served by the first,
    and a replica started later starts with both changes."""
    a, b, c = sims(3)
    async with running(a) as url_a, running(b) as url_b, running(c) as url_c:
        config = tmp_path / "pool.toml"
        config.write_text(
            config_text({"a": (url_a, 4), "b": (url_b, 4)}).replace(
                "[pool]\n", f'[pool]\nstate = "{store.url}"\n'
            )
        )
        admin = {"authorization": f"Bearer {ADMIN}"}
        async with serving_pool(config) as (first, _), serving_pool(config) as (second, _):
            drained = await first.post("/pool/admin/backends/a/drain", headers=admin)
            assert drained.json()["admin_state"] in ("draining", "drained")
            # How soon: bench/living_fleet.py measures it (p99 13 ms); here, that it holds.
            await until(lambda f: f["a"]["admin_state"] != "active", second)
            before = a.stats.requests
            for _ in range(8):
                assert (await second.post("/chat/completions", json=STREAM)).status_code == 200
            assert a.stats.requests == before

            added = await second.post(
                "/pool/admin/backends", headers=admin, json={"url": url_c, "name": "c", "ttl": 60}
            )
            assert added.status_code == 201, added.text
            await until(lambda f: "c" in f and f["c"]["health"] == "healthy", first)
            assert (await fleet(first))["c"]["source"] == "registered"

            async with serving_pool(config) as (third, _):
                shown = await fleet(third)
                assert shown["a"]["admin_state"] != "active"
                assert shown["c"]["source"] == "registered"

            await second.post("/pool/admin/backends/a/undrain", headers=admin)
            await until(lambda f: f["a"]["admin_state"] == "active", first)
