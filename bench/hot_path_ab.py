"""A/B of the chat hot path: ``serve`` from two source trees against one fake backend, alternating.

Run: ``.venv/bin/python bench/hot_path_ab.py BEFORE_SRC [AFTER_SRC]`` where each is a ``src`` directory
(``git worktree add /tmp/before <commit>`` gives ``/tmp/before/src``); the default after is this
checkout. Three alternating rounds of wrk at c=1 (p50) and c=32 (req/s), so both sides share the
machine's state; needs ``wrk``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import shared_state as b  # noqa: E402 - the bench helpers beside this file

POST = b.POST


def main() -> None:
    workdir = Path(tempfile.mkdtemp())
    script = workdir / "post.lua"
    script.write_text(b.POST)
    port = b.free_port()
    backend = f"http://127.0.0.1:{port}"
    config = workdir / "pool.toml"
    config.write_text(f'[pool]\nhealth_interval = 5\n\n[[backends]]\nurl = "{backend}"\nslots = 64\n')
    serve = [sys.executable, "-m", "local_inference_pool.cli", "serve", "--log-level", "warning"]
    trees = {"before": sys.argv[1], "after": sys.argv[2] if len(sys.argv) > 2 else str(HERE.parent / "src")}
    results: dict[str, dict[str, list[float]]] = {k: {"p50": [], "rps": []} for k in trees}
    fake = [sys.executable, str(HERE / "fake_backend.py"), "--port", str(port)]
    with b.process(fake, f"{backend}/v1/models"):
        for _round in range(3):
            for name, src in trees.items():
                p = b.free_port()
                url = f"http://127.0.0.1:{p}/v1"
                chat = f"{url}/chat/completions"
                with b.process(
                    [*serve, "--port", str(p)], f"{url}/models", LIP_CONFIG=str(config), PYTHONPATH=src
                ):
                    b.wrk(str(script), chat, 32, 1)
                    results[name]["p50"].append(b.p50_ms(b.wrk(str(script), chat, 1, 4, latency=True)))
                    results[name]["rps"].append(b.rps(b.wrk(str(script), chat, 32, 4)))
    for name, r in results.items():
        print(
            f"{name}: p50 at c=1 (ms) {[round(x, 3) for x in r['p50']]}, req/s at c=32 {[round(x) for x in r['rps']]}"
        )


if __name__ == "__main__":
    main()
