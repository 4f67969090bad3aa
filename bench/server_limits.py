"""What serve's request-head limits cost: the pool under uvicorn's httptools protocol, plain and bounded.

Run: ``.venv/bin/python bench/server_limits.py`` (about 1 minute; needs wrk: ``apt-get install wrk``).
The fake backend (``fake_backend.py``) and the pool each run in their own process on 127.0.0.1; wrk
(``-t1 -c32``) posts a small chat body for 5 s after a 2 s warm-up. The two protocols alternate,
``ROUNDS`` times each, so drift of the machine falls on both. Prints req/s per run and the means.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
ROUNDS = 3
BACKEND_PORT, POOL_PORT = 18941, 18942
SERVE = f"""
import sys, uvicorn
from local_inference_pool import BackendConfig, PoolConfig, create_standalone_app
from local_inference_pool.gateway.server_limits import bounded_protocol
config = PoolConfig(backends=(BackendConfig(url="http://127.0.0.1:{BACKEND_PORT}", name="fake",
                    kind="openai", slots=256, models=("m",)),))
http = bounded_protocol(config) if sys.argv[1] == "bounded" else "httptools"
uvicorn.run(create_standalone_app(config), port={POOL_PORT}, log_level="error", loop="asyncio", http=http)
"""
POST = """
wrk.method = "POST"
wrk.body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
wrk.headers["Content-Type"] = "application/json"
"""


def wait_for(url: str) -> None:
    for _ in range(100):
        try:
            httpx.get(url, trust_env=False, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(script: str, seconds: int) -> float:
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c32",
            f"-d{seconds}s",
            "-s",
            script,
            f"http://127.0.0.1:{POOL_PORT}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    assert found is not None, done.stdout
    return float(found.group(1))


def main() -> None:
    backend = subprocess.Popen(
        [sys.executable, str(HERE / "fake_backend.py"), "--port", str(BACKEND_PORT)],
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, list[float]] = {"plain": [], "bounded": []}
    try:
        wait_for(f"http://127.0.0.1:{BACKEND_PORT}/v1/models")
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
            script.write(POST)
            script.flush()
            for _ in range(ROUNDS):
                for variant in results:
                    pool = subprocess.Popen([sys.executable, "-c", SERVE, variant])
                    try:
                        wait_for(f"http://127.0.0.1:{POOL_PORT}/v1/models")
                        wrk(script.name, 2)  # warm-up
                        results[variant].append(wrk(script.name, 5))
                        print(f"{variant:8} {results[variant][-1]:8.0f} req/s", flush=True)
                    finally:
                        pool.terminate()
                        pool.wait(timeout=10)
    finally:
        backend.terminate()
        backend.wait(timeout=10)
    plain, bounded = (sum(v) / len(v) for v in results.values())
    print(f"means: plain {plain:.0f} req/s, bounded {bounded:.0f} req/s ({bounded / plain:.3f}x)")


if __name__ == "__main__":
    main()
