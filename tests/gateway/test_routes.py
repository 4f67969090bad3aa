"""The route table and what the pool learns about backends' routes."""

from __future__ import annotations

import pytest

from local_inference_pool.config import PoolConfig
from local_inference_pool.errors import ConfigError
from local_inference_pool.gateway.dialects import ANTHROPIC
from local_inference_pool.gateway.routes import ROUTES, ModelFrom, RouteSupport, routes_for


def test_every_route_is_one_line_of_data() -> None:
    by_path = {route.path: route for route in ROUTES}
    assert by_path["/tokenize"].upstream == "/tokenize"  # llama-server's root, not /v1/tokenize
    assert not by_path["/tokenize"].slot
    assert not by_path["/messages/count_tokens"].slot
    assert by_path["/messages"].dialect is ANTHROPIC
    assert by_path["/responses/{response_id}"].model is ModelFrom.RESPONSE
    assert by_path["/audio/transcriptions"].model is ModelFrom.FORM
    assert by_path["/responses"].remembers_response
    assert not by_path["/chat/completions"].learns  # a 404 there is about the request
    assert by_path["/messages"].learns


def test_the_config_adds_routes_of_the_same_kinds() -> None:
    config = PoolConfig.from_dict(
        {
            "routes": [
                {"path": "/classify", "upstream": "/classify", "model": "optional", "slot": False},
                {"path": "/tokenize", "upstream": "/v1/tokenize"},  # a server that serves it there
            ]
        }
    )
    routes = {route.path: route for route in routes_for(config)}
    assert routes["/classify"].model is ModelFrom.OPTIONAL
    assert not routes["/classify"].slot
    assert routes["/tokenize"].upstream == "/v1/tokenize"
    assert len([r for r in routes_for(config) if r.path == "/tokenize"]) == 1


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"path": "classify", "upstream": "/classify"}, "path like"),
        ({"path": "/c/../x", "upstream": "/classify"}, None),
        ({"path": "/c", "upstream": "/c", "model": "header"}, "one of body, optional, form"),
        ({"path": "/c", "upstream": "/c", "dialect": "gemini"}, "one of openai"),
        ({"path": "/c", "upstream": "/c", "extra": 1}, "unknown key"),
    ],
)
def test_a_bad_route_in_the_config_says_what_is_wrong(entry: dict[str, object], says: str | None) -> None:
    with pytest.raises(ConfigError) as refused:
        PoolConfig.from_dict({"routes": [entry]})
    if says is not None:
        assert says in str(refused.value)


def test_a_lacking_route_is_remembered_for_a_while_then_tried_again() -> None:
    now = [0.0]
    support = RouteSupport(forget_after=300.0, clock=lambda: now[0])
    support.mark_lacking("gpu-1", "/v1/messages")
    assert support.lacks("gpu-1", "/v1/messages")
    assert not support.lacks("gpu-1", "/v1/responses")
    assert not support.lacks("gpu-2", "/v1/messages")
    assert support.lacking("/v1/messages") == {"gpu-1"}
    assert support.snapshot() == {"gpu-1": ["/v1/messages"]}
    now[0] = 301.0
    assert not support.lacks("gpu-1", "/v1/messages")
    assert support.snapshot() == {}
