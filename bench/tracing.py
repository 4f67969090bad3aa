"""What OpenTelemetry traces cost the gateway: requests/s at concurrency 32 with traces off, on
with a sampler of 0, and on with every request exported, in one run.

Run: ``.venv/bin/python bench/tracing.py`` (about 1 minute; needs ``wrk``). Everything is on
127.0.0.1: the fake backend (``fake_backend.py``), an OTLP/HTTP receiver that takes the spans and
answers at once (``--receiver``, this script in another process), ``serve``, and wrk. The variants
alternate over ``ROUNDS`` rounds of 5 s each, so a slow moment of the machine falls on all of them.
Goal: off costs nothing measurable (its figure is the baseline); all-on costs under 10% of req/s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from shared_state import POST, free_port, process, rps, wrk

HERE = Path(__file__).parent
ROUNDS = 3
SERVE = [sys.executable, "-m", "local_inference_pool.cli", "serve", "--log-level", "error"]


def receiver(port: int) -> None:
    """An OTLP/HTTP receiver that reads each export and answers 200 at once."""
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        headers = [(b"content-type", b"application/x-protobuf")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


def main() -> None:
    if "--receiver" in sys.argv:
        receiver(int(sys.argv[-1]))
        return
    script = Path(tempfile.mkdtemp()) / "chat.lua"
    script.write_text(POST)
    backend_port, receiver_port = free_port(), free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    endpoint = f"http://127.0.0.1:{receiver_port}/v1/traces"
    variants = {
        "traces off": "",
        "on, sampler 0": f'[telemetry]\ntraces = true\nsample_ratio = 0.0\notlp_endpoint = "{endpoint}"\n',
        "on, sampler 0.1": f'[telemetry]\ntraces = true\nsample_ratio = 0.1\notlp_endpoint = "{endpoint}"\n',
        "on, every request exported": f'[telemetry]\ntraces = true\notlp_endpoint = "{endpoint}"\n',
    }
    figures: dict[str, list[float]] = {name: [] for name in variants}
    with (
        process(
            [sys.executable, str(HERE / "fake_backend.py"), "--port", str(backend_port)],
            f"{backend}/v1/models",
        ),
        process([sys.executable, __file__, "--receiver", str(receiver_port)]),
    ):
        for _ in range(ROUNDS):
            for name, telemetry in variants.items():
                config = Path(tempfile.mkdtemp()) / "pool.toml"
                config.write_text(
                    f'[pool]\nhealth_interval = 5\n[[backends]]\nurl = "{backend}"\nslots = 64\n{telemetry}'
                )
                port = free_port()
                url = f"http://127.0.0.1:{port}/v1"
                with process([*SERVE, "--port", str(port)], f"{url}/models", LIP_CONFIG=str(config)):
                    wrk(str(script), f"{url}/chat/completions", 32, 2)
                    figures[name].append(rps(wrk(str(script), f"{url}/chat/completions", 32, 5)))
    base = statistics.median(figures["traces off"])
    for name, values in figures.items():
        median = statistics.median(values)
        shown = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:28} {median:8,.0f} req/s at c=32 ({median / base:.2f}x of off; rounds: {shown})")


if __name__ == "__main__":
    main()
