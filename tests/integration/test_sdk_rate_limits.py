"""The official `openai` and `anthropic` SDKs against a key's limits: they read the rate-limit
headers, and after a 429 they wait what `retry-after-ms` says and retry by themselves."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anthropic
import anyio
import httpx
import openai
import pytest

from local_inference_pool.config import KeyConfig
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from .stack import started

pytestmark = pytest.mark.anyio

KEY = "sk-sdk-secret"
PERIOD = 2.0  # seconds: a budget that renews fast enough for the SDKs' own wait to reach it


@asynccontextmanager
async def limited_pool() -> AsyncIterator[str]:
    """The pool with one key whose budget (1 token per PERIOD) the first request crosses."""
    key = KeyConfig(name="sdk", key=KEY, rpm=1000, tpm=100_000, max_tokens=1, budget_period=PERIOD)
    backends = [SimulatedBackend(SimulatorConfig(models=("sim",), slots=4, tokens_per_second=2000))]
    async with started(backends, keys=(key,), public_status=True) as up:
        yield up.url


async def fresh_period() -> None:
    """Start just after a budget period begins, so the next one is PERIOD seconds away."""
    now = time.time()
    await anyio.sleep(math.ceil(now / PERIOD) * PERIOD - now + 0.05)


async def refusals(url: str) -> float:
    async with httpx.AsyncClient(trust_env=False) as http:
        metrics = (await http.get(f"{url}/v1/pool/metrics")).text
    line = next(
        (
            row
            for row in metrics.splitlines()
            if row.startswith('lip_key_requests_total{key="sdk",outcome="budget_exceeded"}')
        ),
        "x 0",
    )
    return float(line.split()[-1])


async def test_the_openai_sdk_reads_the_headers_and_retries_after_a_429_by_itself() -> None:
    async with limited_pool() as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=2, timeout=20)
        async with client:
            await fresh_period()
            first = await client.chat.completions.with_raw_response.create(
                model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert first.headers["x-ratelimit-limit-requests"] == "1000"
            assert first.headers["x-ratelimit-remaining-requests"] == "999"
            assert first.headers["x-budget-remaining-tokens"] == "1"  # then the answer spent it
            started_at = time.monotonic()
            again = await client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            waited = time.monotonic() - started_at
        assert again.choices[0].message.content
        assert await refusals(url) == 1  # refused once, then retried by the SDK into the next period
        assert 0.5 < waited < PERIOD + 1


async def test_the_anthropic_sdk_retries_after_a_429_by_itself() -> None:
    async with limited_pool() as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=2, timeout=20)
        async with client:
            await fresh_period()
            first = await client.messages.with_raw_response.create(
                model="sim", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
            assert first.headers["anthropic-ratelimit-requests-limit"] == "1000"
            assert first.headers["anthropic-ratelimit-tokens-remaining"].isdigit()
            again = await client.messages.create(
                model="sim", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert again.content
        assert await refusals(url) == 1
