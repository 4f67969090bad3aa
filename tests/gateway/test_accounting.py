"""Keys at the door and at the end, through the app: refusals in each route's dialect, the
rate-limit headers, token reservations settled from usage, budgets, and the usage report."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

import anyio
import pytest

from local_inference_pool.config import KeyConfig

from ..fakes import FakeBackend, Fleet
from ..redis_store import Store
from .test_app import CHAT, assert_openai_error, client_for

pytestmark = pytest.mark.anyio

TEAM = {"authorization": "Bearer sk-team-secret"}
OTHER = {"authorization": "Bearer sk-other-secret"}
ADMIN = {"authorization": "Bearer sk-admin-secret"}


def keys(**team: Any) -> dict[str, Any]:
    return {
        "keys": (
            KeyConfig(name="team", key="sk-team-secret", **team),
            KeyConfig(name="other", key="sk-other-secret"),
        ),
        "admin_keys": ("sk-admin-secret",),
        "public_status": True,
    }


async def test_rpm_refuses_with_429_and_every_answer_carries_the_standing() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, **keys(rpm=2)) as client:
        answers = [await client.post("/chat/completions", json=CHAT, headers=TEAM) for _ in range(3)]
        unlimited = await client.post("/chat/completions", json=CHAT, headers=OTHER)
        messages = await client.post(
            "/messages",
            json={"model": "m", "max_tokens": 5, "messages": []},
            headers={"x-api-key": "sk-team-secret"},
        )
    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:2]] == ["1", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
    error = assert_openai_error(answers[2], 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert 58 <= int(answers[2].headers["retry-after"]) <= 60
    assert int(answers[2].headers["retry-after-ms"]) > 57_000
    assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert unlimited.status_code == 200
    assert "x-ratelimit-limit-requests" not in unlimited.headers
    assert messages.status_code == 429
    assert messages.json()["error"]["type"] == "rate_limit_error"
    assert messages.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert messages.headers["anthropic-ratelimit-requests-reset"].endswith("Z")


async def test_the_backends_own_rate_limit_headers_give_way_to_the_keys() -> None:
    fleet = Fleet(a=FakeBackend(headers={"x-ratelimit-limit-requests": "9999"}))
    async with client_for(fleet, **keys(rpm=5)) as client:
        answer = await client.post("/chat/completions", json=CHAT, headers=TEAM)
    assert answer.headers.get_list("x-ratelimit-limit-requests") == ["5"]


async def test_tpm_reserves_an_estimate_and_settles_on_the_usage_reported() -> None:
    fleet = Fleet(a=FakeBackend(usage={"prompt_tokens": 10, "completion_tokens": 5}))
    body = {**CHAT, "max_tokens": 300}
    async with client_for(fleet, **keys(tpm=400)) as client:
        first = await client.post("/chat/completions", json=body, headers=TEAM)
        # It reserved about 300 + its body's size / 4; it used 15: the window holds 15 now.
        second = await client.post("/chat/completions", json=body, headers=TEAM)
        too_large = await client.post("/chat/completions", json={**CHAT, "max_tokens": 1000}, headers=TEAM)
    assert first.status_code == 200
    assert second.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 400 - 15 - int(
        400 - int(first.headers["x-ratelimit-remaining-tokens"])
    )
    error = assert_openai_error(too_large, 429, "rate_limit_exceeded")
    assert error["type"] == "tokens"
    assert "max_tokens" in error["message"]
    assert "retry-after" not in too_large.headers  # waiting would never help


async def test_a_budget_crossed_mid_stream_lets_it_finish_and_refuses_the_next() -> None:
    fleet = Fleet(a=FakeBackend(usage={"prompt_tokens": 40, "completion_tokens": 80}, chunks=5))
    async with client_for(fleet, **keys(max_tokens=100, budget_period="day")) as client:
        async with client.stream(
            "POST", "/chat/completions", json={**CHAT, "stream": True}, headers=TEAM
        ) as stream:
            assert stream.headers["x-budget-remaining-tokens"] == "100"
            text = "".join([part async for part in stream.aiter_text()])
        refused = await client.post("/chat/completions", json=CHAT, headers=TEAM)
    assert text.endswith("data: [DONE]\n\n")
    error = assert_openai_error(refused, 429, "budget_exceeded")
    assert error["type"] == "insufficient_quota"
    assert refused.headers["x-budget-remaining-tokens"] == "0"
    assert int(refused.headers["retry-after"]) <= 86_400


@pytest.mark.parametrize(
    ("team", "status", "code"),
    [
        ({"expires": dt.date(2020, 1, 1)}, 401, "key_expired"),
        ({"disabled": True}, 401, "key_disabled"),
        ({"models": ["other-*"]}, 403, "model_not_allowed"),
    ],
)
async def test_a_key_that_may_not_is_refused_before_the_queue(
    team: dict[str, Any], status: int, code: str
) -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, **keys(**team)) as client:
        refused = await client.post("/chat/completions", json=CHAT, headers=TEAM)
        unknown = await client.post("/chat/completions", json={**CHAT, "model": "nope"}, headers=TEAM)
    assert_openai_error(refused, status, code)
    assert_openai_error(unknown, status, code)  # whether the model exists is not said either
    assert "sk-team" not in refused.text
    assert fleet.backends["a"].requests == []


async def test_models_lists_only_what_the_key_may_use() -> None:
    fleet = Fleet(a=FakeBackend(models=("qwen-7b", "llama-8b")))
    async with client_for(fleet, **keys(models=["qwen-*"])) as client:
        mine = (await client.get("/models", headers=TEAM)).json()["data"]
        theirs = (await client.get("/models", headers=OTHER)).json()["data"]
        allowed = await client.post("/chat/completions", json={**CHAT, "model": "qwen-7b"}, headers=TEAM)
    assert [m["id"] for m in mine] == ["qwen-7b"]
    assert [m["id"] for m in theirs] == ["llama-8b", "qwen-7b"]
    assert allowed.status_code == 200


async def test_usage_by_key_and_model_in_json_csv_and_metrics() -> None:
    fleet = Fleet(
        a=FakeBackend(
            usage={"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}
        )
    )
    async with client_for(fleet, **keys()) as client:
        for headers in (TEAM, TEAM, OTHER):
            assert (await client.post("/chat/completions", json=CHAT, headers=headers)).status_code == 200
        report = (await client.get("/pool/usage", headers=ADMIN)).json()
        by_time = (await client.get("/pool/usage?window=15m&group=key,time", headers=ADMIN)).json()
        table = (await client.get("/pool/usage?format=csv&group=key&key=team", headers=ADMIN)).text
        user = await client.get("/pool/usage", headers=TEAM)
        bad = await client.get("/pool/usage?window=99y", headers=ADMIN)
        metrics = (await client.get("/pool/metrics")).text
    rows = {row["key"]: row for row in report["data"]}
    assert rows["team"] == {
        "key": "team",
        "model": "m",
        "requests": 2,
        "input_tokens": 24,
        "cached_tokens": 16,
        "output_tokens": 6,
        "total_tokens": 30,
    }
    assert rows["other"]["requests"] == 1
    assert by_time["bucket"] == "minute"
    assert all(row["time"].endswith("Z") for row in by_time["data"])
    parsed = list(csv.DictReader(io.StringIO(table)))
    assert parsed == [
        {
            "key": "team",
            "requests": "2",
            "input_tokens": "24",
            "cached_tokens": "16",
            "output_tokens": "6",
            "total_tokens": "30",
        }
    ]
    assert user.status_code == 403
    assert_openai_error(bad, 400, "invalid_window")
    assert 'lip_key_tokens_total{key="team",kind="input",model="m"} 24.0' in metrics
    assert 'lip_key_tokens_total{key="team",kind="cached",model="m"} 16.0' in metrics


async def test_keys_added_changed_rotated_and_removed_at_runtime() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, **keys()) as client:
        made = await client.post("/pool/admin/keys", json={"name": "ci", "rpm": 1}, headers=ADMIN)
        secret = made.json()["key"]
        bearer = {"authorization": f"Bearer {secret}"}
        first = await client.post("/chat/completions", json=CHAT, headers=bearer)
        second = await client.post("/chat/completions", json=CHAT, headers=bearer)
        raised = await client.patch("/pool/admin/keys/ci", json={"rpm": 5}, headers=ADMIN)
        third = await client.post("/chat/completions", json=CHAT, headers=bearer)
        rotated = (await client.post("/pool/admin/keys/ci/rotate", headers=ADMIN)).json()
        old = await client.post("/chat/completions", json=CHAT, headers=bearer)
        new = await client.post(
            "/chat/completions", json=CHAT, headers={"authorization": f"Bearer {rotated['key']}"}
        )
        disabled = await client.patch("/pool/admin/keys/team", json={"disabled": True}, headers=ADMIN)
        team = await client.post("/chat/completions", json=CHAT, headers=TEAM)
        listed = (await client.get("/pool/admin/keys", headers=ADMIN)).json()["data"]
        duplicate = await client.post("/pool/admin/keys", json={"name": "ci"}, headers=ADMIN)
        bad = await client.patch("/pool/admin/keys/ci", json={"rpm": -1}, headers=ADMIN)
        removed = await client.delete("/pool/admin/keys/ci", headers=ADMIN)
        gone = await client.post(
            "/chat/completions", json=CHAT, headers={"authorization": f"Bearer {rotated['key']}"}
        )
        status = await client.get("/pool/status")
    assert made.status_code == 201
    assert secret.startswith("sk-lip-")
    assert (first.status_code, second.status_code) == (200, 429)
    assert raised.json()["rpm"] == 5
    assert third.status_code == 200
    assert rotated["key"] != secret
    assert old.status_code == 401
    assert new.status_code == 200
    assert disabled.json()["disabled"] is True
    assert_openai_error(team, 401, "key_disabled")
    assert {k["name"]: k["source"] for k in listed} == {"team": "config", "other": "config", "ci": "admin"}
    assert all("key" not in k and "key_sha256" not in k for k in listed)
    assert_openai_error(duplicate, 409, "key_exists")
    assert_openai_error(bad, 400, "invalid_key")
    assert removed.json() == {"name": "ci", "removed": True}
    assert gone.status_code == 401
    shown = json.dumps(listed) + status.text
    assert secret not in shown
    assert rotated["key"] not in shown


async def test_a_keys_settling_is_waited_for_by_its_next_request(store: Store) -> None:
    """With ``state`` a request is settled in Redis after its answer; the key's next requests wait
    for that, so they cannot slip past the budget it crossed."""
    fleet = Fleet(a=FakeBackend(usage={"prompt_tokens": 60, "completion_tokens": 60}))
    async with client_for(fleet, state=store.url, **keys(max_tokens=100)) as client:
        results: list[int] = []

        async def one() -> None:
            results.append((await client.post("/chat/completions", json=CHAT, headers=TEAM)).status_code)

        await one()
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(one)
    assert results[0] == 200
    assert sorted(results[1:]) == [429, 429, 429]
