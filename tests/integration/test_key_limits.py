"""Key limits that hold across `serve` processes on one real Redis: rpm exactly, tpm settled from
the usage streams report at their end, a budget crossed mid-stream, keys changed at runtime, and
the usage of the whole fleet."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from ..redis_store import Store
from .test_living_fleet import serving_pool

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": "Bearer admin-secret"}
TEAM_KEY = "sk-team-secret"
TEAM = {"authorization": f"Bearer {TEAM_KEY}"}
STREAM = {
    "model": "sim",
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 6,
    "messages": [{"role": "user", "content": "hi"}],
}


def config(store: Store, url: str, team: str) -> str:
    return (
        f'[pool]\nstate = "{store.url}"\nhealth_interval = 0.2\nadmin_keys = ["admin-secret"]\n'
        f'[[backends]]\nname = "a"\nurl = "{url}"\nslots = 16\n'
        f'[[keys]]\nname = "team"\nkey = "sk-team-secret"\n{team}\n'
    )


def stored_text(store: Store) -> str:
    """Everything the store holds, as text: the values of its strings, hashes and sorted sets."""
    client = redis.Redis(port=store.port, decode_responses=True)
    parts: list[str] = []
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == "string":
            parts.append(str(client.get(key)))
        elif kind == "hash":
            parts.append(json.dumps(client.hgetall(key)))
        elif kind == "zset":
            parts.append(json.dumps(client.zrange(key, 0, -1)))
    return "\n".join(parts)


def sim() -> SimulatedBackend:
    return SimulatedBackend(SimulatorConfig(models=("sim",), slots=16, tokens_per_second=2000))


@asynccontextmanager
async def processes(
    tmp_path: Path, store: Store, limits: str, count: int
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` serve processes on one store and one simulated backend, with the key's ``limits``;
    a client of each, sending the key."""
    async with running(sim()) as url, AsyncExitStack() as stack:
        path = tmp_path / "pool.toml"
        path.write_text(config(store, url, limits))
        clients = []
        for _ in range(count):
            client, _process = await stack.enter_async_context(serving_pool(path, key=TEAM_KEY))
            clients.append(client)
        yield clients


async def test_rpm_admits_exactly_its_limit_across_three_processes(tmp_path: Path, store: Store) -> None:
    async with processes(tmp_path, store, "rpm = 10", 3) as (one, two, three):
        statuses: list[int] = []

        async def ask(client: httpx.AsyncClient) -> None:
            answer = await client.post("/chat/completions", json={**STREAM, "stream": False}, headers=TEAM)
            statuses.append(answer.status_code)

        async with anyio.create_task_group() as group:
            for index in range(30):
                group.start_soon(ask, (one, two, three)[index % 3])
    assert sorted(statuses) == [200] * 10 + [429] * 20


async def test_the_counts_outlive_a_gateway_restart(tmp_path: Path, store: Store) -> None:
    async with running(sim()) as url:
        path = tmp_path / "pool.toml"
        path.write_text(config(store, url, "rpm = 2"))
        async with serving_pool(path, key=TEAM_KEY) as (first, _):
            for _ in range(2):
                assert (await first.post("/chat/completions", json=STREAM, headers=TEAM)).status_code == 200
        async with serving_pool(path, key=TEAM_KEY) as (again, _):
            refused = await again.post("/chat/completions", json=STREAM, headers=TEAM)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


async def test_tpm_is_settled_from_the_usage_a_stream_reports_at_its_end(
    tmp_path: Path, store: Store
) -> None:
    async with processes(tmp_path, store, "tpm = 100000", 2) as (one, two):
        used = 0
        for client in (one, two, one):
            async with client.stream("POST", "/chat/completions", json=STREAM, headers=TEAM) as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if '"usage"' in line and '"total_tokens"' in line:
                        used += httpx.Response(200, content=line.removeprefix("data: ")).json()["usage"][
                            "total_tokens"
                        ]
        # Through the process of the last stream: there its next request waits for its settling
        # (across processes the settling, sent after the answer, may come a moment later).
        answer = await one.post(
            "/chat/completions", json={**STREAM, "stream": False, "max_tokens": 1}, headers=TEAM
        )
    # The streams' reservations (their bodies' size / 4 + max_tokens each) became what they used;
    # the window holds that and the last request's own reservation.
    reserved_now = 100000 - int(answer.headers["x-ratelimit-remaining-tokens"])
    estimate = len(json.dumps({**STREAM, "stream": False, "max_tokens": 1})) // 4 + 1
    assert used > 0
    assert reserved_now == pytest.approx(used + estimate, abs=10)
    assert reserved_now < 3 * (len(json.dumps(STREAM)) // 4 + 6)


async def test_a_budget_crossed_mid_stream_finishes_and_the_next_request_anywhere_is_refused(
    tmp_path: Path, store: Store
) -> None:
    async with processes(tmp_path, store, 'max_tokens = 5\nbudget_period = "day"', 2) as (one, two):
        async with one.stream("POST", "/chat/completions", json=STREAM, headers=TEAM) as stream:
            text = "".join([part async for part in stream.aiter_text()])
        same = await one.post("/chat/completions", json=STREAM, headers=TEAM)
        other = await two.post("/chat/completions", json=STREAM, headers=TEAM)
    assert text.rstrip().endswith("data: [DONE]")
    for refused in (same, other):
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"


async def test_a_key_added_and_rotated_through_one_process_holds_in_the_other_within_a_second(
    tmp_path: Path, store: Store
) -> None:
    async with processes(tmp_path, store, "", 2) as (one, two):
        made = (await one.post("/pool/admin/keys", json={"name": "ci", "rpm": 100}, headers=ADMIN)).json()
        bearer = {"authorization": f"Bearer {made['key']}"}
        with anyio.fail_after(1):
            while (await two.get("/models", headers=bearer)).status_code != 200:
                await anyio.sleep(0.01)
        rotated = (await two.post("/pool/admin/keys/ci/rotate", headers=ADMIN)).json()
        with anyio.fail_after(1):
            while (await one.get("/models", headers=bearer)).status_code != 401:
                await anyio.sleep(0.01)
        answer = await one.post(
            "/chat/completions", json=STREAM, headers={"authorization": f"Bearer {rotated['key']}"}
        )
        assert answer.status_code == 200
        assert made["key"] not in stored_text(store)
        assert rotated["key"] not in stored_text(store)

        # The fleet's usage, read through either process, counts what went through both.
        await two.post("/chat/completions", json=STREAM, headers=TEAM)
        with anyio.fail_after(5):
            while True:
                rows = (await one.get("/pool/usage?group=key", headers=ADMIN)).json()["data"]
                if {row["key"]: row["requests"] for row in rows} == {"ci": 1, "team": 1}:
                    break
                await anyio.sleep(0.1)
