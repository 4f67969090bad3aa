"""The demo: simulated backends, the pool in front of them, a sample workload, a live view.

Everything runs in this process on 127.0.0.1: no GPU, no model, no network.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from local_inference_pool.config import BackendConfig, PoolConfig
from local_inference_pool.gateway.app import create_standalone_app
from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

__all__ = ["FLEET", "run_demo"]


@dataclass(frozen=True)
class DemoBackend:
    name: str
    simulator: SimulatorConfig


FLEET: tuple[DemoBackend, ...] = (
    DemoBackend(
        "gpu0",
        SimulatorConfig(
            models=("qwen2.5-7b", "llama3.1-8b"),
            slots=4,
            tokens_per_second=60,
            load_seconds=3,
            prefill_tokens_per_second=3000,
            cached_prompts=16,
        ),
    ),
    DemoBackend(
        "gpu1",
        SimulatorConfig(
            models=("qwen2.5-7b",),
            slots=2,
            tokens_per_second=45,
            prefill_tokens_per_second=2000,
            cached_prompts=8,
        ),
    ),
    DemoBackend(
        "gpu2",
        SimulatorConfig(
            models=("llama3.1-8b", "mistral-7b"),
            slots=2,
            tokens_per_second=50,
            load_seconds=3,
            prefill_tokens_per_second=2500,
            cached_prompts=8,
        ),
    ),
    DemoBackend(  # an older server without Anthropic's API: the pool learns it and routes around
        "cpu0",
        SimulatorConfig(
            models=("mistral-7b", "qwen2.5-7b"),
            slots=1,
            tokens_per_second=15,
            load_seconds=3,
            lacks=("/v1/messages",),
            prefill_tokens_per_second=300,
            cached_prompts=4,
        ),
    ),
)
MODEL_WEIGHTS = {"qwen2.5-7b": 5, "llama3.1-8b": 3, "mistral-7b": 1}
API_WEIGHTS = {"chat": 6, "messages": 2, "responses": 2, "tokenize": 1}


SYSTEM = "You are the team's assistant. " + " ".join(
    f"Guideline {i}: answer plainly, cite the file you mean, and keep it short." for i in range(24)
)  # long, and the same for every chat and agent: its prefix is worth a cache


def _request(api: str, model: str, session: str, stream: bool, tokens: int) -> tuple[str, dict[str, Any]]:
    """One request of the workload: its path and body, in the API's own shape."""
    text = f"hello from {session}"
    if api == "messages":  # Anthropic's, as Claude Code sends it
        return "/v1/messages", {
            "model": model,
            "max_tokens": tokens,
            "stream": stream,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": text}],
        }
    if api == "responses":  # OpenAI's Responses, as Codex sends it
        return "/v1/responses", {"model": model, "input": text, "max_output_tokens": tokens, "stream": stream}
    if api == "tokenize":  # llama.cpp's, takes no slot
        return "/v1/tokenize", {"model": model, "content": text}
    return "/v1/chat/completions", {
        "model": model,
        "stream": stream,
        "stream_options": {"include_usage": True},
        "max_tokens": tokens,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
    }


async def run_demo(
    *,
    port: int,
    duration: float | None,
    requests: int,
    console: Console,
    fleet: Sequence[DemoBackend] = FLEET,
    seed: int = 7,
    stop_on_signals: bool = False,
) -> dict[str, Any]:
    """Serve the demo; returns the pool's final status. Stops after ``duration`` s (None: Ctrl-C).

    With ``stop_on_signals`` (the CLI, in the main thread), SIGINT or SIGTERM ends the workload and
    the servers stop gracefully; a second one during that stops the process at once. The status then
    has ``stopped_by``: the signal's name.
    """
    workload = anyio.CancelScope()
    stopped_by: list[str] = []
    async with anyio.create_task_group() as guard:
        if stop_on_signals:
            await guard.start(_stop_on_signals, workload, stopped_by, console)
        try:
            status = await _serve(port, duration, requests, console, fleet, seed, workload)
        finally:
            guard.cancel_scope.cancel()
    status["stopped_by"] = stopped_by[0] if stopped_by else None
    return status


async def _stop_on_signals(
    workload: anyio.CancelScope,
    stopped_by: list[str],
    console: Console,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for number in signals:
            name = signal.Signals(number).name
            if stopped_by:
                console.print(f"{name} again: stopped at once")
                os._exit(130)  # the user asked twice: no more waiting for anything
            stopped_by.append(name)
            console.print(f"{name}: stopping (press Ctrl-C again to stop at once)")
            workload.cancel()


async def _serve(
    port: int,
    duration: float | None,
    requests: int,
    console: Console,
    fleet: Sequence[DemoBackend],
    seed: int,
    workload: anyio.CancelScope,
) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(running(SimulatedBackend(b.simulator))) for b in fleet]
        config = PoolConfig(
            backends=tuple(BackendConfig(url=url, name=b.name) for url, b in zip(urls, fleet, strict=True)),
            health_interval=1.0,
            queue_timeout=300,
            public_status=True,
        )
        base = await stack.enter_async_context(running(create_standalone_app(config), port=port))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, trust_env=False, timeout=300))
        console.print(f"[bold]local-inference-pool demo[/] with {len(fleet)} simulated backends")
        console.print(f"  API        {base}/v1   (OpenAI clients: base_url={base}/v1; Anthropic's: {base})")
        console.print(f"  dashboard  {base}/v1/pool/")
        console.print(f"  metrics    {base}/v1/pool/metrics")
        console.print(f"  status     {base}/v1/pool/status")
        for b, url in zip(fleet, urls, strict=True):
            models = ", ".join(b.simulator.models)
            console.print(
                f"  backend {b.name}: {url}  slots {b.simulator.slots}  models {models}", style="dim"
            )
        with workload, anyio.move_on_after(duration if duration is not None else float("inf")):
            await _wait_until_healthy(http)
            await _drive(http, requests, console, random.Random(seed))
            console.print("workload done; still serving: open the dashboard, or press Ctrl-C to stop")
            await anyio.sleep_forever()
        status: dict[str, Any] = (await http.get("/v1/pool/status")).json()
        return status


async def _wait_until_healthy(http: httpx.AsyncClient) -> None:
    with anyio.fail_after(30):
        while not all(  # noqa: ASYNC110 - polling another server's state, bounded above
            b["health"] == "healthy" for b in (await http.get("/v1/pool/status")).json()["backends"]
        ):
            await anyio.sleep(0.1)


async def _drive(http: httpx.AsyncClient, total: int, console: Console, rng: random.Random) -> None:
    """A mix of models and of APIs (OpenAI chat, Anthropic Messages, OpenAI Responses, llama.cpp's
    tokenize), sessions of several turns, streaming and not, 12 at a time."""
    models = list(MODEL_WEIGHTS)
    weights = list(MODEL_WEIGHTS.values())
    apis = list(API_WEIGHTS)
    work = []
    for index in range(total):
        session = f"user-{rng.randrange(max(1, total // 4))}"
        api = rng.choices(apis, list(API_WEIGHTS.values()))[0]
        work.append((api, rng.choices(models, weights)[0], session, index % 3 != 0, rng.randint(8, 48)))
    limiter = anyio.Semaphore(12)
    columns = (
        TextColumn("[bold]requests"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "running {task.fields[running]}  queued {task.fields[queued]}  model loads {task.fields[loads]}"
        ),
        TextColumn("{task.fields[tps]} tokens/s"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("requests", total=total, running=0, queued=0, loads=0, tps=0)

        async def one(api: str, model: str, session: str, stream: bool, tokens: int) -> None:
            async with limiter:
                path, body = _request(api, model, session, stream, tokens)
                headers = {"x-session-id": session}
                if stream and api != "tokenize":
                    async with http.stream("POST", path, json=body, headers=headers) as response:
                        async for _ in response.aiter_bytes():
                            pass
                else:
                    await http.post(path, json=body, headers=headers)
            progress.advance(task)

        async def watch() -> None:
            previous_tokens, previous_at = 0, anyio.current_time()
            while True:
                state = (await http.get("/v1/pool/status")).json()
                now = anyio.current_time()
                tokens = state["traffic"]["completion_tokens"]
                rate = (tokens - previous_tokens) / max(1e-9, now - previous_at)
                previous_tokens, previous_at = tokens, now
                progress.update(
                    task,
                    running=state["active_leases"],
                    queued=state["queue"]["waiting"],
                    loads=sum(b["model_loads"] for b in state["backends"]),
                    tps=round(rate),
                )
                await anyio.sleep(0.5)

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            async with anyio.create_task_group() as workers:
                for item in work:
                    workers.start_soon(one, *item)
            group.cancel_scope.cancel()
