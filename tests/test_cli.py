from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_inference_pool.cli import main


def test_config_prints_the_effective_settings_with_secrets_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.toml"
    path.write_text('[pool]\napi_keys = ["sk-in"]\n[[backends]]\nurl = "http://h:1/v1"\napi_key = "sk-out"\n')
    monkeypatch.setenv("LIP_QUEUE_LIMIT", "9")
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["queue_limit"] == 9
    assert data["backends"][0]["url"] == "http://h:1"
    assert "sk-in" not in out
    assert "sk-out" not in out
    assert data["api_keys"] == ["***"]


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
