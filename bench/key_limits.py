"""What a key's limits cost per request, and how exactly ``rpm`` holds across processes.

Run: ``.venv/bin/python bench/key_limits.py`` (about 1 minute; needs ``redis-server`` and ``wrk``
from Debian). Everything is on 127.0.0.1: a redis-server of its own (persistence off), the fake
backend (``fake_backend.py``, answering at once with usage), ``serve`` processes, wrk.

1. The cost of the limit check: added p50 at concurrency 1 over direct access (wrk ``-c1
   --latency``, 5 s each, all in one run) for a key without limits and a key with ``rpm`` and
   ``tpm`` (never reached), in one process and with ``state``; and Redis scripts per request from
   Redis's own counts (``INFO commandstats``). Goal: a key without limits adds no round trip; a key
   with limits adds one on the request's path (and, with ``tpm`` or a budget, one after its answer).
2. Exactness: three ``serve`` processes on one store, a key with ``rpm = 1000``, and a wrk
   (``-c16``) per process for 5 s, so the key offers far more than 1,000 requests a minute.
   Admitted requests (answered 200) against the limit: goal exactly 1,000.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from shared_state import evalsha_calls, free_port, p50_ms, process, redis_server, wrk

HERE = Path(__file__).parent
KEY = "sk-bench-key"
SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{{"model": "bench", "max_tokens": 8, "messages": [{{"role": "user", "content": "hi"}}]}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {KEY}"
"""
SERVE = [sys.executable, "-m", "local_inference_pool.cli", "serve", "--log-level", "error"]


def config(backend: str, limits: str, state: str | None = None, name: str = "bench") -> Path:
    path = Path(tempfile.mkdtemp()) / "pool.toml"
    pool = "[pool]\nhealth_interval = 5\n" + (f'state = "{state}"\n' if state else "")
    path.write_text(
        f'{pool}[[backends]]\nurl = "{backend}"\nslots = 64\n'
        f'[[keys]]\nname = "{name}"\nkey = "{KEY}"\n{limits}\n'
    )
    return path


def requests_of(output: str) -> tuple[int, int]:
    """(requests answered, of them not 2xx) from wrk's report."""
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return total, int(refused.group(1)) if refused else 0


def cost(backend: str, redis_url: str, redis_port: int, script: str) -> list[str]:
    chat = f"{backend}/v1/chat/completions"
    wrk(script, chat, 1, 1)
    direct = p50_ms(wrk(script, chat, 1, 5, latency=True))
    lines = [f"direct p50 at c=1: {direct:.3f} ms"]
    variants = (
        ("in process, no limits", "", None),
        ("in process, rpm + tpm", "rpm = 100000000\ntpm = 1000000000", None),
        ("state, no limits", "", redis_url),
        ("state, rpm", "rpm = 100000000", redis_url),
        ("state, rpm + tpm", "rpm = 100000000\ntpm = 1000000000", redis_url),
    )
    for name, limits, state in variants:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        path = config(backend, limits, state)
        with process([*SERVE, "--port", str(port)], None, LIP_CONFIG=str(path)):
            ready(url)
            wrk(script, f"{url}/chat/completions", 1, 2)
            before = evalsha_calls(redis_port)
            output = wrk(script, f"{url}/chat/completions", 1, 5, latency=True)
            scripts = (evalsha_calls(redis_port) - before) / requests_of(output)[0]
        lines.append(
            f"{name:24} added p50 {p50_ms(output) - direct:.3f} ms; Redis scripts per request {scripts:.2f}"
        )
    return lines


def ready(url: str) -> None:
    """Until the pool lists the model to the key (it needs the key, so ``process`` cannot wait)."""
    import time

    import httpx

    for _ in range(400):
        try:
            answer = httpx.get(f"{url}/models", headers={"authorization": f"Bearer {KEY}"}, trust_env=False)
            if answer.json().get("data"):
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} listed no model in time")


def exactness(backend: str, redis_url: str, script: str) -> list[str]:
    path = config(backend, "rpm = 1000", redis_url, name="exact")  # a window of its own
    ports = [free_port() for _ in range(3)]
    with ExitStack() as stack:
        for port in ports:
            stack.enter_context(process([*SERVE, "--port", str(port)], None, LIP_CONFIG=str(path)))
        for port in ports:
            ready(f"http://127.0.0.1:{port}/v1")
        runs = [
            subprocess.Popen(
                ["wrk", "-t1", "-c16", "-d5s", "-s", script, f"http://127.0.0.1:{port}/v1/chat/completions"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for port in ports
        ]
        outputs = [run.communicate()[0] for run in runs]
    counts = [requests_of(output) for output in outputs]
    total = sum(answered for answered, _ in counts)
    admitted = sum(answered - refused for answered, refused in counts)
    return [
        f"3 processes, one key, rpm = 1000: {total:,} requests in 5 s ({total / 5:,.0f}/s offered), "
        f"{admitted:,} admitted ({', '.join(str(a - r) for a, r in counts)} per process); "
        f"{'exact' if admitted == 1000 else 'NOT exact'}"
    ]


def main() -> None:
    script = Path(tempfile.mkdtemp()) / "chat.lua"
    script.write_text(SCRIPT)
    backend_port = free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    with (
        redis_server() as (redis_url, redis_port),
        process(
            [sys.executable, str(HERE / "fake_backend.py"), "--port", str(backend_port)],
            f"{backend}/v1/models",
        ),
    ):
        lines = cost(backend, redis_url, redis_port, str(script))
        lines += exactness(backend, redis_url, str(script))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
