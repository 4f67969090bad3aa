from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from local_inference_pool import BackendConfig, PoolConfig
from local_inference_pool.cli import main

from .terminal import terminal


def test_config_prints_the_effective_settings_with_secrets_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.toml"
    path.write_text(
        '[pool]\napi_keys = ["sk-in"]\n[[backends]]\nurl = "http://h:1/v1"\napi_key = "sk-out"\n'
        '[[keys]]\nname = "team"\nkey = "sk-team"\n[[keys]]\nname = "env"\nkey_env = "LIP_TEST_TEAM_KEY"\n'
    )
    monkeypatch.setenv("LIP_QUEUE_LIMIT", "9")
    monkeypatch.setenv("LIP_TEST_TEAM_KEY", "sk-from-env")
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["queue_limit"] == 9
    assert data["backends"][0]["url"] == "http://h:1"
    assert "sk-in" not in out
    assert "sk-out" not in out
    assert "sk-team" not in out
    assert "sk-from-env" not in out
    assert data["api_keys"] == ["***"]
    assert [k["name"] for k in data["keys"]] == ["team", "env"]


def test_invalid_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pool.toml"
    path.write_text("[[backends]]\nurl = 'http://h:1'\nslots = 0\n")
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "backends[0].slots: 0 is not allowed" in err


def test_console_script_entry_point_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "local_inference_pool.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert "config" in done.stdout


def test_serve_without_backends_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LIP_CONFIG", raising=False)
    monkeypatch.delenv("LIP_BACKENDS", raising=False)
    assert main(["serve"]) == 2
    assert "no backends" in capsys.readouterr().err


def test_check_prints_each_backend_and_exits_by_reachability(tmp_path: Path) -> None:
    import anyio
    from rich.console import Console

    from local_inference_pool.cli import check
    from local_inference_pool.gateway.serving import running
    from local_inference_pool.sim.simulator import SimulatedBackend, SimulatorConfig

    async def scenario() -> tuple[int, int, str]:
        backend = SimulatedBackend(SimulatorConfig(models=("sim",), slots=3))
        async with running(backend) as url:
            console = Console(record=True, width=200)
            closed = "http://127.0.0.1:9"  # discard port: nothing listens
            mixed = PoolConfig(
                backends=(BackendConfig(url=url, name="sim0"), BackendConfig(url=closed, name="gone"))
            )
            good = await check(mixed, console)
            dead = await check(PoolConfig(backends=(BackendConfig(url=closed, name="gone"),)), console)
            return good, dead, console.export_text()

    good, dead, text = anyio.run(scenario)
    assert (good, dead) == (0, 1)
    assert "sim0" in text
    assert "llamacpp" in text
    assert "3 (detected)" in text
    assert "1 of 2 backends reachable" in text
    assert "no backend is reachable" in text


def test_demo_runs_and_stops_by_itself() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "local_inference_pool.cli",
            "demo",
            "--port",
            "0",
            "--duration",
            "15",
            "--requests",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "/v1/pool/" in done.stdout
    assert "/v1/pool/metrics" in done.stdout
    assert "demo stopped: 24 requests done, 0 still running" in done.stdout


@pytest.mark.parametrize("signals", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
def test_demo_stops_quietly_on_ctrl_c_to_its_process_group(signals: int) -> None:
    """Under a pseudo-terminal, as a user runs it: SIGINT to the whole group, as a terminal sends."""
    command = [sys.executable, "-m", "local_inference_pool.cli", "demo", "--port", "0", "--requests", "400"]
    with terminal(command) as session:
        assert session.read_until(b"requests", 60)  # the workload is running
        for _ in range(signals):
            session.ctrl_c()
            session.read_until(b"SIGINT", 10)
        session.read_to_end(30)
        assert session.process.wait(timeout=30) in ((0,) if signals == 1 else (0, 130))
    assert "Traceback" not in session.text, session.text
    assert "SIGINT: stopping" in session.text
    if signals == 1:
        assert "demo stopped by SIGINT:" in session.text
        assert "still running" in session.text


def test_simulate_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--slots", "0"]) == 2
    assert "--slots >= 1" in capsys.readouterr().err


def test_every_command_has_complete_help() -> None:
    for command in ("serve", "check", "config", "simulate", "demo"):
        done = subprocess.run(
            [sys.executable, "-m", "local_inference_pool.cli", command, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0
        assert "usage: local-inference-pool" in done.stdout
        assert len(done.stdout.splitlines()) > 4


def test_serve_with_several_workers_and_no_shared_state_is_refused_with_what_to_set(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIP_BACKENDS", "http://127.0.0.1:9")
    monkeypatch.delenv("LIP_STATE", raising=False)
    assert main(["serve", "--workers", "2"]) == 2
    error = capsys.readouterr().err
    assert "oversubscribe" in error
    assert "pool.state" in error
    assert "LIP_STATE" in error
