"""`json_with` / `json_without` (options.proto): a message with two JSON forms, told apart by
whether one field is set. `goal.status` answers `{session_id, goal|null}` about one session
and `{goals: [...]}` about all (GetGoalStatusResponse): the compiled codec writes exactly
that, as the reference does, and the typed message stays as it was."""

from __future__ import annotations

import json

import pytest

from car_grpc.v1 import chats_pb2
from car_grpc.wire import codec
from tests import codec_reference as reference

GOAL = chats_pb2.StoredGoal(session_id="s", check="done?", max_iterations=3)

FORMS = [
    # About one session without a goal: the key is there, null.
    (chats_pb2.GetGoalStatusResponse(session_id="s"), {"session_id": "s", "goal": None}),
    # ... and with a goal set to its defaults: still the goal, an object.
    (
        chats_pb2.GetGoalStatusResponse(session_id="s", goal=chats_pb2.StoredGoal()),
        {"session_id": "s", "goal": codec.message_to_json(chats_pb2.StoredGoal())},
    ),
    # About all: only `goals`, even when a goal was set by mistake.
    (chats_pb2.GetGoalStatusResponse(), {"goals": []}),
    (
        chats_pb2.GetGoalStatusResponse(goals=[GOAL], goal=GOAL),
        {"goals": [codec.message_to_json(GOAL)]},
    ),
]


@pytest.mark.parametrize(("msg", "expected"), FORMS)
def test_each_form_writes_only_its_fields_and_null_for_an_unset_one(
    msg: chats_pb2.GetGoalStatusResponse, expected: dict[str, object]
) -> None:
    assert codec.message_to_json(msg) == expected
    compact = json.dumps(expected, separators=(",", ":"), ensure_ascii=True)
    assert codec.message_to_text(msg) == compact
    assert codec.result_to_text(msg, "") == compact
    assert reference.message_to_json(msg) == expected


def test_the_single_form_with_a_goal_has_no_goals_key() -> None:
    msg = chats_pb2.GetGoalStatusResponse(session_id="s", goal=GOAL, goals=[GOAL])
    assert codec.message_to_json(msg) == {"session_id": "s", "goal": codec.message_to_json(GOAL)}
    assert reference.message_to_json(msg) == codec.message_to_json(msg)


def test_a_null_goal_reads_as_unset() -> None:
    msg = chats_pb2.GetGoalStatusResponse()
    codec.json_to_message({"session_id": "s", "goal": None}, msg)
    assert msg.session_id == "s" and not msg.HasField("goal") and not msg.goals
    assert codec.message_to_text(msg) == '{"session_id":"s","goal":null}'
