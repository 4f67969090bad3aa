"""A/B of the chat hot path: ``serve`` from several source trees against the same fake backends, alternating.

Run: ``.venv/bin/python bench/hot_path_ab.py [--state] [--rounds 3] [LABEL=]SRC ...`` where each SRC
is a ``src`` directory (``git worktree add /tmp/before <commit>`` gives ``/tmp/before/src``); this
checkout's own ``src`` is added last as ``now`` unless it is named. Each round measures direct access
to the fake first, then each tree in turn, so that every tree shares the machine's state of that
round. Per tree and round:

- the p50 latency at c=1 (wrk), and the p50 that the gateway adds over direct access in that round;
- req/s at c=32, and the gateway's CPU time (user + system, from ``/proc``) per request at c=32;
- req/s at c=32 against a second fake that takes 20 ms per answer, as a ratio to direct access.

``--state`` serves every tree twice a round, in one process and with ``[pool] state`` on a
``redis-server`` of its own (as ``LABEL+state``, with what state adds to the p50 over the same tree
in one process in that round; the trees must know the key). ``--floors`` measures the stack under
``serve`` with no pool in it too (``stack_floor.py``: uvicorn alone, and a bare aiohttp proxy).
Needs ``wrk``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import shared_state as b  # noqa: E402 - the bench helpers beside this file

CLK_TCK = os.sysconf("SC_CLK_TCK")
SECONDS = 4


def cpu_seconds(pid: int) -> float:
    """User and system time of a process and its threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@contextmanager
def running(command: list[str], ready: Callable[[], bool], **env: str) -> Iterator[int]:
    """A process, once ``ready`` says so (asked every 50 ms, 20 s at most); its pid."""
    child = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        for _ in range(400):
            if ready():
                break
            time.sleep(0.05)
        yield child.pid
    finally:
        child.terminate()
        child.wait(timeout=20)


def serving(src: str, config: Path, port: int) -> AbstractContextManager[int]:
    """``serve`` from a source tree, up and routing to both fakes; its pid."""
    command = [sys.executable, "-m", "local_inference_pool.cli", "serve", "--log-level", "warning"]

    def routing() -> bool:
        return {"bench", "slow"} <= b.wait_for(f"http://127.0.0.1:{port}/v1/models")

    return running([*command, "--port", str(port)], routing, LIP_CONFIG=str(config), PYTHONPATH=src)


def floor_serving(port: int, upstream: str | None) -> AbstractContextManager[int]:
    """``stack_floor.py`` (uvicorn alone, or with ``upstream`` a bare aiohttp proxy), listening; its pid."""
    command = [sys.executable, str(HERE / "stack_floor.py"), str(port)]

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    return running([*command, *(["--proxy", upstream] if upstream else [])], listening)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="*", help="[LABEL=]SRC, a src directory")
    parser.add_argument(
        "--state", action="store_true", help="each tree with [pool] state on a redis-server too"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--floors", action="store_true", help="also uvicorn alone and a bare aiohttp proxy (stack_floor.py)"
    )
    args = parser.parse_args()
    trees: dict[str, str] = {}
    for given in args.trees:
        label, _, src = given.rpartition("=")
        trees[label or src] = src
    if str(HERE.parent / "src") not in trees.values():
        trees["now"] = str(HERE.parent / "src")

    workdir = Path(tempfile.mkdtemp())
    script = workdir / "post.lua"
    script.write_text(b.POST)
    fast, slow = b.free_port(), b.free_port()
    fake = [sys.executable, str(HERE / "fake_backend.py")]
    setups = [(label, src, "") for label, src in trees.items()]
    results: dict[str, list[dict[str, float]]] = {"direct": []}
    with ExitStack() as stack:
        stack.enter_context(b.process([*fake, "--port", str(fast)], f"http://127.0.0.1:{fast}/v1/models"))
        stack.enter_context(
            b.process(
                [*fake, "--port", str(slow), "--answer-ms", "20", "--model", "slow"],
                f"http://127.0.0.1:{slow}/v1/models",
            )
        )
        if args.state:
            redis_url, _port = stack.enter_context(b.redis_server())
            state = f'state = "{redis_url}"\n'
            setups = [
                setup
                for label, src, _ in setups
                for setup in ((label, src, ""), (f"{label}+state", src, state))
            ]
        results.update({label: [] for label, _, _ in setups})
        floors = {"uvicorn alone": None, "bare aiohttp proxy": f"http://127.0.0.1:{fast}/v1/chat/completions"}
        if args.floors:
            results.update({label: [] for label in floors})
        for _round in range(args.rounds):
            direct = measure_direct(str(script), fast, slow)
            results["direct"].append(direct)
            for label, src, state in setups:
                port = b.free_port()
                config = workdir / f"{label}.toml"
                config.write_text(
                    f"[pool]\nhealth_interval = 5\n{state}\n"
                    f'[[backends]]\nurl = "http://127.0.0.1:{fast}"\nslots = 64\n\n'
                    f'[[backends]]\nurl = "http://127.0.0.1:{slow}"\nslots = 64\n'
                )
                with serving(src, config, port) as pid:
                    figures = measure_pool(str(script), port, pid)
                figures["added"] = figures["p50"] - direct["p50"]
                figures["slow_ratio"] = figures["rps_slow"] / direct["rps_slow"]
                if state:
                    figures["over_one_process"] = (
                        figures["p50"] - results[label.removesuffix("+state")][-1]["p50"]
                    )
                results[label].append(figures)
            for label, upstream in floors.items() if args.floors else ():
                port = b.free_port()
                with floor_serving(port, upstream) as pid:
                    figures = measure_pool(str(script), port, pid, slow=False)
                figures["added"] = figures["p50"] - direct["p50"]
                results[label].append(figures)
    report(results, args.state)


SLOW_POST = b.POST.replace('"model": "bench"', '"model": "slow"')


def measure_direct(script: str, fast: int, slow: int) -> dict[str, float]:
    chat = f"http://127.0.0.1:{fast}/v1/chat/completions"
    b.wrk(script, chat, 32, 1)
    figures = {"p50": b.p50_ms(b.wrk(script, chat, 1, SECONDS, latency=True))}
    figures["rps"] = b.rps(b.wrk(script, chat, 32, SECONDS))
    slow_chat = f"http://127.0.0.1:{slow}/v1/chat/completions"
    figures["rps_slow"] = b.rps(b.wrk(script, slow_chat, 32, SECONDS))
    return figures


def measure_pool(script: str, port: int, pid: int, *, slow: bool = True) -> dict[str, float]:
    chat = f"http://127.0.0.1:{port}/v1/chat/completions"
    b.wrk(script, chat, 32, 1)
    figures = {"p50": b.p50_ms(b.wrk(script, chat, 1, SECONDS, latency=True))}
    before, started = cpu_seconds(pid), time.monotonic()
    figures["rps"] = b.rps(b.wrk(script, chat, 32, SECONDS))
    requests = figures["rps"] * (time.monotonic() - started)
    figures["cpu_us"] = (cpu_seconds(pid) - before) / requests * 1e6
    if slow:
        slow_script = Path(script).with_name("slow.lua")
        slow_script.write_text(SLOW_POST)
        figures["rps_slow"] = b.rps(b.wrk(str(slow_script), chat, 32, SECONDS))
    return figures


def report(results: dict[str, list[dict[str, float]]], state: bool) -> None:
    def shown(values: list[float], digits: int) -> str:
        return ", ".join(f"{v:.{digits}f}" if digits else f"{v:,.0f}" for v in values)

    print(f"hot path A/B{' with state' if state else ''}: each figure per round, then the median")
    for label, rounds in results.items():
        print(f"{label}:")
        columns = [("p50", "p50 at c=1 (ms)", 3), ("rps", "req/s at c=32", 0)]
        if label != "direct":
            columns[1:1] = [("added", "added p50 at c=1 (ms)", 3)]
            columns += [
                ("cpu_us", "CPU per request at c=32 (us)", 0),
                ("slow_ratio", "c=32 vs direct, 20 ms backend", 3),
            ]
            if label.endswith("+state"):
                columns += [("over_one_process", "p50 at c=1 over one process (ms)", 3)]
        else:
            columns += [("rps_slow", "req/s at c=32, 20 ms backend", 0)]
        for key, name, digits in columns:
            values = [r[key] for r in rounds if key in r]
            if not values:
                continue
            median = statistics.median(values)
            print(f"  {name}: {shown(values, digits)} (median {shown([median], digits)})")


if __name__ == "__main__":
    main()
