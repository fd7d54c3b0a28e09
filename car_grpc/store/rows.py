"""What both stores (SQLite, PostgreSQL) write and read the same way: statuses stored by
name, and the columns of runs, goals and A2A tasks decoded into the repositories' types. Only the
SQL around them differs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from car_grpc.store.repositories import A2aTaskRow, RunRow
from car_grpc.v1 import chats_pb2, host_pb2, runs_pb2, voice_pb2


def _name(enum: EnumDescriptor, prefix: str, value: int) -> str:
    """The stored name of an enum value: RUN_STATUS_IN_PROGRESS -> "in_progress"."""
    return enum.values_by_number[value].name.removeprefix(prefix).lower()


def run_status_name(status: runs_pb2.RunStatus.ValueType) -> str:
    return _name(runs_pb2.RunStatus.DESCRIPTOR, "RUN_STATUS_", status)


def approval_status_name(status: host_pb2.ApprovalStatus.ValueType) -> str:
    return _name(host_pb2.ApprovalStatus.DESCRIPTOR, "APPROVAL_STATUS_", status)


def meeting_status_name(status: voice_pb2.MeetingStatus.ValueType) -> str:
    return _name(voice_pb2.MeetingStatus.DESCRIPTOR, "MEETING_STATUS_", status)


def goal_status_name(status: chats_pb2.GoalStatus.ValueType) -> str:
    return _name(chats_pb2.GoalStatus.DESCRIPTOR, "GOAL_STATUS_", status)


IN_PROGRESS = run_status_name(runs_pb2.RUN_STATUS_IN_PROGRESS)

RUN_COLUMNS = (
    "run_id, agent_id, intent, outcome_description, started_at, ended_at, status,"
    " turn_count, record_count"
)
GOAL_COLUMNS = (
    "session_id, check_text, max_iterations, status, last_iteration, last_met,"
    " last_grounded, last_reason, terminal_kind, updated_at"
)


def run_from_row(values: Sequence[Any]) -> RunRow:
    """A RunRow from the RUN_COLUMNS of a row."""
    run_id, agent_id, intent, description, started_at, ended_at, status, turns, records = values
    return RunRow(
        run_id=str(run_id),
        agent_id=str(agent_id),
        intent=str(intent),
        outcome_description=None if description is None else str(description),
        started_at=int(started_at),
        ended_at=None if ended_at is None else int(ended_at),
        status=runs_pb2.RunStatus.Value("RUN_STATUS_" + str(status).upper()),
        turn_count=int(turns),
        record_count=int(records),
    )


def goal_from_row(values: Sequence[Any]) -> chats_pb2.StoredGoal:
    """A StoredGoal from the GOAL_COLUMNS of a row (an unknown status reads as
    UNSPECIFIED)."""
    sid, check, max_iter, status, iteration, met, grounded, reason, terminal, updated = values
    known = chats_pb2.GoalStatus.DESCRIPTOR.values_by_name.get("GOAL_STATUS_" + str(status).upper())
    goal = chats_pb2.StoredGoal(
        session_id=str(sid),
        check=str(check),
        max_iterations=int(max_iter),
        status=chats_pb2.GoalStatus.Value(known.name)
        if known
        else chats_pb2.GOAL_STATUS_UNSPECIFIED,
        updated_at=int(updated),
    )
    if iteration is not None:
        goal.last_iteration = int(iteration)
    if met is not None:
        goal.last_met = bool(met)
    if grounded is not None:
        goal.last_grounded = bool(grounded)
    if reason is not None:
        goal.last_reason = str(reason)
    if terminal is not None:
        goal.terminal_kind = str(terminal)
    return goal


A2A_TASK_COLUMNS = "task_id, agent_id, caller, context_id, state, updated_at, task"


def a2a_task_from_row(row: Sequence[object]) -> A2aTaskRow:
    task_id, agent_id, caller, context_id, state, updated_at, task = row
    assert isinstance(task, bytes | memoryview)
    return A2aTaskRow(
        str(task_id), str(agent_id), str(caller), str(context_id), int(str(state)),
        int(str(updated_at)), bytes(task),
    )  # fmt: skip
