"""PoolApp: the route table's plain paths served by one lookup, as Starlette's own stack serves them."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from local_inference_pool.gateway.plain_routes import PoolApp, route_path

pytestmark = pytest.mark.anyio


class Refused(Exception):
    pass


class Endpoint:
    """Answers with what it saw of the scope; or raises, before or after answering."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if self.fail == "refused":
            raise Refused("no")
        if self.fail == "before":
            raise RuntimeError("broken")
        await PlainTextResponse("ok")(scope, receive, send)
        if self.fail == "after":
            raise RuntimeError("broken after the answer")


async def refused(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=429)


async def unexpected(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "internal"}, status_code=500)


def app_with(endpoint: Endpoint) -> PoolApp:
    app = PoolApp(
        routes=[Route("/chat", endpoint, methods=["POST"])],
        exception_handlers={Refused: refused, Exception: unexpected},
    )
    app.plain_routes = {("POST", "/chat"): endpoint}
    return app


def client(app: object, base: str = "http://pool") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=base)


async def test_a_plain_route_gets_the_scope_starlettes_router_gives() -> None:
    endpoint = Endpoint()
    app = app_with(endpoint)
    async with client(app) as http:
        assert (await http.post("/chat")).text == "ok"
    scope = endpoint.scopes[0]
    assert scope["app"] is app
    assert scope["router"] is app.router
    assert scope["path_params"] == {}


async def test_mounted_the_path_below_the_mount_is_looked_up() -> None:
    endpoint = Endpoint()
    host = PoolApp(routes=[Mount("/v1", app_with(endpoint))])
    async with client(host) as http:
        assert (await http.post("/v1/chat")).text == "ok"
        assert (await http.post("/v1/chatter")).status_code == 404
    assert len(endpoint.scopes) == 1


async def test_another_method_goes_through_starlette() -> None:
    endpoint = Endpoint()
    async with client(app_with(endpoint)) as http:
        assert (await http.get("/chat")).status_code == 405
    assert endpoint.scopes == []


async def test_an_exception_is_answered_by_the_apps_handler_for_it() -> None:
    async with client(app_with(Endpoint("refused"))) as http:
        response = await http.post("/chat")
    assert (response.status_code, response.json()) == (429, {"error": "no"})


async def test_an_unexpected_exception_is_a_500_and_raised_on() -> None:
    app = app_with(Endpoint("before"))
    async with client(app) as http:
        response = await http.post("/chat")
    assert (response.status_code, response.json()) == (500, {"error": "internal"})
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://pool") as http:
        with pytest.raises(RuntimeError, match="broken"):
            await http.post("/chat")


async def test_an_exception_after_the_answer_started_sends_no_second_answer() -> None:
    async with client(app_with(Endpoint("after"))) as http:
        response = await http.post("/chat")
    assert (response.status_code, response.text) == (200, "ok")


paths = st.text(alphabet="/ab", max_size=8).map(lambda text: "/" + text)


@given(path=paths, root=st.sampled_from(["", "/a", "/a/", "/ab", "/b"]))
def test_route_path_reads_the_path_as_starlettes_router_does(path: str, root: str) -> None:
    scope = {"type": "http", "path": root.rstrip("/") + path if root else path, "root_path": root}
    assert route_path(scope) == get_route_path(scope)
    scope["path"] = path
    assert route_path(scope) == get_route_path(scope)
