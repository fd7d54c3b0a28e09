"""The frames a run fans out to its subscribers (core/runs.py `_trace_event`), without
sockets: a turn's frame, put together from serialized parts, is the frame the ordinary
way builds (message, fill_out, serialize), for every kind of record."""

from __future__ import annotations

import pytest

from car_grpc.core.runs import (
    COMPLETED,
    ENDED,
    IN_PROGRESS,
    STARTED,
    TURN,
    _trace_event,
    _turn_event,
    turn_records,
)
from car_grpc.v1 import runs_pb2, session_pb2
from car_grpc.wire.codec import to_value
from car_grpc.wire.twins import fill_out


def _full_turn() -> runs_pb2.RunTurn:
    """A turn with every field set (a twin added to any of them must show here)."""
    return runs_pb2.RunTurn(
        index=300,  # past one byte of varint
        prompt="p" * 200,  # a length past one byte of varint
        tool="shell",
        parameters=to_value({"cmd": "pytest -q", "timeout": 60, "env": {"A": [1, None]}}),
        output=to_value("F." * 80),
        cli_outcome=to_value({"exit": 1}),
        verifier_verdict="not_run",
        policy_rejected=True,
    )


def _records() -> list[runs_pb2.RunRecord]:
    ended = runs_pb2.RunRecord(record=ENDED, timestamp=3)
    ended.ended.status = COMPLETED
    ended.ended.outcome.status = "success"  # has a typed twin (status_enum)
    return [
        runs_pb2.RunRecord(record=TURN, timestamp=1_764_000_000_000, turn=_full_turn()),
        runs_pb2.RunRecord(record=TURN, timestamp=1, turn=runs_pb2.RunTurn()),
        runs_pb2.RunRecord(
            record=STARTED, timestamp=2, started=runs_pb2.RunStarted(run_id="r", agent_id="a")
        ),
        ended,
    ]


@pytest.mark.parametrize("record", _records(), ids=["turn", "empty turn", "started", "ended"])
@pytest.mark.parametrize("cursor", [1, 2000])
def test_a_trace_event_is_the_frame_built_the_ordinary_way(
    record: runs_pb2.RunRecord, cursor: int
) -> None:
    expected = session_pb2.ServerFrame()
    event = expected.runs_trace_event
    event.run_id, event.agent_id, event.status = "run-" + "0" * 32, "bench-agent", IN_PROGRESS
    event.record.CopyFrom(record)
    event.cursor = cursor
    fill_out(expected)
    head = runs_pb2.RunTraceEvent(
        run_id=event.run_id, agent_id=event.agent_id, status=event.status
    ).SerializeToString()

    got = session_pb2.ServerFrame.FromString(_trace_event(head, record, cursor))

    assert got == expected
    if record.record == ENDED:  # the twin is there
        assert got.runs_trace_event.record.ended.outcome.status_enum != 0


def test_a_turn_needs_no_typed_twins() -> None:
    """The turn's frame skips fill_out: that must change nothing in a turn's frame."""
    frame = session_pb2.ServerFrame()
    frame.runs_trace_event.record.CopyFrom(
        runs_pb2.RunRecord(record=TURN, timestamp=1, turn=_full_turn())
    )
    before = frame.SerializeToString(deterministic=True)
    assert fill_out(frame).SerializeToString(deterministic=True) == before


@pytest.mark.parametrize("first_index", [0, 127, 128, 1999])
@pytest.mark.parametrize("timestamp", [1, 1_764_000_000_000])
def test_stored_turns_are_the_records_serialized(first_index: int, timestamp: int) -> None:
    """turn_records puts each stored record together from its turn's bytes: they read as
    the RunRecord of the turn with its index (what the store kept before), and a typed
    subscriber's event of them is _trace_event's of that record."""
    full = _full_turn()
    full.ClearField("index")  # as capped() leaves every turn
    turns = [full, runs_pb2.RunTurn(), runs_pb2.RunTurn(prompt="é" * 100)]
    stored = turn_records([turn.SerializeToString() for turn in turns], first_index, timestamp)
    assert (stored.timestamp, stored.first_index) == (timestamp, first_index)
    head = runs_pb2.RunTraceEvent(run_id="r", agent_id="a").SerializeToString()
    for i, (turn, data) in enumerate(zip(turns, stored.records, strict=True)):
        expected = runs_pb2.RunRecord(record=TURN, timestamp=timestamp, turn=turn)
        expected.turn.index = first_index + i
        assert runs_pb2.RunRecord.FromString(data) == expected
        assert session_pb2.ServerFrame.FromString(
            _turn_event(head, data, i + 1)
        ) == session_pb2.ServerFrame.FromString(_trace_event(head, expected, i + 1))
