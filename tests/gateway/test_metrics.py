from __future__ import annotations

import itertools
import json
import logging

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from local_inference_pool.gateway.app import create_pool_app
from local_inference_pool.gateway.usage import UsageSniffer

from ..fakes import FakeBackend, Fleet
from .test_app import CHAT, client_for

USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
STREAM = (
    b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n"
    b"data: [DONE]\n\n"
)


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_usage_is_found_however_the_stream_is_cut(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    sniffer = UsageSniffer(event_stream=True)
    for start, end in itertools.pairwise(points):
        sniffer.feed(STREAM[start:end])
    sniffer.finish()
    assert sniffer.usage == USAGE


def test_usage_of_a_json_answer_is_read_at_its_end() -> None:
    body = json.dumps({"choices": [{"message": {"content": "x"}}], "usage": USAGE}).encode()
    sniffer = UsageSniffer(event_stream=False)
    sniffer.feed(body[:10])
    sniffer.feed(body[10:])
    sniffer.finish()
    assert sniffer.usage == USAGE


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": [{"message": {"content": 'the word "usage": {"prompt_tokens": 99}'}}], "usage": USAGE},
        {"usage": USAGE, "choices": [{"message": {"content": "usage"}}]},  # a later "usage" is a value
        {"usage": USAGE, "choices": [{"message": {"content": "x"}}], "timings": {"predicted_n": 1}},
    ],
    ids=["quoted in the content", "a value after the key", "key not last"],
)
def test_the_answers_own_usage_is_read_wherever_the_word_appears(answer: dict[str, object]) -> None:
    for body in (json.dumps(answer).encode(), json.dumps(answer, separators=(",", ":")).encode()):
        sniffer = UsageSniffer(event_stream=False)
        sniffer.feed(body)
        sniffer.finish()
        assert sniffer.usage == USAGE


@pytest.mark.anyio
async def test_metrics_count_requests_outcomes_and_read_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet(a=FakeBackend(slots=3))
    caplog.set_level(logging.INFO, logger="local_inference_pool.access")
    async with client_for(fleet) as client:
        assert (await client.post("/chat/completions", json=CHAT)).status_code == 200
        assert (await client.post("/chat/completions", json={"model": "nope"})).status_code == 404
        text = (await client.get("/pool/metrics")).text
    values = samples(text)
    assert values[("lip_requests_total", (("backend", "a:8080"), ("model", "m"), ("outcome", "ok")))] == 1
    assert (
        values[
            ("lip_requests_total", (("backend", "-"), ("model", "(unknown)"), ("outcome", "model_not_found")))
        ]
        == 1
    )
    assert values[("lip_backend_slots", (("backend", "a:8080"),))] == 3
    assert values[("lip_backend_health", (("backend", "a:8080"), ("state", "healthy")))] == 1
    assert values[("lip_queue_wait_seconds_count", (("model", "m"),))] == 1
    assert values[("lip_time_to_first_byte_seconds_count", (("backend", "a:8080"), ("model", "m")))] == 1
    assert values[("lip_affinity_total", (("result", "miss"),))] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "local_inference_pool.access"]
    assert len(lines) == 2
    assert 'model="m" backend=a:8080 status=200 outcome=ok' in lines[0]
    assert "request_id=" in lines[0]
    assert "ttfb_ms=" in lines[0]
    assert "outcome=model_not_found" in lines[1]
    assert "key-a" not in text + "".join(lines)  # the backend's key never shows


@pytest.mark.anyio
async def test_models_no_backend_serves_share_one_label() -> None:
    """Clients choose the model name: made-up ones must not grow the metrics without bound."""
    async with client_for(Fleet(a=FakeBackend())) as client:
        for i in range(50):
            assert (await client.post("/chat/completions", json={"model": f"made-up-{i}"})).status_code == 404
        text = (await client.get("/pool/metrics")).text
    assert "made-up" not in text
    assert (
        samples(text)[
            ("lip_requests_total", (("backend", "-"), ("model", "(unknown)"), ("outcome", "model_not_found")))
        ]
        == 50
    )


@pytest.mark.anyio
async def test_two_apps_in_one_process_do_not_share_metrics() -> None:
    first, second = Fleet(a=FakeBackend()), Fleet(a=FakeBackend())
    app_one = create_pool_app(first.config(health_interval=60), transport=first.transport)
    app_two = create_pool_app(second.config(health_interval=60), transport=second.transport)
    async with LifespanManager(app_one) as one, LifespanManager(app_two) as two:
        transport_one, transport_two = httpx.ASGITransport(app=one.app), httpx.ASGITransport(app=two.app)
        async with (
            httpx.AsyncClient(transport=transport_one, base_url="http://one") as c1,
            httpx.AsyncClient(transport=transport_two, base_url="http://two") as c2,
        ):
            await c1.post("/chat/completions", json={"model": "nope"})
            text_two = (await c2.get("/pool/metrics")).text
            text_one = (await c1.get("/pool/metrics")).text
    assert "model_not_found" in text_one
    assert "model_not_found" not in text_two


USAGE_EVENT = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}'


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=400), unique=True, max_size=10))
def test_usage_is_read_from_an_event_stream_in_any_framing_split_anywhere(
    newline: bytes, cuts: list[int]
) -> None:
    blank = newline * 2
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}'
        + blank
        + USAGE_EVENT
        + blank
        + b"data: [DONE]"
        + blank
    )
    sniffer = UsageSniffer(event_stream=True)
    edges = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    for start, end in itertools.pairwise(edges):
        sniffer.feed(stream[start:end])
    sniffer.finish()
    assert sniffer.usage == {"prompt_tokens": 3, "completion_tokens": 5}


def test_an_event_too_long_to_keep_is_skipped_and_the_next_one_still_read() -> None:
    sniffer = UsageSniffer(event_stream=True)
    sniffer.feed(b'data: {"usage": "')
    for _ in range(64):  # a 64 MiB event with no blank line: never held whole
        sniffer.feed(b"x" * (1 << 20))
    sniffer.feed(b'"}\r\n\r\n' + USAGE_EVENT + b"\r\n\r\n")
    assert sniffer.usage == {"prompt_tokens": 3, "completion_tokens": 5}


def test_a_prompts_cache_figures_are_read_from_each_familys_usage() -> None:
    from local_inference_pool.gateway.usage import PromptReport, prompt_report

    timings = {"cache_n": 236, "prompt_n": 40, "prompt_ms": 80.0}
    assert prompt_report({"prompt_tokens": 276}, timings) == PromptReport(276, 236, 0.08, 40)
    openai = {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 60}}
    assert prompt_report(openai, None) == PromptReport(100, 60)
    responses = {"input_tokens": 35, "input_tokens_details": {"cached_tokens": 20}}
    assert prompt_report(responses, None) == PromptReport(35, 20)
    anthropic = {"input_tokens": 5, "cache_read_input_tokens": 20, "output_tokens": 3}
    assert prompt_report(anthropic, None) == PromptReport(25, 20)
    assert prompt_report({"prompt_tokens": "many"}, {"cache_n": -1, "prompt_n": 2}) is None
    assert prompt_report(None, None) is None


def test_llama_cpps_timings_are_read_from_a_streams_last_chunk() -> None:
    sniffer = UsageSniffer(event_stream=True)
    sniffer.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    sniffer.feed(
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"timings":{"cache_n":7,"prompt_n":3}}\n\n'
    )
    sniffer.finish()
    assert sniffer.timings == {"cache_n": 7, "prompt_n": 3}


@pytest.mark.anyio
async def test_the_readme_lists_every_metric() -> None:
    """The README's metrics reference is checked against the registry, as the config keys are.
    With shared state more are exported (listed in Scale out); here, every one of one process."""
    from pathlib import Path

    from local_inference_pool import Pool
    from local_inference_pool.gateway.metrics import PoolMetrics

    readme = (Path(__file__).parent.parent.parent / "README.md").read_text()
    async with Pool(Fleet(a=FakeBackend()).config()) as pool:
        names = {family.name for family in PoolMetrics(pool).registry.collect()}
    missing = sorted(name for name in names if f"`{name}" not in readme)
    assert names
    assert missing == []
