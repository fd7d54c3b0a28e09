"""Unit tests of the metrics registry and its Prometheus text rendering."""

from __future__ import annotations

import pytest

from car_grpc.core.host import HostEvents
from car_grpc.core.metrics import Counter, Gauge, Histogram, Metrics
from car_grpc.v1 import runs_pb2


def test_counter_renders_help_type_and_sorted_labelled_samples() -> None:
    counter = Counter("things_total", "Things.", ("kind",))
    counter.inc("b")
    counter.inc("a", by=2)
    counter.inc("b")
    assert counter.render() == [
        "# HELP things_total Things.",
        "# TYPE things_total counter",
        'things_total{kind="a"} 2',
        'things_total{kind="b"} 2',
    ]


def test_unlabelled_counter_starts_at_zero_and_labels_are_escaped() -> None:
    assert Counter("n_total", "N.").render()[-1] == "n_total 0"
    counter = Counter("odd_total", "Odd.", ("v",))
    counter.inc('a"b\\c\nd')
    assert counter.render()[-1] == 'odd_total{v="a\\"b\\\\c\\nd"} 1'


def test_counter_refuses_the_wrong_number_of_labels() -> None:
    with pytest.raises(ValueError, match="takes labels"):
        Counter("x_total", "X.", ("a", "b")).inc("only-one")


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    hist = Histogram("lat_seconds", "Latency.", ("m",), (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value, "x")
    assert hist.render()[2:] == [
        'lat_seconds_bucket{m="x",le="0.1"} 2',
        'lat_seconds_bucket{m="x",le="1"} 3',
        'lat_seconds_bucket{m="x",le="+Inf"} 4',
        'lat_seconds_sum{m="x"} 3.65',
        'lat_seconds_count{m="x"} 4',
    ]


def test_gauges_render_first_and_record_turns_count_only_when_appended() -> None:
    metrics = Metrics()
    metrics.request_done("runs.record_turns", None, runs_pb2.RecordTurnsResponse(ok=True, count=4))
    dropped = runs_pb2.RecordTurnsResponse(ok=False, dropped=runs_pb2.RUN_DROP_REASON_RUN_TERMINAL)
    metrics.request_done("runs.record_turns", None, dropped)
    metrics.request_done("runs.start", -32602, None)
    text = metrics.render([Gauge("up", "Up.", (), [((), 1)])])
    assert text.startswith("# HELP up Up.\n# TYPE up gauge\nup 1\n")
    assert "car_run_turns_appended_total 4\n" in text
    assert 'car_requests_total{method="runs.record_turns",code="ok"} 2\n' in text
    assert 'car_requests_total{method="runs.start",code="-32602"} 1\n' in text


def test_a_full_host_event_listener_counts_its_drops() -> None:
    metrics = Metrics()
    host = HostEvents(history=8, queue_size=2, metrics=metrics)
    host.listen()
    for i in range(5):
        host.publish("host.notification", message=str(i))
    assert metrics.queue_drops.value("host_events") == 3
