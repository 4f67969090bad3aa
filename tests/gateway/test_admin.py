"""The admin API and the fleet's runtime changes: keys, adding, changing, draining, removing and
registering backends, and reloading the config file, on the app with fake backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from local_inference_pool.config import ConfigSource
from local_inference_pool.gateway.app import create_pool_app

from ..fakes import FakeBackend, Fleet
from .test_app import client_of

pytestmark = pytest.mark.anyio

ADMIN = {"authorization": "Bearer admin-secret"}
USER = {"authorization": "Bearer user-key"}
STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def admin_client(
    fleet: Fleet, source: ConfigSource | None = None, **pool: Any
) -> AsyncIterator[httpx.AsyncClient]:
    pool.setdefault("admin_keys", ("admin-secret",))
    pool.setdefault("api_keys", ("user-key",))
    app = create_pool_app(fleet.config(**pool), transport=fleet.transport, source=source)
    async with client_of(app, **pool) as client:
        client.headers.update(USER)
        yield client


async def backends(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await client.get("/pool/admin/backends", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {b["name"]: b for b in answer.json()["data"]}


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Poll an async condition until it holds (bounded)."""
    with anyio.fail_after(seconds):
        while not await condition():
            await anyio.sleep(0.01)


async def test_the_admin_api_is_off_without_admin_keys() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet, admin_keys=()) as client:
        answer = await client.get("/pool/admin/backends", headers=ADMIN)
    assert answer.status_code == 404
    assert "admin_keys" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "invalid_admin_key"),
        ({"authorization": "Bearer admin-secreT"}, 401, "invalid_admin_key"),
        (USER, 403, "not_admin"),
        ({"authorization": "Basic " + "eDp1c2VyLWtleQ=="}, 403, "not_admin"),  # x:user-key
    ],
)
async def test_an_admin_call_needs_an_admin_key(headers: dict[str, str], status: int, code: str) -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        del client.headers["authorization"]
        answer = await client.post("/pool/admin/backends/a:8080/drain", headers=headers)
        assert (await backends(client))["a:8080"]["admin_state"] == "active"
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
    assert "admin-secret" not in answer.text


async def test_two_authorization_headers_are_refused_on_the_admin_api_too() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        answer = await client.get(
            "/pool/admin/backends", headers=[("authorization", "Bearer admin-secret")] * 2
        )
    assert answer.status_code == 400


async def test_an_added_backend_takes_requests_and_is_listed_with_its_state() -> None:
    fleet = Fleet(a=FakeBackend(slots=1))
    async with admin_client(fleet) as client:
        fleet.backends["b"] = FakeBackend(slots=1)
        added = await client.post(
            "/pool/admin/backends",
            headers=ADMIN,
            json={"url": "http://b:8080/v1", "name": "b", "api_key": "key-b"},
        )
        assert added.status_code == 201, added.text
        assert added.json()["source"] == "admin"
        assert "key-b" not in added.text

        async def healthy() -> bool:
            return bool((await backends(client))["b"]["health"] == "healthy")

        await until(healthy)
        listed = await backends(client)
        assert (listed["a:8080"]["source"], listed["a:8080"]["registered_until"]) == ("config", None)
        async with anyio.create_task_group() as group:
            fleet.backends["a"].mode = "hang"  # a is busy: the next request goes to b
            group.start_soon(partial(client.post, "/chat/completions", json={"model": "m", "messages": []}))

            async def a_busy() -> bool:
                return bool(fleet.backends["a"].requests)

            await until(a_busy)
            answer = await client.post("/chat/completions", json={"model": "m", "messages": []})
            group.cancel_scope.cancel()
    assert answer.json()["served_by"] == "b"
    assert fleet.backends["b"].requests[0].headers["authorization"] == "Bearer key-b"


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"url": "http://c:8080", "slots": -1}, "backend.slots"),
        ({"url": "ftp://c"}, "backend.url"),
        ({"url": "http://c:8080", "sluts": 2}, "sluts"),
        ({"name": "c"}, "backend.url"),
        ({"url": "http://c:8080", "ttl": 0}, "ttl"),
        ([1, 2], "JSON object"),
    ],
)
async def test_an_invalid_backend_is_400_naming_the_field(entry: Any, named: str) -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        answer = await client.post("/pool/admin/backends", headers=ADMIN, json=entry)
        assert list(await backends(client)) == ["a:8080"]
    assert answer.status_code == 400
    assert named in answer.json()["error"]["message"]


async def test_a_url_with_a_password_is_refused_and_never_echoed() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        answer = await client.post(
            "/pool/admin/backends", headers=ADMIN, json={"url": "http://user:hunter2@c:8080"}
        )
    assert answer.status_code == 400
    assert "hunter2" not in answer.text
    assert "password" in answer.json()["error"]["message"]


async def test_a_registration_reusing_a_configured_url_is_refused() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        answer = await client.post(
            "/pool/admin/backends",
            headers=ADMIN,
            json={"url": "http://a:8080/v1/", "name": "other", "ttl": 30},
        )
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "backend_configured"


async def test_a_body_that_is_not_json_or_too_large_is_refused() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        broken = await client.post("/pool/admin/backends", headers=ADMIN, content=b"{not json")
        large = await client.post("/pool/admin/backends", headers=ADMIN, content=b" " * 70_000)
    assert (broken.status_code, large.status_code) == (400, 413)


async def test_patch_changes_slots_and_weight_and_refuses_what_it_may_not_change() -> None:
    fleet = Fleet(a=FakeBackend(slots=2))
    async with admin_client(fleet) as client:
        patched = await client.patch(
            "/pool/admin/backends/a:8080", headers=ADMIN, json={"slots": 5, "weight": 2.5}
        )
        assert patched.status_code == 200, patched.text
        assert (patched.json()["slots"], patched.json()["weight"]) == (5, 2.5)
        status = (await client.get("/pool/status")).json()["backends"][0]
        assert status["changed_at_runtime"] == ["slots", "weight"]
        moved = await client.patch("/pool/admin/backends/a:8080", headers=ADMIN, json={"url": "http://x:1"})
        missing = await client.patch("/pool/admin/backends/nope", headers=ADMIN, json={"slots": 1})
    assert moved.status_code == 400
    assert "may not be changed" in moved.json()["error"]["message"]
    assert missing.status_code == 404


async def test_a_drained_backend_finishes_its_stream_gets_no_new_request_and_returns_on_undrain() -> None:
    fleet = Fleet(a=FakeBackend(chunks=20, chunk_delay=0.02), b=FakeBackend())
    async with admin_client(fleet) as client:
        answers: list[httpx.Response] = []

        async def stream() -> None:
            answers.append(await client.post("/chat/completions", json=STREAM))

        async with anyio.create_task_group() as group:
            group.start_soon(stream)

            async def running() -> bool:
                return bool(fleet.backends["a"].requests)

            await until(running)  # the first request went to a (first of two idle backends)
            drained = await client.post("/pool/admin/backends/a:8080/drain", headers=ADMIN)
            assert drained.json()["admin_state"] == "draining"
            for _ in range(3):
                answer = await client.post("/chat/completions", json={"model": "m", "messages": []})
                assert answer.json()["served_by"] == "b"
        assert answers[0].status_code == 200
        assert answers[0].text.endswith("data: [DONE]\n\n")
        assert (await backends(client))["a:8080"]["admin_state"] == "drained"
        assert len(fleet.backends["a"].requests) == 1
        undrained = await client.post("/pool/admin/backends/a:8080/undrain", headers=ADMIN)
        assert undrained.json()["admin_state"] == "active"
        metrics = (await client.get("/pool/metrics")).text
    assert 'lip_backend_admin_state{backend="a:8080",state="active"} 1.0' in metrics


async def test_a_stream_still_running_at_the_drain_timeout_is_cut_and_the_slot_returned() -> None:
    fleet = Fleet(a=FakeBackend(chunks=1000, chunk_delay=0.02), b=FakeBackend())
    async with admin_client(fleet, drain_timeout=0.2, midstream_failovers=0) as client:
        async with anyio.create_task_group() as group:
            answers: list[httpx.Response] = []

            async def stream() -> None:
                answers.append(await client.post("/chat/completions", json=STREAM))

            group.start_soon(stream)

            async def running() -> bool:
                return bool(fleet.backends["a"].requests)

            await until(running)
            await client.post("/pool/admin/backends/a:8080/drain", headers=ADMIN)
        listed = await backends(client)
    assert answers[0].status_code == 200
    assert "drain_timeout" in answers[0].text.rsplit("data: ", 1)[-1]
    assert listed["a:8080"]["admin_state"] == "drained"
    assert fleet.backends["a"].closed == 1


async def test_a_request_still_waiting_for_its_answer_at_the_drain_timeout_goes_elsewhere() -> None:
    fleet = Fleet(a=FakeBackend(mode="hang"), b=FakeBackend())
    async with admin_client(fleet, drain_timeout=0.2) as client:
        with anyio.fail_after(5):  # without the cut, the request would wait for ever
            answers = await _answer_while_draining(client, fleet)
        listed = await backends(client)
    assert (answers[0].status_code, answers[0].json()["served_by"]) == (200, "b")
    assert fleet.backends["a"].abandoned == 1  # its wait was cut, so its connection closed
    assert listed["a:8080"]["admin_state"] == "drained"
    assert listed["a:8080"]["busy"] == 0


async def _answer_while_draining(client: httpx.AsyncClient, fleet: Fleet) -> list[httpx.Response]:
    """A chat request's answer, with backend a drained while it waits there."""
    answers: list[httpx.Response] = []
    async with anyio.create_task_group() as group:

        async def chat() -> None:
            answers.append(await client.post("/chat/completions", json={"model": "m", "messages": []}))

        group.start_soon(chat)

        async def waiting() -> bool:
            return bool(fleet.backends["a"].requests)

        await until(waiting)
        await client.post("/pool/admin/backends/a:8080/drain", headers=ADMIN)
    return answers


async def test_delete_drains_first_and_answers_once_the_backend_is_gone() -> None:
    fleet = Fleet(a=FakeBackend(chunks=10, chunk_delay=0.02), b=FakeBackend())
    async with admin_client(fleet) as client:
        async with anyio.create_task_group() as group:
            answers: list[httpx.Response] = []

            async def stream() -> None:
                answers.append(await client.post("/chat/completions", json=STREAM))

            group.start_soon(stream)

            async def running() -> bool:
                return bool(fleet.backends["a"].requests)

            await until(running)
            removed = await client.delete("/pool/admin/backends/a:8080", headers=ADMIN)
            assert answers  # it ended first
            assert answers[0].text.endswith("data: [DONE]\n\n")
        assert removed.json() == {"name": "a:8080", "removed": True}
        assert list(await backends(client)) == ["b:8080"]
        again = await client.delete("/pool/admin/backends/a:8080", headers=ADMIN)
    assert again.status_code == 404


async def test_a_registration_not_renewed_is_drained_and_removed() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        fleet.backends["c"] = FakeBackend()
        entry = {"url": "http://c:8080", "name": "c", "ttl": 1}
        first = await client.post("/pool/admin/backends", headers=ADMIN, json=entry)
        assert (first.status_code, first.json()["source"]) == (201, "registered")
        assert first.json()["registered_until"] is not None
        renewed = await client.post("/pool/admin/backends", headers=ADMIN, json=entry)
        assert renewed.status_code == 200  # a heartbeat: the same registration, renewed

        async def gone() -> bool:
            return "c" not in await backends(client)

        await until(gone)


async def test_reload_applies_the_file_keeps_runtime_changes_and_resets_them_when_asked(
    tmp_path: Path,
) -> None:
    fleet = Fleet(a=FakeBackend(), b=FakeBackend(), c=FakeBackend())
    path = tmp_path / "pool.toml"

    def write(*names: str, queue_limit: int = 100, extra: str = "") -> None:
        entries = "".join(f'[[backends]]\nurl = "http://{n}:8080"\nname = "{n}"\n' for n in names)
        path.write_text(
            f'[pool]\nadmin_keys = ["admin-secret"]\napi_keys = ["user-key"]\nhealth_interval = 60\n'
            f"queue_limit = {queue_limit}\n{extra}{entries}"
        )

    write("a", "b")
    source = ConfigSource(str(path))
    app = create_pool_app(source.load(), transport=fleet.transport, source=source)
    async with client_of(app, api_keys=("user-key",)) as client:
        client.headers.update(USER)
        await client.post("/pool/admin/backends/b/drain", headers=ADMIN)
        write("a", "b", "c", queue_limit=7)
        summary = await client.post("/pool/admin/reload", headers=ADMIN)
        assert summary.json()["added"] == ["c"]
        status = (await client.get("/pool/status")).json()
        assert status["queue"]["limit"] == 7
        assert {b["name"]: b["admin_state"] for b in status["backends"]}["b"] == "drained"  # kept
        path.write_text("[pool]\nqueue_limit = -1\n")
        refused = await client.post("/pool/admin/reload", headers=ADMIN)
        assert refused.status_code == 400
        assert "queue_limit" in refused.json()["error"]["message"]
        assert str(path) in refused.json()["error"]["message"]
        write("a", "b", extra='state = "redis://127.0.0.1:1/0"\n')
        warned = await client.post("/pool/admin/reload", headers=ADMIN)
        assert warned.json()["restart_needed"] == ["state"]
        assert warned.json()["removed"] == ["c"]
        write("a", "b")
        reset = await client.post("/pool/admin/reload?reset=true", headers=ADMIN)
        assert reset.json()["reset"] is True
        listed = await backends(client)
    assert {name: b["admin_state"] for name, b in listed.items()} == {"a": "active", "b": "active"}


async def test_reload_without_a_config_file_is_409() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        answer = await client.post("/pool/admin/reload", headers=ADMIN)
    assert answer.status_code == 409
    assert json.loads(answer.text)["error"]["code"] == "no_config_file"


async def test_an_admin_key_reads_the_status_and_is_told_it_is_one() -> None:
    fleet = Fleet(a=FakeBackend())
    async with admin_client(fleet) as client:
        as_admin = await client.get("/pool/status", headers=ADMIN)
        as_user = await client.get("/pool/status")
        asked = await client.get("/pool/dashboard?admin")
    assert (as_admin.status_code, as_admin.json()["admin"]) == (200, True)
    assert (as_user.status_code, as_user.json()["admin"]) == (200, False)
    assert asked.status_code == 401
    assert asked.headers["www-authenticate"].startswith("Basic")
