"""Unit tests of the host event log, the params preview and the gate's configuration."""

from __future__ import annotations

import pytest

from car_grpc.cli import build_parser, config_from
from car_grpc.config import DEFAULT_GATED_METHODS, Config
from car_grpc.core.approvals import PREVIEW_CHARS, params_preview
from car_grpc.core.host import HostEvents
from car_grpc.v1 import host_pb2


def test_sequences_increase_and_history_is_bounded() -> None:
    host = HostEvents(history=3, queue_size=8)
    events = [host.publish("host.notification", message=str(i)) for i in range(5)]
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert host.last_sequence == 5
    assert [e.sequence for e in host.history] == [3, 4, 5]


def test_a_full_listener_drops_its_oldest_events_and_never_blocks_the_publisher() -> None:
    host = HostEvents(history=16, queue_size=2)
    slow, other = host.listen(), host.listen()
    for i in range(5):
        host.publish("agent.registered", agent_id=f"a{i}", payload={"i": i})
    kept = [slow.queue.get_nowait().sequence for _ in range(slow.queue.qsize())]
    assert kept == [4, 5]  # the newest survive; 1..3 are a visible gap
    assert slow.dropped == 3
    assert other.dropped == 3
    host.unlisten(slow)
    host.publish("agent.unregistered", agent_id="a0")
    assert slow.queue.empty()
    assert other.queue.qsize() == 2


def test_an_event_carries_what_was_published() -> None:
    host = HostEvents(history=4, queue_size=4)
    event = host.publish("agent.status_changed", agent_id="a1", message="busy", payload=[1])
    assert (event.kind, event.agent_id, event.message) == ("agent.status_changed", "a1", "busy")
    assert event.payload.list_value.values[0].number_value == 1
    bare = host.publish("host.notification")
    assert not bare.HasField("agent_id") and not bare.HasField("message")
    assert not bare.HasField("payload")


def test_host_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HostEvents(history=0, queue_size=1)
    with pytest.raises(ValueError):
        HostEvents(history=1, queue_size=0)


def test_params_preview_is_compact_json_cut_to_its_limit() -> None:
    short = host_pb2.RegisterAgentRequest(id="a1", name="n", kind="k")
    assert params_preview(short) == '{"capabilities":[],"id":"a1","kind":"k","name":"n"}'
    long = host_pb2.RegisterAgentRequest(name="x" * 10_000, kind="k")
    preview = params_preview(long)
    assert len(preview) == PREVIEW_CHARS
    assert preview.endswith("…")
    assert preview.startswith('{"capabilities":[],"kind":"k","name":"xxx')


def test_gated_methods_and_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAR_GATED_METHODS", " proposal.submit, state.set ,,")
    monkeypatch.setenv("CAR_APPROVAL_TIMEOUT", "2.5")
    config = Config.from_env().core
    assert config.gated_methods == DEFAULT_GATED_METHODS | {"proposal.submit", "state.set"}
    assert config.approval_timeout == 2.5


def test_gate_flags_add_to_the_configured_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAR_GATED_METHODS", "state.set")
    args = build_parser().parse_args(
        ["core", "--gate-method", "proposal.submit", "--approval-timeout", "0.5"]
    )
    config = config_from(args).core
    assert {"proposal.submit", "state.set", "mail.send"} <= config.gated_methods
    assert config.approval_timeout == 0.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["core", "--approval-timeout", bad])
