"""The JSON request log, the ring of recent requests, and captured bodies with secrets redacted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from local_inference_pool.config import KeyConfig
from local_inference_pool.errors import ConfigError
from local_inference_pool.gateway.request_log import REDACTED, redact_headers, redact_text
from local_inference_pool.telemetry_config import TelemetryConfig, telemetry_from_dict

from ..fakes import FakeBackend, Fleet
from .test_app import CHAT, assert_openai_error, client_for

pytestmark = pytest.mark.anyio

USER = {"authorization": "Bearer sk-user-secret-123"}
ADMIN = {"authorization": "Bearer sk-admin-secret-123"}


def pool(**telemetry: Any) -> dict[str, Any]:
    return {
        "keys": (KeyConfig(name="team", key="sk-user-secret-123"),),
        "admin_keys": ("sk-admin-secret-123",),
        "telemetry": TelemetryConfig(**telemetry),
        "public_status": True,
    }


async def test_every_request_is_one_json_line_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    fleet = Fleet(a=FakeBackend(usage={"prompt_tokens": 7, "completion_tokens": 3}))
    telemetry = {"request_log": str(path), "request_log_max_bytes": 2048, "request_log_backups": 2}
    async with client_for(fleet, **pool(**telemetry)) as client:
        for index in range(12):
            answer = await client.post(
                "/chat/completions", json=CHAT, headers={**USER, "x-request-id": f"req-{index}"}
            )
            assert answer.status_code == 200
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    last = lines[-1]
    assert last["request_id"] == "req-11"
    assert (last["route"], last["key"], last["model"], last["backend"]) == (
        "/chat/completions",
        "team",
        "m",
        "a:8080",
    )
    assert (last["status"], last["outcome"], last["prompt_tokens"], last["completion_tokens"]) == (
        200,
        "ok",
        7,
        3,
    )
    assert last["time"].endswith("Z")
    assert {"queue_wait_ms", "ttfb_ms", "duration_ms", "affinity", "retries"} <= set(last)
    assert path.with_name("requests.jsonl.1").exists()  # rotated at 2 KiB
    assert not path.with_name("requests.jsonl.3").exists()  # two backups kept
    assert "secret" not in path.read_text()


async def test_recent_requests_are_listed_newest_first_with_their_timings() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, **pool(recent_requests=3)) as client:
        for index in range(5):
            await client.post("/chat/completions", json=CHAT, headers={**USER, "x-request-id": f"r{index}"})
        refused = await client.post("/chat/completions", json={"model": 5}, headers=USER)
        listed = (await client.get("/pool/requests", headers=USER)).json()
        one = await client.get("/pool/requests/r4", headers=USER)
        gone = await client.get("/pool/requests/r0", headers=USER)
    assert refused.status_code == 400
    assert [entry["request_id"] for entry in listed["data"]][1:] == ["r4", "r3"]
    assert listed["data"][0]["outcome"] == "invalid_model"
    assert listed["capture"] is False
    assert one.json()["backend"] == "a:8080"
    assert "capture" not in one.json()
    assert_openai_error(gone, 404, "request_not_found")  # out of the ring of 3


async def test_captured_bodies_have_their_secrets_redacted_and_go_to_an_admin_only() -> None:
    fleet = Fleet(a=FakeBackend(chunks=2))
    body = {**CHAT, "stream": True, "api_key": "sk-in-the-body-0000", "metadata": {"password": "hunter2"}}
    async with client_for(fleet, **pool(capture=True, capture_max_requests=2)) as client:
        async with client.stream(
            "POST", "/chat/completions", json=body, headers={**USER, "x-request-id": "s1"}
        ) as stream:
            streamed = await stream.aread()
        for index in range(2):
            await client.post("/chat/completions", json=CHAT, headers={**USER, "x-request-id": f"p{index}"})
        await client.post("/chat/completions", json=body, headers={**USER, "x-request-id": "s2"})
        as_admin = (await client.get("/pool/requests/s2", headers=ADMIN)).json()
        as_user = (await client.get("/pool/requests/s2", headers=USER)).json()
        evicted = (await client.get("/pool/requests/s1", headers=ADMIN)).json()
        listed = (await client.get("/pool/requests", headers=USER)).json()
    captured = as_admin["capture"]
    assert captured["request_headers"]["authorization"] == REDACTED
    sent = json.loads(captured["request_body"])
    assert sent["api_key"] == REDACTED
    assert sent["metadata"]["password"] == REDACTED
    assert sent["messages"] == CHAT["messages"]
    assert "data: [DONE]" in captured["response_body"]
    assert captured["response_bytes"] == len(streamed)
    assert "capture" not in as_user  # other keys' prompts: an admin's to read
    assert "capture" not in evicted  # two requests' bodies are kept
    assert {e["request_id"]: e["captured"] for e in listed["data"]}["s2"] is True
    assert "sk-in-the-body" not in json.dumps(as_admin)
    assert "hunter2" not in json.dumps(as_admin)


def test_redaction_of_text_that_is_not_json_and_of_long_bodies() -> None:
    text = redact_text(b'data: {"x": 1}\n\nAuthorization: Bearer abc.def-123 and sk-abcdefghijkl', 1000)
    assert "abc.def-123" not in text
    assert "sk-abcdefghijkl" not in text
    assert text.count(REDACTED) == 2
    cut = redact_text(b'{"content": "' + b"x" * 500 + b'"}', 100)
    assert cut.startswith('{"content": "xxx')
    assert cut.endswith("more characters)")
    assert redact_headers([(b"X-Api-Key", b"k"), (b"Cookie", b"c"), (b"accept", b"*/*")]) == {
        "x-api-key": REDACTED,
        "cookie": REDACTED,
        "accept": "*/*",
    }


def test_telemetry_keys_are_checked_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"telemetry\.capture_max_bytes: -1 is not allowed"):
        telemetry_from_dict({"capture_max_bytes": -1})
    with pytest.raises(ConfigError, match="unknown key 'capture_bodies'"):
        telemetry_from_dict({"capture_bodies": True})
