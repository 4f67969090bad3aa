"""`local-inference-pool serve` as a user runs it: a separate process, stopped with SIGINT."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from local_inference_pool.gateway.serving import running
from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

from ..terminal import terminal

pytestmark = pytest.mark.anyio


def serve_command(config: Path, port: int, *extra: str) -> list[str]:
    """``local-inference-pool serve`` on ``config`` and ``port``, logging warnings only."""
    return [
        sys.executable,
        "-m",
        "local_inference_pool.cli",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_answers_at_v1_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=1000))
    async with running(backend) as backend_url:
        config = tmp_path / "pool.toml"
        config.write_text(
            f'[pool]\nhealth_interval = 0.2\n\n[[backends]]\nurl = "{backend_url}"\nname = "sim0"\n'
        )
        port = free_port()
        async with await anyio.open_process(serve_command(config, port)) as process:
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10
                ) as client:
                    with anyio.fail_after(20):
                        while True:
                            try:
                                if (await client.get("/v1/models")).json().get("data"):
                                    break
                            except httpx.TransportError:
                                pass
                            await anyio.sleep(0.05)
                    reply = await client.post(
                        "/v1/chat/completions", json={"model": "sim", "messages": [], "max_tokens": 2}
                    )
                assert reply.status_code == 200
                assert reply.headers["x-backend"] == "sim0"
            finally:
                process.send_signal(signal.SIGINT)
                with anyio.fail_after(15):
                    code = await process.wait()
    assert code == 0


@pytest.mark.parametrize("signals", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
async def test_serve_stops_quietly_on_ctrl_c_to_its_process_group(tmp_path: Path, signals: int) -> None:
    """As a user runs it in a terminal, a stream in flight: one line, never a traceback; the stream
    finishes within the grace, or a second Ctrl-C stops at once."""
    backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=2, tokens_per_second=20))
    async with running(backend) as backend_url:
        config = tmp_path / "pool.toml"
        config.write_text(
            f'[pool]\nshutdown_grace = 10\n\n[[backends]]\nurl = "{backend_url}"\nname = "sim0"\n'
        )
        port = free_port()
        command = [sys.executable, "-m", "local_inference_pool.cli", "serve", "--config", str(config)]
        with terminal([*command, "--port", str(port)]) as session:
            assert await anyio.to_thread.run_sync(session.read_until, b"Uvicorn running", 20)
            body = {
                "model": "sim",
                "stream": True,
                "max_tokens": 40,
                "messages": [{"role": "user", "content": "hi"}],
            }
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as stream,
            ):
                chunks = stream.aiter_bytes()
                await anext(chunks)  # the stream is running
                for _ in range(signals):
                    session.ctrl_c()
                    assert await anyio.to_thread.run_sync(session.read_until, b"SIGINT", 10)
                received = b""
                with contextlib.suppress(httpx.TransportError):
                    async for chunk in chunks:
                        received += chunk
            await anyio.to_thread.run_sync(session.read_to_end, 20)
            code = session.process.wait(timeout=20)
    text = session.text
    assert "Traceback" not in text, text
    assert f"SIGINT: stopping the pool on 127.0.0.1:{port}; 1 request still running" in text
    if signals == 1:
        assert code == 0
        assert received.rstrip().endswith(b"data: [DONE]")  # finished within the grace
    else:
        assert code == 130
        assert "SIGINT again: stopped at once, 1 request cut off" in text
