"""Claude Code and Codex through the pool with their default model names and no model settings: an
alias config (``claude-*`` and ``gpt-*`` -> the local model) serves them, and a one-shot prompt
answers. Real agents (pinned in ``tests/e2e/agents``), a real llama-server, the pool in front."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running
from local_inference_pool.model_config import ModelConfig

from .test_llamacpp import Launched, await_health, free_port, launch, model_file, server_binary, stop

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

AGENTS = Path(__file__).parent / "agents" / "node_modules" / ".bin"
# The tiny model rarely stops by itself: its answers are capped, cut at a line's or a sentence's end.
TERSE = (("max_tokens", 64), ("temperature", 0), ("stop_sequences", ["\n", "."]))
ALIASES = ModelConfig("gemma", ("claude-*", "gpt-*"), params_set=TERSE)


def agent(name: str) -> str:
    path = AGENTS / name
    if not path.exists():
        pytest.fail(f"{name} is missing: npm ci --prefix tests/e2e/agents (make test does)")
    return str(path)


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama-server with the model's own template (it takes any order of roles, as an agent's
    conversation has them) and room for an agent's prompt (its tools: 4,000 to 7,000 tokens)."""
    logs = tmp_path_factory.mktemp("agent-logs")
    port = free_port()
    command = [server_binary(), "-m", model_file(), "--host", "127.0.0.1", "--port", str(port), "--"]
    command += ["-np", "1", "-c", "16384", "-a", "gemma", "-t", "2"]
    servers: list[Launched] = [launch(command, port, logs)]
    try:
        await_health(servers)
        yield servers[0].url
    finally:
        stop(servers)


@asynccontextmanager
async def aliased_pool(url: str) -> AsyncIterator[str]:
    config = PoolConfig(
        backends=(BackendConfig(url=url, name="llama"),), models=(ALIASES,), health_interval=0.5
    )
    async with running(create_standalone_app(config)) as base, httpx.AsyncClient(trust_env=False) as http:
        with anyio.fail_after(30):
            while not (await http.get(f"{base}/v1/models")).json().get("data"):
                await anyio.sleep(0.1)
        yield base


async def metrics(base: str) -> str:
    async with httpx.AsyncClient(trust_env=False) as http:
        return (await http.get(f"{base}/v1/pool/metrics")).text


async def test_claude_code_answers_through_the_pool_with_its_default_model(
    agent_server: str, tmp_path: Path
) -> None:
    async with aliased_pool(agent_server) as base:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),  # no settings of the user's: its defaults
            "ANTHROPIC_BASE_URL": base,
            "ANTHROPIC_API_KEY": "sk-unused",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
        }
        with anyio.fail_after(300):
            done = await anyio.run_process(
                [agent("claude"), "-p", "Say hello.", "--max-turns", "1"], env=env, cwd=tmp_path, check=False
            )
        counted = await metrics(base)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.strip()
    assert 'lip_alias_requests_total{alias="claude-*",model="gemma"}' in counted


async def test_codex_answers_through_the_pool_with_its_default_model(
    agent_server: str, tmp_path: Path
) -> None:
    async with aliased_pool(agent_server) as base:
        (tmp_path / ".codex").mkdir()
        (tmp_path / ".codex" / "config.toml").write_text(
            'model_provider = "pool"\n\n[model_providers.pool]\nname = "pool"\n'
            f'base_url = "{base}/v1"\nwire_api = "responses"\n'
        )
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
        command = [agent("codex"), "exec", "--skip-git-repo-check", "Say hello."]
        with anyio.fail_after(300):
            done = await anyio.run_process(command, env=env, cwd=tmp_path, check=False)
        counted = await metrics(base)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.strip()
    assert 'lip_alias_requests_total{alias="gpt-*",model="gemma"}' in counted
