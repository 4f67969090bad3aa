"""Tallies: what a scrape shows is what prometheus_client's own metrics show for the same changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from local_inference_pool.gateway.metrics import DURATION_BUCKETS, LATENCY_BUCKETS, WAIT_BUCKETS
from local_inference_pool.gateway.tallies import Tallies

labels = st.tuples(st.sampled_from(["m", "n", 'q"uote\\']), st.sampled_from(["a", "b"]))
values = st.one_of(
    st.floats(min_value=0, max_value=4000, allow_nan=False),
    st.sampled_from([0.0, 0.001, 1.0, 2.5, 600.0, 1800.0]),  # on a bucket's bound: counted in it
)


def exposed(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(
    buckets=st.sampled_from([WAIT_BUCKETS, LATENCY_BUCKETS, DURATION_BUCKETS]),
    changes=st.lists(st.tuples(labels, values), max_size=30),
    unlabelled=st.lists(values, max_size=5),
)
def test_a_scrape_shows_what_prometheus_clients_own_metrics_show(
    buckets: tuple[float, ...], changes: list[tuple[tuple[str, str], float]], unlabelled: list[float]
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("lip_x", "Things.", ["model", "backend"], registry=theirs)
    histogram = Histogram("lip_x_seconds", "Times.", ["model", "backend"], buckets=buckets, registry=theirs)
    bare = Histogram("lip_y_seconds", "Times.", buckets=buckets, registry=theirs)
    tallies = Tallies()
    counter_tally = tallies.counter("lip_x", "Things.", ["model", "backend"])
    histogram_tally = tallies.histogram("lip_x_seconds", "Times.", ["model", "backend"], buckets=buckets)
    bare_tally = tallies.histogram("lip_y_seconds", "Times.", buckets=buckets)
    ours.register(tallies)
    for label_values, value in changes:
        counter.labels(*label_values).inc(value)
        counter_tally.inc(label_values, value)
        histogram.labels(*label_values).observe(value)
        histogram_tally.observe(label_values, value)
    for value in unlabelled:
        bare.observe(value)
        bare_tally.observe((), value)
    assert exposed(ours) == exposed(theirs)
