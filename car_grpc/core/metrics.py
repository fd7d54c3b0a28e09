"""The core's counters, rendered in the Prometheus text exposition format (0.0.4).

One `Metrics` hangs off each ServerState. Counters move at a few choke points only: a
request's outcome in `dispatch.execute` (which also sees the turns a `runs.record_turns`
appended), a server-initiated call's latency in `ClientSession.call`, a drop where a
bounded fan-out queue is full, and an approval's resolution in the ledger. Gauges
(sessions, chats in flight, pending approvals, ...) are not kept here: whoever renders
reads them off the state at that moment (car_grpc.core.status).

Every label value comes from a fixed set (JSON-RPC method names of the API, error codes,
queue and outcome names), so the number of series is bounded.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from car_grpc.v1 import runs_pb2

#: Upper bounds (seconds) of the callback latency histogram's buckets.
CALLBACK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _header(name: str, help_text: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


@dataclass
class Counter:
    name: str
    help: str
    label_names: Labels = ()
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, *labels: str, by: float = 1.0) -> None:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        self.values[labels] = self.values.get(labels, 0.0) + by

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "counter")
        samples = self.values if self.values or self.label_names else {(): 0.0}
        for labels, value in sorted(samples.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


@dataclass
class _Series:
    buckets: list[int]
    sum: float = 0.0
    count: int = 0


@dataclass
class Histogram:
    name: str
    help: str
    label_names: Labels
    bounds: Sequence[float]
    series: dict[Labels, _Series] = field(default_factory=dict)

    def observe(self, value: float, *labels: str) -> None:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _Series([0] * len(self.bounds))
        i = bisect.bisect_left(self.bounds, value)  # the first bucket with value <= bound
        if i < len(self.bounds):
            series.buckets[i] += 1
        series.sum += value
        series.count += 1

    def count(self, *labels: str) -> int:
        series = self.series.get(labels)
        return series.count if series else 0

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "histogram")
        names = (*self.label_names, "le")
        for labels, series in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.bounds, series.buckets, strict=True):
                cumulative += n
                le = _labels(names, (*labels, _number(bound)))
                lines.append(f"{self.name}_bucket{le} {cumulative}")
            lines.append(f"{self.name}_bucket{_labels(names, (*labels, '+Inf'))} {series.count}")
            own = _labels(self.label_names, labels)
            lines.append(f"{self.name}_sum{own} {_number(series.sum)}")
            lines.append(f"{self.name}_count{own} {series.count}")
        return lines


@dataclass(frozen=True)
class Gauge:
    """A value read off the state at render time: (label values, value) samples."""

    name: str
    help: str
    label_names: Labels = ()
    samples: Sequence[tuple[Labels, float]] = ()

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "gauge")
        for labels, value in self.samples:
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


#: The `code` label of a request that succeeded.
OK = "ok"


class Metrics:
    """The counters of one core."""

    def __init__(self) -> None:
        self.sessions_opened = Counter(
            "car_sessions_opened_total", "Session streams (client connections) opened."
        )
        self.requests = Counter(
            "car_requests_total",
            "Requests handled, by JSON-RPC method and result code (ok, or the JSON-RPC "
            "error code).",
            ("method", "code"),
        )
        self.callback_seconds = Histogram(
            "car_callback_duration_seconds",
            "Time from sending a server-initiated request (tools.execute, agent.chat, ...) "
            "to the client's answer.",
            ("method",),
            CALLBACK_BUCKETS,
        )
        self.run_turns = Counter("car_run_turns_appended_total", "Run turns appended and stored.")
        self.approvals = Counter(
            "car_approvals_resolved_total",
            "Approvals resolved, by outcome (approved, denied, expired).",
            ("outcome",),
        )
        self.queue_drops = Counter(
            "car_queue_drops_total",
            "Items dropped because a bounded queue was full (a slow reader), by queue.",
            ("queue",),
        )

    def request_done(self, method: str, code: int | None, response: Message | None) -> None:
        """Count one request's outcome: `code` None when it succeeded with `response`."""
        self.requests.inc(method, OK if code is None else str(code))
        if isinstance(response, runs_pb2.RecordTurnsResponse) and response.ok:
            self.run_turns.inc(by=response.count)

    def render(self, gauges: Iterable[Gauge] = ()) -> str:
        """Every metric in the Prometheus text format, gauges first."""
        lines: list[str] = []
        for gauge in gauges:
            lines += gauge.render()
        for metric in (
            self.sessions_opened,
            self.requests,
            self.callback_seconds,
            self.run_turns,
            self.approvals,
            self.queue_drops,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
