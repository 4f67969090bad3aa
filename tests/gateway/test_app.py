"""Routes, auth, limits and error mapping, through LifespanManager + httpx.ASGITransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from local_inference_pool.gateway.app import create_pool_app

from ..fakes import FakeBackend, Fleet, plain_answer

pytestmark = pytest.mark.anyio

CHAT = {
    "model": "m",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
}


@asynccontextmanager
async def client_for(fleet: Fleet, **pool: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_pool_app(fleet.config(**pool), transport=fleet.transport)
    async with client_of(app, **pool) as client:
        yield client


@asynccontextmanager
async def client_of(
    app: ASGIApp, *, raise_app_exceptions: bool = True, **pool: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a running ``app``, once its first backend is healthy."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://pool") as client:
            with anyio.fail_after(5):  # the first probes run at start-up
                while (await client.get("/pool/status", headers=_auth(pool))).json()["backends"][0][
                    "health"
                ] != "healthy":
                    await anyio.sleep(0.01)
            yield client


async def post_chat(client: httpx.AsyncClient) -> None:
    await client.post("/chat/completions", json=CHAT)


def _auth(pool: dict[str, Any]) -> dict[str, str]:
    keys = pool.get("api_keys")
    return {"authorization": f"Bearer {keys[0]}"} if keys else {}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    return dict(error)


async def test_chat_is_forwarded_byte_for_byte_with_the_backend_key_not_the_clients() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet) as client:
        raw = json.dumps(CHAT).encode() + b"   "
        response = await client.post(
            "/chat/completions",
            content=raw,
            headers={"authorization": "Bearer client-secret", "x-request-id": "r1"},
        )
    assert response.status_code == 200
    assert response.json()["served_by"] == "a"
    (upstream,) = fleet.backends["a"].requests
    assert upstream.url.path == "/v1/chat/completions"
    assert upstream.headers["authorization"] == "Bearer key-a"
    assert upstream.headers["accept-encoding"] == "identity"
    assert upstream.headers["x-request-id"] == "r1"
    assert fleet.backends["a"].bodies == [raw]
    assert response.headers["x-backend"] == "a:8080"
    assert float(response.headers["x-queue-wait-ms"]) >= 0
    assert response.headers["x-session-affinity"] == "miss"


@pytest.mark.parametrize(
    ("path", "upstream"), [("/completions", "/v1/completions"), ("/embeddings", "/v1/embeddings")]
)
async def test_other_routes_map_to_their_backend_paths(path: str, upstream: str) -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet) as client:
        response = await client.post(path, json={"model": "m", "input": "x", "prompt": "x"})
    assert response.status_code == 200
    assert fleet.backends["a"].requests[0].url.path == upstream


async def test_models_lists_the_union_with_backends_and_status_shows_the_pool() -> None:
    fleet = Fleet(a=FakeBackend(models=("m", "x")), b=FakeBackend(models=("m",)))
    async with client_for(fleet) as client:
        models = (await client.get("/models")).json()
        status = (await client.get("/pool/status")).json()
    assert models["object"] == "list"
    assert {(m["id"], tuple(m["backends"])) for m in models["data"]} == {
        ("m", ("a:8080", "b:8080")),
        ("x", ("a:8080",)),
    }
    assert {b["name"]: b["slots"] for b in status["backends"]} == {"a:8080": 2, "b:8080": 2}
    assert status["queue"]["waiting"] == 0
    assert status["active_leases"] == 0


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_body"),
        (b'{"messages": []}', {}, 400, "invalid_model"),
        (b'{"model": 7}', {}, 400, "invalid_model"),
        (b'{"model": "m"}', {"x-priority": "high"}, 400, "invalid_priority"),
        (b'{"model": "nope"}', {}, 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_errors(
    content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", content=content, headers=headers)
    assert_openai_error(response, status, code)
    assert fleet.backends["a"].requests == []


async def test_body_over_the_limit_is_refused_whether_declared_or_streamed() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, max_body_size=64) as client:
        declared = await client.post("/chat/completions", content=b"x" * 65)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 16

        streamed = await client.post("/chat/completions", content=chunks())
    assert_openai_error(declared, 413, "body_too_large")
    assert_openai_error(streamed, 413, "body_too_large")


async def test_unknown_route_and_wrong_method_are_openai_errors() -> None:
    async with client_for(Fleet(a=FakeBackend())) as client:
        assert_openai_error(await client.get("/nope"), 404, "not_found")
        assert_openai_error(await client.get("/chat/completions"), 405, "method_not_allowed")


async def test_api_keys_guard_every_route_and_status_unless_public() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, api_keys=("sk-1", "sk-2")) as client:
        assert_openai_error(await client.post("/chat/completions", json=CHAT), 401, "invalid_api_key")
        wrong = await client.post("/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-3"})
        assert_openai_error(wrong, 401, "invalid_api_key")
        assert_openai_error(await client.get("/models"), 401, "invalid_api_key")
        assert_openai_error(await client.get("/pool/status"), 401, "invalid_api_key")
        ok = await client.post("/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-2"})
        assert ok.status_code == 200
    assert fleet.backends["a"].requests[0].headers["authorization"] == "Bearer key-a"
    async with client_for(fleet, api_keys=("sk-1",), public_status=True) as client:
        assert (await client.get("/pool/status")).status_code == 200


async def test_backend_error_status_and_body_pass_through() -> None:
    fleet = Fleet(a=FakeBackend(mode="status", status=400, body={"error": {"message": "context too long"}}))
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "context too long"}}
    assert status["active_leases"] == 0


async def test_refused_connection_is_retried_on_another_backend() -> None:
    fleet = Fleet(a=FakeBackend(), b=FakeBackend())
    async with client_for(fleet) as client:
        fleet.backends["a"].mode = "refuse"  # after the probes: it dies between two polls
        response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    assert response.status_code == 200
    assert response.headers["x-backend"] == "b:8080"
    assert {b["name"]: b["health"] for b in status["backends"]}["a:8080"] == "unhealthy"
    assert status["active_leases"] == 0


async def test_every_backend_refusing_is_502_naming_them() -> None:
    fleet = Fleet(a=FakeBackend(), b=FakeBackend())
    async with client_for(fleet) as client:
        for backend in fleet.backends.values():
            backend.mode = "refuse"
        response = await client.post("/chat/completions", json=CHAT)
        again = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    error = assert_openai_error(response, 502, "upstream_unreachable")
    assert "a:8080" in error["message"]
    assert "b:8080" in error["message"]
    assert_openai_error(again, 503, "no_backend_available")  # both known down now: at once
    assert again.headers["retry-after"]
    assert status["active_leases"] == 0


async def test_timeout_before_headers_is_504() -> None:
    fleet = Fleet(a=FakeBackend(mode="timeout"))
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    assert_openai_error(response, 504, "upstream_timeout")
    assert status["active_leases"] == 0
    assert status["backends"][0]["health"] == "healthy"  # one slow answer does not mark it dead


async def post_behind_a_hanging_request(**pool: Any) -> httpx.Response:
    """Occupy the only slot with a request that never ends, then send another."""
    fleet = Fleet(a=FakeBackend(mode="hang", slots=1))
    async with client_for(fleet, **pool) as client, anyio.create_task_group() as group:
        group.start_soon(post_chat, client)
        with anyio.fail_after(5):
            while (await client.get("/pool/status")).json()["active_leases"] < 1:
                await anyio.sleep(0.01)
        response = await client.post("/chat/completions", json=CHAT)
        group.cancel_scope.cancel()
    return response


async def test_queue_full_is_429_with_retry_after() -> None:
    response = await post_behind_a_hanging_request(queue_limit=0)
    assert_openai_error(response, 429, "queue_full")
    assert response.headers["retry-after"]


async def test_queue_timeout_is_503_naming_the_model() -> None:
    response = await post_behind_a_hanging_request(queue_timeout=0.1)
    error = assert_openai_error(response, 503, "queue_timeout")
    assert "'m'" in error["message"]


async def test_session_affinity_by_header_user_and_conversation_prefix() -> None:
    fleet = Fleet(a=FakeBackend(), b=FakeBackend())
    async with client_for(fleet) as client:
        first = await client.post("/chat/completions", json=CHAT, headers={"x-session-id": "s1"})
        again = await client.post("/chat/completions", json=CHAT, headers={"x-session-id": "s1"})
        user = [await client.post("/chat/completions", json={**CHAT, "user": "u1"}) for _ in range(2)]
        later_turn = {
            **CHAT,
            "messages": [
                *CHAT["messages"],
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"},
            ],
        }
        prefix = [await client.post("/chat/completions", json=body) for body in (CHAT, later_turn)]
    assert (first.headers["x-session-affinity"], again.headers["x-session-affinity"]) == ("miss", "hit")
    assert again.headers["x-backend"] == first.headers["x-backend"]
    assert [r.headers["x-session-affinity"] for r in user] == ["miss", "hit"]
    assert [r.headers["x-session-affinity"] for r in prefix] == ["miss", "hit"]


async def test_without_the_lifespan_routes_say_how_to_wire_it() -> None:
    app = create_pool_app(Fleet(a=FakeBackend()).config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pool") as client:
        response = await client.post("/chat/completions", json=CHAT)
    error = assert_openai_error(response, 503, "pool_not_started")
    assert "pool_lifespan" in error["message"]
    assert "PoolMiddleware" in error["message"]


async def test_shutdown_fails_queued_requests_with_503() -> None:
    fleet = Fleet(a=FakeBackend(mode="hang", slots=1))
    app = create_pool_app(fleet.config(shutdown_grace=0.1), transport=fleet.transport)
    responses: list[httpx.Response] = []
    manager = LifespanManager(app)
    await manager.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://pool")
    async with anyio.create_task_group() as group:

        async def post() -> None:
            responses.append(await client.post("/chat/completions", json=CHAT))

        with anyio.fail_after(5):
            while (await client.get("/pool/status")).json()["backends"][0]["health"] != "healthy":
                await anyio.sleep(0.01)
        group.start_soon(post)  # takes the only slot and hangs
        with anyio.fail_after(5):
            while (await client.get("/pool/status")).json()["active_leases"] < 1:
                await anyio.sleep(0.01)
        group.start_soon(post)  # queued
        with anyio.fail_after(5):
            while (await client.get("/pool/status")).json()["queue"]["waiting"] < 1:
                await anyio.sleep(0.01)
        await manager.__aexit__(None, None, None)
        group.cancel_scope.cancel()
    await client.aclose()
    assert [r.status_code for r in responses] == [503]
    assert_openai_error(responses[0], 503, "pool_closed")


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_backend_answering_gateway_errors_is_taken_out_by_its_circuit(status: int) -> None:
    fleet = Fleet(a=FakeBackend(), b=FakeBackend())
    async with client_for(fleet, circuit_failures=2) as client:
        fleet.backends["a"].mode, fleet.backends["a"].status = "status", status  # probes stay good
        served = []
        for _ in range(8):
            response = await client.post("/chat/completions", json=CHAT, headers={"x-session-id": "pin"})
            served.append((response.headers.get("x-backend"), response.status_code))
        state = {b["name"]: b for b in (await client.get("/pool/status")).json()["backends"]}
    failures_from_a = [s for s in served if s == ("a:8080", status)]
    assert 1 <= len(failures_from_a) <= 2  # passed through to the client, then no more traffic there
    assert served[-3:] == [("b:8080", 200)] * 3
    assert state["a:8080"]["circuit"] == "open"
    assert state["a:8080"]["health"] == "unhealthy"


async def test_a_client_whose_own_request_makes_a_backend_answer_500_opens_no_circuit() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, circuit_failures=2) as client:
        fleet.backends["a"].mode = "status"  # as llama.cpp answers a body it cannot handle
        poisoned = [
            (await client.post("/chat/completions", json={**CHAT, "max_tokens": 1e300})).status_code
            for _ in range(5)
        ]
        fleet.backends["a"].mode = "ok"
        other = await client.post("/chat/completions", json=CHAT)
        state = (await client.get("/pool/status")).json()["backends"][0]
    assert poisoned == [500] * 5  # passed through to the client that sent it
    assert other.status_code == 200  # and nobody else is locked out
    assert state["circuit"] == "closed"


async def test_dashboard_page_and_browser_auth() -> None:
    import base64

    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, api_keys=("sk-1",)) as client:
        denied = await client.get("/pool/")
        basic = base64.b64encode(b"anyone:sk-1").decode()
        page = await client.get("/pool/dashboard", headers={"authorization": f"Basic {basic}"})
        metrics = await client.get("/pool/metrics", headers={"authorization": f"Basic {basic}"})
        wrong = base64.b64encode(b"anyone:sk-2").decode()
        refused = await client.get("/pool/", headers={"authorization": f"Basic {wrong}"})
        api_with_basic = await client.post(
            "/chat/completions", json=CHAT, headers={"authorization": f"Basic {basic}"}
        )
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"].startswith("Basic")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>local-inference-pool</title>" in page.text
    assert 'src="http' not in page.text  # self-contained: no CDN, the machine may be offline
    assert 'href="http' not in page.text
    assert metrics.status_code == 200
    assert refused.status_code == 401
    assert api_with_basic.status_code == 401  # the API itself takes Bearer keys only


async def test_an_unexpected_error_after_the_acquire_still_returns_the_slot() -> None:
    fleet = Fleet(a=FakeBackend(slots=1))

    def broken_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                raise ValueError("a transport bug")
            return await fleet.handle(request)

        return httpx.MockTransport(handle)

    app = create_pool_app(fleet.config(), transport=broken_transport)
    async with client_of(app, raise_app_exceptions=False) as client:
        for _ in range(3):  # with one slot, a leak would make the second request hang
            response = await client.post("/chat/completions", json=CHAT)
            assert_openai_error(response, 500, "internal_error")
        assert (await client.get("/pool/status")).json()["active_leases"] == 0


async def test_backend_dying_midway_through_a_small_answer_is_a_clean_502() -> None:
    fleet = Fleet(a=FakeBackend(mode="broken_json"))
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    error = assert_openai_error(response, 502, "upstream_failed")
    assert "a:8080" in error["message"]
    assert status["active_leases"] == 0
    assert status["backends"][0]["consecutive_failures"] == 1


async def test_a_small_answer_that_breaks_off_is_asked_once_more_elsewhere() -> None:
    fleet = Fleet(a=FakeBackend(mode="broken_json"), b=FakeBackend())
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    assert response.status_code == 200
    assert response.headers["x-backend"] == "b:8080"
    assert status["active_leases"] == 0


async def test_a_small_answer_that_breaks_off_twice_goes_to_no_third_backend() -> None:
    fleet = Fleet(a=FakeBackend(mode="broken_json"), b=FakeBackend(mode="broken_json"), c=FakeBackend())
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", json=CHAT)
    assert_openai_error(response, 502, "upstream_failed")
    assert not fleet.backends["c"].requests  # a request that breaks backends does not walk the fleet


async def test_a_failure_while_handing_the_lease_to_the_response_still_returns_it() -> None:
    fleet = Fleet(a=FakeBackend(slots=1))
    app = create_pool_app(fleet.config(), transport=fleet.transport)
    async with client_of(app, raise_app_exceptions=False) as client:

        def broken(name: str) -> None:
            raise RuntimeError("a bookkeeping bug")

        app.state.runtime.monitor.succeeded = broken
        for _ in range(2):  # with one slot, a leak would make the second request hang
            assert_openai_error(await client.post("/chat/completions", json=CHAT), 500, "internal_error")
        assert (await client.get("/pool/status")).json()["active_leases"] == 0


@pytest.mark.parametrize("size", [10_000, 3 * 1024 * 1024], ids=["small", "over-1MiB"])
async def test_an_answer_without_a_declared_length_arrives_whole(size: int) -> None:
    """Read whole and sent with its length when small; relayed as it comes when larger."""
    fleet = Fleet(a=FakeBackend(plain_size=size))
    async with client_for(fleet) as client:
        response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
    assert response.status_code == 200
    assert response.content == plain_answer(size)
    if size <= 1 << 20:
        assert response.headers["content-length"] == str(size)
        assert status["traffic"]["completion_tokens"] == 7  # usage is read from answers up to 1 MiB
    assert status["active_leases"] == 0


async def test_a_half_open_backend_whose_trial_is_answered_500_is_back_in_full() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, circuit_failures=2, circuit_cooldown=0.05, health_interval=0.05) as client:
        fleet.backends["a"].mode, fleet.backends["a"].status = "status", 503
        for _ in range(2):
            await client.post("/chat/completions", json=CHAT)
        assert (await client.get("/pool/status")).json()["backends"][0]["circuit"] == "open"
        fleet.backends["a"].status = 500  # up and answering: a 500 is this request's own trouble
        with anyio.fail_after(5):
            while (await client.post("/chat/completions", json=CHAT)).status_code != 500:
                await anyio.sleep(0.02)  # the cooldown passes, the trial goes through
        backend = (await client.get("/pool/status")).json()["backends"][0]
    assert (backend["circuit"], backend["health"]) == ("closed", "healthy")


async def test_without_the_shared_state_store_requests_get_503_state_unavailable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = sock.getsockname()[1]  # closed again: connections there are refused
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, state=f"redis://:secret@127.0.0.1:{nobody}/0") as client:
        with anyio.fail_after(10):  # within a few seconds, never a hang
            response = await client.post("/chat/completions", json=CHAT)
        status = (await client.get("/pool/status")).json()
        metrics = (await client.get("/pool/metrics")).text
    assert_openai_error(response, 503, "state_unavailable")
    assert "secret" not in response.text
    assert status["shared_state"]["reachable"] is False
    assert "secret" not in str(status)
    assert status["active_leases"] == 0  # the slot taken for the claim was given back
    assert "lip_state_reachable 0.0" in metrics


# --- named keys (tenants) -----------------------------------------------------------------------


def team_keys(**team_a: Any) -> tuple[Any, ...]:
    from local_inference_pool.config import KeyConfig

    return (
        KeyConfig(name="team-a", key="sk-team-a-secret", **team_a),
        KeyConfig(name="team-b", key="sk-team-b-secret"),
    )


async def test_named_keys_are_counted_by_name_and_never_shown() -> None:
    fleet = Fleet(a=FakeBackend())
    async with client_for(fleet, keys=team_keys(weight=2.0), public_status=True) as client:
        for key in ("sk-team-a-secret", "sk-team-a-secret", "sk-team-b-secret"):
            answer = await client.post(
                "/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
            )
            assert answer.status_code == 200
        refused = await client.post(
            "/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-other"}
        )
        status = (await client.get("/pool/status")).json()
        metrics = (await client.get("/pool/metrics")).text
    assert_openai_error(refused, 401, "invalid_api_key")
    assert status["tenants"]["team-a"]["granted"] == 2
    assert status["tenants"]["team-a"]["weight"] == 2.0
    assert status["tenants"]["team-b"]["granted"] == 1
    assert 'lip_key_requests_total{key="team-a",outcome="ok"} 2.0' in metrics
    assert "secret" not in json.dumps(status)
    assert "secret" not in metrics


async def test_a_keys_own_queue_limit_is_429_in_the_routes_dialect() -> None:
    fleet = Fleet(a=FakeBackend(mode="hang", slots=1))
    headers = {"authorization": "Bearer sk-team-a-secret"}
    async with (
        client_for(fleet, keys=team_keys(max_queued=0), public_status=True) as client,
        anyio.create_task_group() as group,
    ):
        group.start_soon(partial(client.post, "/chat/completions", json=CHAT, headers=headers))
        with anyio.fail_after(5):
            while (await client.get("/pool/status")).json()["active_leases"] < 1:
                await anyio.sleep(0.01)
        chat = await client.post("/chat/completions", json=CHAT, headers=headers)
        messages = await client.post(
            "/messages",
            json={"model": "m", "max_tokens": 1, "messages": []},
            headers={"x-api-key": "sk-team-a-secret"},
        )
        group.cancel_scope.cancel()
    assert_openai_error(chat, 429, "key_queue_full")
    assert chat.headers["retry-after"] == "1"
    assert messages.status_code == 429
    assert messages.json()["error"]["type"] == "rate_limit_error"
