"""Counters and histograms that the request path adds to as plain numbers, and Prometheus reads at scrape.

prometheus_client's own ``Counter`` and ``Histogram`` take a lock and check their state on every
change, a histogram looks for its bucket one bound at a time, and each set of label values is a
child found first: measured, 0.48 µs an increment and 1.07 µs an observation, about 11 µs for the
eleven changes of each request with the lookups. Here a change is a dictionary update (a
histogram's bucket found by bisection), 0.15 and 0.30 µs, about 2.3 µs a request. The exposition is
prometheus_client's, from metric families made at scrape time, with the same names, labels and
buckets as its own metrics (``tests/gateway/test_tallies.py`` compares the two).

Every change comes from the event loop's thread, and so does the scrape (``/pool/metrics``), so no
lock is needed: nothing can change a tally while it is read.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CounterTally", "HistogramTally", "Tallies"]


class CounterTally:
    """A counter by label values: ``inc`` adds, ``family`` is what a scrape shows."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        return family


class HistogramTally:
    """A histogram by label values, with Prometheus's buckets (a value counts in the first bucket
    whose bound it does not exceed, ``+Inf`` last)."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.bounds = tuple(float(bound) for bound in buckets)
        self._les = [*(repr(bound) for bound in self.bounds), "+Inf"]  # as Prometheus writes bounds
        if any(bound >= 1e6 for bound in self.bounds):
            raise ValueError("bounds from 10^6 up are written in exponent form: not supported")
        # Per label values: the count in each bucket (not cumulative), then the sum of the values.
        self.values: dict[tuple[str, ...], list[float]] = {}
        if not labels:
            self.values[()] = [0.0] * (len(self.bounds) + 2)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.values.get(labels)
        if counts is None:
            counts = self.values[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, counts in self.values.items():
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._les, counts, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, sum_value=counts[-1])
        return family


class Tallies(Collector):
    """The tallies made through it, shown at every scrape."""

    def __init__(self) -> None:
        self.tallies: list[CounterTally | HistogramTally] = []

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> CounterTally:
        tally = CounterTally(name, documentation, labels)
        self.tallies.append(tally)
        return tally

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> HistogramTally:
        tally = HistogramTally(name, documentation, labels, buckets=buckets)
        self.tallies.append(tally)
        return tally

    def collect(self) -> Iterator[Metric]:
        for tally in self.tallies:
            yield tally.family()
