"""Every example in examples/ runs as it is: under uvicorn, host routes and the pool at /v1 answer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest

from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "attribute", "host_route", "host_answer"),
    [
        ("standalone", "app", None, None),
        ("fastapi_app", "app", "/hello", {"hello": "from fastapi"}),
        ("starlette_app", "app", "/hello", {"hello": "from starlette", "started": True}),
        ("django_app", "application", "/hello", {"hello": "from django"}),
    ],
)
async def test_example_serves_the_pool_at_v1(
    name: str,
    attribute: str,
    host_route: str | None,
    host_answer: dict[str, object] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=1000))
    async with running(backend) as backend_url:
        monkeypatch.setenv("LIP_BACKENDS", backend_url)
        monkeypatch.setenv("LIP_HEALTH_INTERVAL", "0.2")
        app = getattr(load(name), attribute)
        async with (
            running(app) as url,
            httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client,
        ):
            with anyio.fail_after(5):
                while not (await client.get("/v1/models")).json().get("data"):
                    await anyio.sleep(0.02)
            reply = await client.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200
            assert reply.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
            assert reply.headers["x-backend"]
            missing = await client.get("/v1/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
            if host_route is not None:
                host = await client.get(host_route)
                assert host.status_code == 200
                assert host.json() == host_answer
            status = (await client.get("/v1/pool/status")).json()
            assert status["active_leases"] == 0
