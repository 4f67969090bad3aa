"""Placement by prompt cache through the pool under real uvicorn on 127.0.0.1, simulated backends
with a prompt cache and a prefill time behind it: a turn whose cache holder is busy waits for it
when that is cheaper, and what the backends report shows in status and metrics."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio

DOCUMENT = " ".join(f"Clause {i} of the contract under review says something specific." for i in range(80))


def chat(question: str, *, document: bool = True, stream: bool = False, tokens: int = 4) -> dict[str, Any]:
    messages = [{"role": "system", "content": DOCUMENT}] if document else []
    messages.append({"role": "user", "content": question})
    return {"model": "sim", "messages": messages, "max_tokens": tokens, "stream": stream}


@asynccontextmanager
async def pool(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    simulated = SimulatorConfig(
        models=("sim",), slots=1, tokens_per_second=200.0, prefill_tokens_per_second=2000.0
    )
    backends = [SimulatedBackend(simulated) for _ in range(2)]
    async with (
        started(backends, public_status=True, **settings) as up,
        httpx.AsyncClient(base_url=f"{up.url}/v1", trust_env=False, timeout=20) as http,
    ):
        yield http


async def until(http: httpx.AsyncClient, check: Any) -> dict[str, Any]:
    """The pool's status once ``check`` holds for it."""
    with anyio.fail_after(10):
        while not check(status := (await http.get("/pool/status")).json()):
            await anyio.sleep(0.01)
    return dict(status)


async def test_a_turn_waits_for_the_busy_server_holding_its_prompt_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="local_inference_pool.access")
    async with pool() as http:
        first = await http.post("/chat/completions", json=chat("What does clause 1 say?"))
        assert (first.headers["x-backend"], first.headers["x-session-affinity"]) == ("b0", "miss")
        done = anyio.Event()
        answers: dict[str, httpx.Response] = {}

        async def turn() -> None:
            answers["turn"] = await http.post("/chat/completions", json=chat("And clause 2?"))
            done.set()

        async with anyio.create_task_group() as group:
            async with http.stream(
                "POST", "/chat/completions", json=chat("Clause 3?", stream=True, tokens=100_000)
            ) as busy:
                assert busy.headers["x-backend"] == "b0"  # where the document is cached
                async with http.stream(
                    "POST", "/chat/completions", json=chat("hi", document=False, stream=True, tokens=100_000)
                ) as other:
                    assert other.headers["x-backend"] == "b1"
                    group.start_soon(turn)
                    await until(http, lambda s: s["queue"]["waiting"] == 1)
                # b1 is free now: the turn is offered it, and holds out for b0's cache instead
                status = await until(http, lambda s: s["backends"][0]["held_for_cache"] == 1)
                assert status["backends"][1]["busy"] == 0
                assert not done.is_set()
            with anyio.fail_after(10):
                await done.wait()
        reply = answers["turn"]
        assert reply.status_code == 200
        assert (reply.headers["x-backend"], reply.headers["x-session-affinity"]) == ("b0", "waited")
        assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 500
        status = await until(http, lambda s: s["active_leases"] == 0)
        row = next(r for r in status["prompt_cache"] if r["backend"] == "b0")
        assert row["waits"] == 1
        assert row["cached_tokens"] > 500
        assert status["backends"][0]["prefill_ms_per_token"] == pytest.approx(0.5, rel=0.05)
        metrics = (await http.get("/pool/metrics")).text
        assert 'lip_cache_waits_total{backend="b0",model="sim"} 1.0' in metrics
        assert 'lip_affinity_total{result="waited"} 1.0' in metrics
    logged = [r.getMessage() for r in caplog.records if "affinity=waited" in r.getMessage()]
    assert len(logged) == 1
    assert "backend=b0" in logged[0]
    assert re.search(r"cached_tokens=\d{3,}", logged[0])


async def test_with_cache_waits_off_a_busy_holder_is_left_at_once() -> None:
    async with pool(cache_wait_max=0) as http:
        await http.post("/chat/completions", json=chat("What does clause 1 say?"))
        async with http.stream(
            "POST", "/chat/completions", json=chat("Clause 3?", stream=True, tokens=100_000)
        ) as busy:
            assert busy.headers["x-backend"] == "b0"
            reply = await http.post("/chat/completions", json=chat("And clause 2?"))
        assert (reply.headers["x-backend"], reply.headers["x-session-affinity"]) == ("b1", "moved")
        status = await until(http, lambda s: s["active_leases"] == 0)
        assert next(r for r in status["prompt_cache"] if r["backend"] == "b0")["moved"] == 1
