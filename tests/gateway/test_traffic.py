"""The charts' ring of one-second buckets, on a fake clock."""

from __future__ import annotations

from local_inference_pool.gateway.traffic import MAX_GROUPS, SECONDS, Traffic

from ..clock import Clock


def test_a_stream_is_counted_as_it_passes_and_corrected_when_it_ends() -> None:
    clock = Clock(1000.0)
    traffic = Traffic(clock)
    traffic.arrived("m")
    for _ in range(3):
        clock.advance(1)
        traffic.streamed("gpu0", "m", 5)
        assert traffic.rates()["tokens_per_s"] > 0  # never 0 while it streams
    traffic.ended("gpu0", "m", 0.25, 20 - 15)  # the server said 20 output tokens
    series = traffic.series("all", seconds=5)
    assert series["times"] == [999, 1000, 1001, 1002, 1003]
    assert series["requests"] == [0, 1, 0, 0, 0]
    assert series["tokens"] == [0, 0, 5, 5, 10]
    assert series["ttft_p50_ms"][-1] == 250.0
    assert traffic.series("backend:gpu0", seconds=1)["tokens"] == [10]
    assert traffic.series("model:m")["groups"] == ["all", "backend:gpu0", "model:m"]


def test_queue_samples_and_ttft_quantiles() -> None:
    clock = Clock(5000.0)
    traffic = Traffic(clock)
    traffic.sample_queue({"a": 3, "b": 1})
    for index in range(1, 21):
        traffic.ended("gpu0", "a", index / 1000, 0)
    series = traffic.series("all", seconds=1)
    assert series["waiting"] == [4]
    assert traffic.series("model:a", seconds=1)["waiting"] == [3]
    assert series["ttft_p50_ms"] == [10.0]
    assert series["ttft_p95_ms"] == [19.0]


def test_the_ring_forgets_what_is_older_than_fifteen_minutes_and_bounds_its_groups() -> None:
    clock = Clock(0.0)
    traffic = Traffic(clock)
    for second in range(2 * SECONDS):
        clock.now = float(second)
        traffic.arrived("m")
    assert len(traffic._buckets) == SECONDS
    for index in range(2 * MAX_GROUPS):
        traffic.arrived(f"model-{index}")
    assert len(traffic.series()["groups"]) == MAX_GROUPS
    assert traffic.series(seconds=10**6)["times"][0] == 2 * SECONDS - SECONDS
