"""What a prefix index per process costs in prompt-cache hits, over real HTTP and a real Redis.

Run: ``.venv/bin/python bench/cache_fleet.py`` (about 2 minutes; ``--quick``: one pool only; needs
``redis-server``). Everything is on 127.0.0.1, in this process but Redis:
- two simulated llama-servers (2 slots each, a prompt cache of 6 prompts, 2,000 prompt tokens/s
  of prefill, 100 answer tokens/s);
- two pool apps under uvicorn sharing one redis-server (``state``);
- eight conversations of six turns, all eight speaking at once each turn (a paragraph each,
  answers of 32 tokens).

Each run starts with fresh servers and a flushed Redis. Reported: the share of later turns' prompt
tokens the servers served from their cache, the run's wall time and the placements, for

- ``one pool``: every turn to one process (the in-process figure);
- ``two pools, sticky``: each conversation always to the same process (a load balancer with
  affinity by client);
- ``two pools, random``: each turn to either process (round-robin workers behind one port): the
  process holding a turn may never have seen its conversation; it knows its server only from the
  fleet-wide session in Redis;
- ``..., before``: the placement before prompt caches counted (``cache_wait_max = 0``, no prefix
  index).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import redis

from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import shared_state as helpers  # noqa: E402 - the bench helpers beside this file

SYSTEM = "You are the team's assistant. Answer plainly and briefly."
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
]
SERVER = SimulatorConfig(
    models=("m",), slots=2, tokens_per_second=100, cached_prompts=6, prefill_tokens_per_second=2000
)


async def until_healthy(client: httpx.AsyncClient) -> None:
    for _ in range(200):
        if all(b["health"] == "healthy" for b in (await client.get("/pool/status")).json()["backends"]):
            return
        await asyncio.sleep(0.05)
    raise SystemExit("the pool's backends did not become healthy")


Figures = tuple[float, float, dict[str, int]]  # cached share, wall seconds, x-session-affinity counts


async def run(redis_url: str, *, pools: int, route: str, seed: int = 5, **settings: object) -> Figures:
    redis.Redis.from_url(redis_url).flushall()
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(running(SimulatedBackend(SERVER))) for _ in range(2)]
        config = PoolConfig(
            backends=tuple(BackendConfig(url=url, name=f"s{i}") for i, url in enumerate(servers)),
            state=redis_url,
            health_interval=0.5,
            **settings,  # type: ignore[arg-type]
        )
        urls = [await stack.enter_async_context(running(create_standalone_app(config))) for _ in range(pools)]
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"{u}/v1", timeout=60, trust_env=False)
            )
            for u in urls
        ]
        for client in clients:
            await until_healthy(client)
        histories = [[{"role": "system", "content": SYSTEM}] for _ in range(8)]
        cached = total = 0
        placements: dict[str, int] = {}
        started = time.perf_counter()
        for turn in range(6):

            async def speak(number: int, turn: int = turn) -> None:
                nonlocal cached, total
                messages = histories[number]
                words = " ".join(rng.choices(WORDS, k=90))
                messages.append({"role": "user", "content": f"Conversation {number}, turn {turn}: {words}"})
                client = {
                    "random": rng.choice(clients),
                    "sticky": clients[number % len(clients)],
                    "one": clients[0],
                }[route]
                answer = await client.post(
                    "/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 32}
                )
                placement = answer.headers.get("x-session-affinity", "-")
                placements[placement] = placements.get(placement, 0) + 1
                reply = answer.json()
                messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
                if turn:
                    cached += reply["usage"]["prompt_tokens_details"]["cached_tokens"]
                    total += reply["usage"]["prompt_tokens"]

            await asyncio.gather(*(speak(n) for n in rng.sample(range(8), 8)))
        return cached / total, time.perf_counter() - started, placements


async def measure(redis_url: str) -> list[str]:
    before = {"cache_wait_max": 0, "prefix_min_tokens": 10**9}
    runs: dict[str, dict[str, object]] = {
        "one pool": {"pools": 1, "route": "one"},
        "one pool, as before": {"pools": 1, "route": "one", **before},
    }
    if "--quick" not in sys.argv:
        runs["two pools, sticky"] = {"pools": 2, "route": "sticky"}
        runs["two pools, random"] = {"pools": 2, "route": "random"}
        runs["two pools, random, before"] = {"pools": 2, "route": "random", **before}
    lines = ["8 conversations x 6 turns on 2 x 2 simulated slots, over HTTP, state in Redis; 3 seeds"]
    for name, settings in runs.items():
        figures = [await run(redis_url, seed=seed, **settings) for seed in (5, 6, 7)]  # type: ignore[arg-type]
        shares = ", ".join(f"{share:.2f}" for share, _, _ in figures)
        seconds = ", ".join(f"{wall:.1f}" for _, wall, _ in figures)
        placed: dict[str, int] = {}
        for _, _, counts in figures:
            for reason, count in counts.items():
                placed[reason] = placed.get(reason, 0) + count
        shown = " ".join(f"{reason} {count}" for reason, count in sorted(placed.items()))
        lines.append(f"  {name:<26} cached share {shares}; wall {seconds} s; {shown}")
    return lines


def main() -> None:
    with helpers.redis_server() as (redis_url, _):
        lines = asyncio.run(measure(redis_url))
    for line in lines:
        print(line)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "cache_fleet.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
