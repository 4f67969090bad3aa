"""The dashboard in a real headless Chromium (Debian's, installed by .ci/run), against a live pool."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

pytestmark = pytest.mark.anyio

ARTIFACTS = Path(__file__).parent.parent.parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a browser test that silently skips is not a test
        pytest.skip(message)
    return path


@asynccontextmanager
async def launched(playwright: Any, executable: str) -> AsyncIterator[Any]:
    """Chromium, closed when the block ends."""
    browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        await browser.close()


async def painted(page: Any, selector: str) -> int:
    """How many pixels of a canvas are painted: a chart drawn, not only its elements."""
    count: int = await page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
            return painted;
        }""",
        selector,
    )
    return count


def watch_errors(page: Any) -> list[str]:
    """The page's console errors and uncaught exceptions, as they happen."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


async def test_dashboard_shows_twenty_backends_and_updates_when_a_request_runs() -> None:
    from playwright.async_api import async_playwright

    executable = chromium()
    models = ("qwen2.5-7b", "llama3.1-8b", "mistral-7b")
    sims = [
        SimulatedBackend(
            SimulatorConfig(
                models=(models[i % 3], models[(i + 1) % 3]), slots=1 + i % 4, tokens_per_second=20
            )
        )
        for i in range(20)
    ]
    fleet = Starlette(routes=[Mount(f"/b{i}", sim) for i, sim in enumerate(sims)])
    async with running(fleet) as fleet_url:
        config = PoolConfig(
            backends=tuple(BackendConfig(url=f"{fleet_url}/b{i}", name=f"gpu{i:02d}") for i in range(20)),
            health_interval=0.5,
            public_status=True,
        )
        async with (
            running(create_standalone_app(config)) as url,
            async_playwright() as playwright,
            launched(playwright, executable) as browser,
        ):
            page = await browser.new_page(viewport={"width": 1440, "height": 1100})
            problems = watch_errors(page)
            await page.goto(f"{url}/v1/pool/")
            await page.wait_for_function(
                "document.querySelectorAll('.badge.healthy').length === 20", timeout=15000
            )
            assert await page.locator(".card").count() == 20
            assert await page.inner_text("#done") == "0"

            async def slow_request() -> None:
                body = {
                    "model": "qwen2.5-7b",
                    "max_tokens": 60,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:
                    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200

            async with anyio.create_task_group() as group:
                group.start_soon(slow_request)
                await page.wait_for_function(
                    "document.getElementById('active').textContent === '1'", timeout=10000
                )
                busy_card = page.locator(".card", has_text="qwen2.5-7b \u00d7 1")
                assert await busy_card.count() == 1
            await page.wait_for_function("document.getElementById('done').textContent === '1'", timeout=10000)
            # The simulator reported the prompt's tokens: the prompt cache table shows them.
            await page.wait_for_function("!document.getElementById('cache-section').hidden", timeout=10000)
            assert "qwen2.5-7b" in await page.inner_text("#cache")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert problems == []
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


async def test_opened_with_an_admin_key_the_dashboard_drains_and_undrains_a_backend() -> None:
    """``?admin``: the browser asks for the admin key (sent as the Basic password), and each card
    offers drain or undrain. Opened with a user key, there are no buttons."""
    from playwright.async_api import async_playwright

    executable = chromium()
    sims = [SimulatedBackend(SimulatorConfig(models=("sim",), slots=2)) for _ in range(2)]
    fleet = Starlette(routes=[Mount(f"/b{i}", sim) for i, sim in enumerate(sims)])
    async with running(fleet) as fleet_url:
        config = PoolConfig(
            backends=tuple(BackendConfig(url=f"{fleet_url}/b{i}", name=f"gpu{i}") for i in range(2)),
            health_interval=0.5,
            api_keys=("user-key",),
            admin_keys=("admin-secret",),
        )
        async with (
            running(create_standalone_app(config)) as url,
            async_playwright() as playwright,
            launched(playwright, executable) as browser,
        ):
            as_user = await browser.new_context(http_credentials={"username": "me", "password": "user-key"})
            page = await as_user.new_page()
            await page.goto(f"{url}/v1/pool/")
            await page.wait_for_function("document.querySelectorAll('.card').length === 2")
            assert await page.locator(".card button").count() == 0
            refused = await page.goto(f"{url}/v1/pool/dashboard?admin")
            assert refused is not None
            assert refused.status == 401

            as_admin = await browser.new_context(
                http_credentials={"username": "me", "password": "admin-secret"}
            )
            page = await as_admin.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"{url}/v1/pool/dashboard?admin")
            await page.wait_for_function("document.querySelectorAll('.card button').length === 2")
            card = page.locator('.card[data-backend="gpu1"]')
            await card.locator("button[data-action=drain]").click()
            await page.wait_for_function(
                "document.querySelector('.card[data-backend=gpu1]').dataset.adminState !== 'active'"
            )
            assert await card.locator(".badge.drained, .badge.draining").count() == 1
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:
                status = await client.get("/v1/pool/status", headers={"authorization": "Bearer user-key"})
                shown = {b["name"]: b["admin_state"] for b in status.json()["backends"]}
                assert shown == {"gpu0": "active", "gpu1": "drained"}
                assert status.json()["admin"] is False
            await card.locator("button[data-action=undrain]").click()
            await page.wait_for_function(
                "document.querySelector('.card[data-backend=gpu1]').dataset.adminState === 'active'"
            )
            assert problems == []


async def test_the_dashboard_shows_usage_by_key_charts_tokens_and_opens_a_recent_request() -> None:
    """After two keys' requests: a usage row per key with its limits, and a chart with their
    tokens per minute, drawn (pixels on its canvas, not only elements)."""
    from playwright.async_api import async_playwright

    from local_inference_pool.config import KeyConfig
    from local_inference_pool.telemetry_config import TelemetryConfig

    executable = chromium()
    sim = SimulatedBackend(SimulatorConfig(models=("sim",), slots=4, tokens_per_second=2000))
    async with running(sim) as sim_url:
        config = PoolConfig(
            backends=(BackendConfig(url=sim_url, name="gpu0"),),
            keys=(
                KeyConfig(name="team-a", key="sk-a", rpm=100, tpm=50_000),
                KeyConfig(name="team-b", key="sk-b", max_tokens=1_000_000, budget_period="day"),
            ),
            health_interval=0.5,
            public_status=True,
            telemetry=TelemetryConfig(capture=True),
        )
        async with running(create_standalone_app(config)) as url, async_playwright() as playwright:
            async with httpx.AsyncClient(base_url=f"{url}/v1", trust_env=False, timeout=30) as client:
                for key, count in (("sk-a", 3), ("sk-b", 1)):
                    for _ in range(count):
                        body = {
                            "model": "sim",
                            "max_tokens": 20,
                            "messages": [{"role": "user", "content": "hi"}],
                        }
                        answer = await client.post(
                            "/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                        )
                        assert answer.status_code == 200
            async with launched(playwright, executable) as browser:
                page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                problems = watch_errors(page)
                await page.goto(f"{url}/v1/pool/")
                await page.wait_for_function(
                    "!document.getElementById('usage-section').hidden", timeout=10000
                )
                usage = await page.inner_text("#usage")
                assert "team-a" in usage
                assert "100 req/min; 50000 tok/min" in usage
                assert "1000000 tok/day" in usage
                await page.wait_for_function(
                    "document.querySelector('#chart canvas') !== null", timeout=10000
                )
                drawn = await painted(page, "#chart canvas")
                assert drawn > 200  # the two keys' lines (and the axes' grid)
                legend = await page.inner_text("#chart")
                assert "team-a" in legend
                assert "team-b" in legend
                # The activity charts, drawn from the last seconds' ring; the header's rates are live.
                await page.wait_for_function(
                    "document.querySelector('#chart-tokens canvas') !== null", timeout=10000
                )
                assert await painted(page, "#chart-tokens canvas") > 50
                assert await painted(page, "#chart-requests canvas") > 50
                assert float(await page.inner_text("#rps")) > 0
                # The recent requests, newest first; one opened shows its timings and its bodies.
                assert await page.locator("#recent tr").count() == 4
                await page.locator("#recent tr").first.click()
                await page.wait_for_selector("#detail-response", timeout=10000)
                assert '"ttfb_ms"' in await page.inner_text("#detail-timings")
                sent = await page.inner_text("#detail-request")
                assert "[redacted]" in sent
                assert "sk-b" not in sent
                assert "chat.completion" in await page.inner_text("#detail-response")
                ARTIFACTS.mkdir(exist_ok=True)
                await page.locator("#usage-section").scroll_into_view_if_needed()
                await page.screenshot(path=str(ARTIFACTS / "dashboard-usage.png"), full_page=True)
                assert problems == []
