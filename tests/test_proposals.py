"""Unit tests of the proposal executor: planning, ordering, failure behaviours,
preconditions and policies, with an in-process tool function instead of a client."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from car_grpc.core import proposals
from car_grpc.core.proposals import ToolFailed, ToolInvocation
from car_grpc.v1 import state_pb2, tools_pb2
from car_grpc.wire.codec import json_to_message
from car_grpc.wire.errors import INVALID_PARAMS, CarError

Status = tools_pb2.ActionStatus
JSON = Any


def proposal(*actions: dict[str, JSON], id: str = "p1") -> tools_pb2.ActionProposal:
    msg = tools_pb2.ActionProposal()
    json_to_message({"id": id, "actions": list(actions)}, msg)
    return msg


def call(id: str, tool: str, **extra: JSON) -> dict[str, JSON]:
    return {"id": id, "type": "tool_call", "tool": tool, **extra}


def write(id: str, key: str, value: JSON, **extra: JSON) -> dict[str, JSON]:
    return {"id": id, "type": "state_write", "parameters": {"key": key, "value": value}, **extra}


class Tools:
    """Tool functions by name; records every invocation and every cancellation reason."""

    def __init__(self, **fns: Callable[[ToolInvocation], Awaitable[JSON]]) -> None:
        self.fns = fns
        self.calls: list[ToolInvocation] = []
        self.cancelled: dict[str, str] = {}

    async def __call__(self, inv: ToolInvocation) -> JSON:
        self.calls.append(inv)
        try:
            return await self.fns[inv.tool](inv)
        except asyncio.CancelledError as e:
            self.cancelled[inv.action_id] = e.args[0] if e.args else ""
            raise

    def order(self) -> list[str]:
        return [c.action_id for c in self.calls]


async def echo(inv: ToolInvocation) -> JSON:
    return inv.parameters


async def fail(inv: ToolInvocation) -> JSON:
    raise ToolFailed(f"{inv.tool} broke")


async def hang(inv: ToolInvocation) -> JSON:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def run(
    prop: tools_pb2.ActionProposal,
    tools: Tools,
    state: dict[str, JSON] | None = None,
    policies: list[dict[str, JSON]] | None = None,
) -> tools_pb2.ProposalResult:
    defs = []
    for p in policies or []:
        d = state_pb2.PolicyDefinition()
        json_to_message(p, d)
        defs.append(d)
    return await proposals.execute(
        proposals.plan(prop),
        state=state if state is not None else {},
        policies=defs,
        call_tool=tools,
        retry_backoff=0.001,
    )


def by_id(result: tools_pb2.ProposalResult) -> dict[str, tools_pb2.ActionResult]:
    return {r.action_id: r for r in result.results}


# ------------------------------------------------------------------ planning


def plan_error(*actions: dict[str, JSON]) -> str:
    with pytest.raises(CarError) as err:
        proposals.plan(proposal(*actions))
    assert err.value.code == INVALID_PARAMS
    return err.value.message


def test_plan_orders_by_state_dependencies_references_and_dependencies() -> None:
    plan = proposals.plan(
        proposal(
            write("w", "k", 1),
            call("r", "t", state_dependencies=["k", "nobody-writes-this"]),
            call("o", "t", parameters={"x": {"y": ["$r.output"]}}),
            call("d", "t", dependencies=["o"]),
            call("free", "t"),
        )
    )
    assert plan.proposal_id == "p1"
    assert plan.deps == {
        "w": frozenset(),
        "r": frozenset({"w"}),
        "o": frozenset({"r"}),
        "d": frozenset({"o"}),
        "free": frozenset(),
    }


def test_plan_gives_a_fresh_proposal_id_when_none() -> None:
    msg = tools_pb2.ActionProposal()
    assert proposals.plan(msg).proposal_id.startswith("proposal-")


def test_fresh_proposal_ids_are_distinct_here_and_in_a_forked_child() -> None:
    # A process's random prefix and a count (no getrandom per proposal): distinct within
    # the process, and a forked child, whose count starts where the parent's was, draws a
    # prefix of its own.
    fresh = proposals.proposal_id(tools_pb2.ActionProposal())
    ids = {proposals.proposal_id(tools_pb2.ActionProposal()) for _ in range(1000)}
    assert len(ids) == 1000 and fresh not in ids
    assert all(re.fullmatch(r"proposal-[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next id, then out at once
        os.write(write, proposals.proposal_id(tools_pb2.ActionProposal()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        theirs = pipe.read().decode()
    os.waitpid(child, 0)
    ours = proposals.proposal_id(tools_pb2.ActionProposal())
    assert re.fullmatch(r"proposal-[0-9a-f]{32}", theirs)
    assert theirs[:25] != ours[:25]  # "proposal-" and the prefix
    assert theirs[25:] == ours[25:]  # the same count: only the prefix tells them apart


def test_unknown_reference_names_the_field() -> None:
    message = plan_error(call("a", "t", parameters={"x": ["$ghost.output"]}))
    assert "proposal.actions[0].parameters.x[0]" in message
    assert "ghost" in message


def test_unknown_dependency_names_the_field() -> None:
    message = plan_error(call("a", "t"), call("b", "t", dependencies=["a", "nope"]))
    assert "proposal.actions[1].dependencies[1]" in message


def test_cycle_is_rejected_with_its_path() -> None:
    message = plan_error(
        call("a", "t", parameters={"x": "$c.output"}),
        call("b", "t", dependencies=["a"]),
        call("c", "t", dependencies=["b"]),
    )
    assert "cycle" in message
    assert "proposal.actions" in message
    for name in "abc":
        assert name in message


def test_self_reference_is_a_cycle() -> None:
    assert "cycle a -> a" in plan_error(call("a", "t", parameters={"x": "$a.output"}))


@pytest.mark.parametrize(
    ("actions", "field"),
    [
        ([{"type": "tool_call", "tool": "t"}], "proposal.actions[0].id"),
        ([call("a", "t"), call("a", "t")], "proposal.actions[1].id"),
        ([{"id": "a"}], "proposal.actions[0].type"),
        ([{"id": "a", "type": "tool_call"}], "proposal.actions[0].tool"),
        (
            [{"id": "a", "type": "state_write", "parameters": {}}],
            "proposal.actions[0].parameters.key",
        ),
        (
            [{"id": "a", "type": "state_read", "parameters": {"key": 3}}],
            "proposal.actions[0].parameters.key",
        ),
        (
            [{"id": "a", "type": "assertion", "preconditions": [{"operator": "exists"}]}],
            "proposal.actions[0].preconditions[0].key",
        ),
        (
            [{"id": "a", "type": "assertion", "preconditions": [{"key": "k"}]}],
            "proposal.actions[0].preconditions[0].operator",
        ),
    ],
)
def test_bad_actions_name_the_field(actions: list[dict[str, JSON]], field: str) -> None:
    assert plan_error(*actions).endswith(field)


def test_nothing_runs_when_the_plan_is_rejected() -> None:
    # plan() is the only way into execute(): a rejected plan leaves nothing to run.
    with pytest.raises(CarError):
        proposals.plan(proposal(write("w", "k", 1), call("a", "t", dependencies=["zz"])))


# ------------------------------------------------------------------ execution


async def test_dag_runs_in_order_and_substitutes_outputs() -> None:
    async def add(inv: ToolInvocation) -> JSON:
        return inv.parameters["a"] + inv.parameters["b"]

    tools = Tools(add=add, echo=echo)
    state: dict[str, JSON] = {}
    result = await run(
        proposal(
            call("sum", "add", parameters={"a": 1, "b": 2}),
            call("twice", "add", parameters={"a": "$sum.output", "b": "$sum.output"}),
            write("store", "total", "$twice.output"),
            call("show", "echo", parameters={"t": "$twice.output"}, state_dependencies=["total"]),
            {
                "id": "read",
                "type": "state_read",
                "parameters": {"key": "total"},
                "state_dependencies": ["total"],
            },
        ),
        tools,
        state,
    )
    results = by_id(result)
    assert [r.status for r in result.results] == [Status.ACTION_STATUS_SUCCEEDED] * 5
    assert [r.action_id for r in result.results] == ["sum", "twice", "store", "show", "read"]
    assert tools.order()[:2] == ["sum", "twice"]
    assert tools.calls[1].parameters == {"a": 3, "b": 3}
    assert tools.calls[2].parameters == {"t": 6}
    assert state == {"total": 6}
    assert results["store"].state_changes.fields["total"].number_value == 6
    assert results["read"].output.number_value == 6
    assert result.cost.tool_calls == 3
    assert result.cost.actions_executed == 5
    assert result.proposal_id == "p1"


async def test_independent_actions_run_concurrently() -> None:
    both_started = asyncio.Event()
    started = 0

    async def meet(inv: ToolInvocation) -> JSON:
        nonlocal started
        started += 1
        if started == 2:
            both_started.set()
        # Run one at a time, and neither could ever see the other start.
        await asyncio.wait_for(both_started.wait(), 5)
        return inv.action_id

    result = await run(proposal(call("a", "meet"), call("b", "meet")), Tools(meet=meet))
    assert [r.status for r in result.results] == [Status.ACTION_STATUS_SUCCEEDED] * 2


async def test_abort_skips_later_actions_and_rolls_state_back() -> None:
    tools = Tools(echo=echo, fail=fail)
    state: dict[str, JSON] = {"kept": "before", "changed": "old"}
    result = await run(
        proposal(
            write("w1", "changed", "new"),
            write("w2", "fresh", 1),
            call("boom", "fail", dependencies=["w1", "w2"]),
            call("later", "echo", dependencies=["boom"]),
            call("after", "echo", state_dependencies=["changed"], dependencies=["boom"]),
        ),
        tools,
        state,
    )
    results = by_id(result)
    assert results["boom"].status == Status.ACTION_STATUS_FAILED
    assert results["boom"].error == "fail broke"
    assert results["later"].status == Status.ACTION_STATUS_SKIPPED
    assert results["after"].status == Status.ACTION_STATUS_SKIPPED
    assert results["w1"].status == Status.ACTION_STATUS_SUCCEEDED
    assert results["w1"].rolled_back and results["w2"].rolled_back
    assert not results["boom"].HasField("rolled_back")
    assert state == {"kept": "before", "changed": "old"}
    assert tools.order() == ["boom"]
    assert result.cost.actions_executed == 3
    assert result.cost.actions_skipped == 2


async def test_abort_cancels_in_flight_siblings() -> None:
    tools = Tools(hang=hang, fail=fail)
    result = await run(proposal(call("slow", "hang"), call("boom", "fail")), tools)
    results = by_id(result)
    assert results["boom"].status == Status.ACTION_STATUS_FAILED
    assert results["slow"].status == Status.ACTION_STATUS_SKIPPED
    assert results["slow"].error == "cancelled: proposal aborted"
    assert tools.cancelled == {"slow": "proposal aborted"}


async def test_retry_until_success_with_attempt_numbers() -> None:
    async def flaky(inv: ToolInvocation) -> JSON:
        if inv.attempt < 3:
            raise ToolFailed(f"attempt {inv.attempt} failed")
        return "ok"

    tools = Tools(flaky=flaky)
    result = await run(proposal(call("a", "flaky", failure_behavior="retry")), tools)
    assert result.results[0].status == Status.ACTION_STATUS_SUCCEEDED
    assert result.results[0].output.string_value == "ok"
    assert [c.attempt for c in tools.calls] == [1, 2, 3]
    assert result.cost.retries == 2
    assert result.cost.tool_calls == 3


async def test_retry_exhausted_aborts() -> None:
    tools = Tools(fail=fail, echo=echo)
    state: dict[str, JSON] = {}
    result = await run(
        proposal(
            write("w", "k", 1),
            call("a", "fail", failure_behavior="retry", max_retries=2, dependencies=["w"]),
            call("b", "echo", dependencies=["a"]),
        ),
        tools,
        state,
    )
    results = by_id(result)
    assert results["a"].status == Status.ACTION_STATUS_FAILED
    assert [c.attempt for c in tools.calls] == [1, 2, 3]
    assert result.cost.retries == 2
    assert results["b"].status == Status.ACTION_STATUS_SKIPPED
    assert results["w"].rolled_back
    assert state == {}


async def test_retry_defaults_to_three_retries_and_zero_means_none() -> None:
    tools = Tools(fail=fail)
    await run(proposal(call("a", "fail", failure_behavior="retry")), tools)
    assert len(tools.calls) == 4
    tools = Tools(fail=fail)
    await run(proposal(call("a", "fail", failure_behavior="retry", max_retries=0)), tools)
    assert len(tools.calls) == 1


async def test_retry_backs_off_doubling() -> None:
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    tools = Tools(fail=fail)
    plan = proposals.plan(proposal(call("a", "fail", failure_behavior="retry")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asyncio, "sleep", record)
        await proposals.execute(plan, state={}, call_tool=tools, retry_backoff=0.1)
    assert sleeps == [0.1, 0.2, 0.4]


async def test_skip_marks_failed_and_continues() -> None:
    tools = Tools(fail=fail, echo=echo)
    state: dict[str, JSON] = {}
    result = await run(
        proposal(
            call("bad", "fail", failure_behavior="skip"),
            call("needs_bad", "echo", parameters={"x": "$bad.output"}),
            write("w", "k", 1, dependencies=["bad"]),
            call("free", "echo", parameters={"x": 1}),
        ),
        tools,
        state,
    )
    results = by_id(result)
    assert results["bad"].status == Status.ACTION_STATUS_FAILED
    assert results["needs_bad"].status == Status.ACTION_STATUS_SKIPPED
    assert results["needs_bad"].error == "dependency 'bad' did not succeed"
    assert results["w"].status == Status.ACTION_STATUS_SKIPPED
    assert results["free"].status == Status.ACTION_STATUS_SUCCEEDED
    assert not results["free"].HasField("rolled_back")
    assert sorted(tools.order()) == ["bad", "free"]


async def test_skip_keeps_state_of_other_actions() -> None:
    state: dict[str, JSON] = {}
    await run(
        proposal(write("w", "k", 1), call("bad", "fail", failure_behavior="skip")),
        Tools(fail=fail),
        state,
    )
    assert state == {"k": 1}


async def test_timeout_fails_the_action_and_cancels_the_call() -> None:
    tools = Tools(hang=hang)
    result = await run(proposal(call("slow", "hang", timeout_ms=20)), tools)
    assert result.results[0].status == Status.ACTION_STATUS_FAILED
    assert result.results[0].error == "tool 'hang' callback timed out (0.02s)"
    assert tools.cancelled == {"slow": "timeout"}
    assert tools.calls[0].timeout_ms == 20


async def test_terminal_failure_aborts_without_retry() -> None:
    async def fatal(inv: ToolInvocation) -> JSON:
        raise ToolFailed("disk gone", terminal=True)

    tools = Tools(fatal=fatal, echo=echo)
    result = await run(
        proposal(
            call("a", "fatal", failure_behavior="retry"), call("b", "echo", dependencies=["a"])
        ),
        tools,
    )
    results = by_id(result)
    assert results["a"].status == Status.ACTION_STATUS_FAILED
    assert results["a"].terminal
    assert results["b"].status == Status.ACTION_STATUS_SKIPPED
    assert len(tools.calls) == 1
    result = await run(proposal(call("a", "fatal", failure_behavior="skip")), Tools(fatal=fatal))
    assert result.results[0].terminal


async def test_outer_cancellation_cancels_tool_calls() -> None:
    both = asyncio.Event()

    async def hang_both(inv: ToolInvocation) -> JSON:
        if len(tools.calls) == 2:
            both.set()
        return await hang(inv)

    tools = Tools(hang=hang_both)
    plan = proposals.plan(proposal(call("a", "hang"), call("b", "hang")))
    task = asyncio.create_task(proposals.execute(plan, state={}, call_tool=tools))
    await asyncio.wait_for(both.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tools.cancelled == {"a": "proposal cancelled", "b": "proposal cancelled"}


async def test_a_lone_action_sees_the_requests_own_cancellation() -> None:
    """An action that runs alone runs in the executor's task: a cancellation of that task
    (a handler deadline: no message) reaches the call as it is, and cancel_reason names
    it `proposal cancelled`; the executor's own reasons pass through."""
    seen: list[str] = []
    started = asyncio.Event()

    async def hang_here(inv: ToolInvocation) -> JSON:
        started.set()
        try:
            return await hang(inv)
        except asyncio.CancelledError as e:
            seen.append(proposals.cancel_reason(e))
            raise

    plan = proposals.plan(proposal(call("a", "hang")))
    task = asyncio.create_task(proposals.execute(plan, state={}, call_tool=hang_here))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["proposal cancelled"]
    reasons = [proposals.CANCEL_TIMEOUT, proposals.CANCEL_ABORTED, "something else"]
    named = [proposals.cancel_reason(asyncio.CancelledError(r)) for r in reasons]
    assert named == ["timeout", "proposal aborted", "proposal cancelled"]


async def test_broken_tool_function_fails_only_its_action() -> None:
    async def broken(inv: ToolInvocation) -> JSON:
        raise RuntimeError("bug")

    result = await run(proposal(call("a", "broken")), Tools(broken=broken))
    assert result.results[0].status == Status.ACTION_STATUS_FAILED
    assert "bug" in result.results[0].error


async def test_empty_proposal() -> None:
    result = await run(proposal(), Tools())
    assert list(result.results) == []
    assert result.cost.actions_executed == 0


# ------------------------------------------------------------------ preconditions

STATE: dict[str, JSON] = {"n": 5, "s": "hello", "l": [1, "x"], "b": True, "nil": None}


@pytest.mark.parametrize(
    ("key", "operator", "value", "holds"),
    [
        ("n", "eq", 5, True),
        ("n", "eq", 5.0, True),
        ("n", "eq", 6, False),
        ("b", "eq", 1, False),
        ("b", "eq", True, True),
        ("nil", "eq", None, True),
        ("missing", "eq", None, False),
        ("n", "neq", 6, True),
        ("n", "neq", 5, False),
        ("missing", "neq", 5, True),
        ("n", "gt", 4, True),
        ("n", "gt", 5, False),
        ("s", "gt", "apple", True),
        ("s", "gt", 1, False),
        ("b", "gt", 0, False),
        ("n", "lt", 6, True),
        ("n", "lt", 5, False),
        ("n", "gte", 5, True),
        ("n", "gte", 6, False),
        ("n", "lte", 5, True),
        ("n", "lte", 4, False),
        ("missing", "lte", 4, False),
        ("n", "exists", None, True),
        ("nil", "exists", None, True),
        ("missing", "exists", None, False),
        ("missing", "not_exists", None, True),
        ("n", "not_exists", None, False),
        ("s", "contains", "ell", True),
        ("s", "contains", "xyz", False),
        ("l", "contains", "x", True),
        ("l", "contains", 1.0, True),
        ("l", "contains", 2, False),
        ("n", "contains", 5, False),
        ("missing", "contains", "a", False),
    ],
)
async def test_precondition_operators(key: str, operator: str, value: JSON, holds: bool) -> None:
    pre = tools_pb2.Precondition()
    json_to_message({"key": key, "operator": operator, "value": value}, pre)
    assert proposals.precondition_holds(pre, STATE) is holds
    # And through the executor: an assertion succeeds exactly when it holds.
    action = {
        "id": "check",
        "type": "assertion",
        "preconditions": [{"key": key, "operator": operator, "value": value}],
    }
    result = await run(proposal(action), Tools(), dict(STATE))
    expected = Status.ACTION_STATUS_SUCCEEDED if holds else Status.ACTION_STATUS_FAILED
    assert result.results[0].status == expected
    if not holds:
        assert result.results[0].error.startswith(f"precondition failed: {key} {operator}")


async def test_precondition_sees_earlier_writes_and_blocks_tool_call() -> None:
    tools = Tools(echo=echo)
    result = await run(
        proposal(
            write("w", "ready", True),
            call(
                "go",
                "echo",
                state_dependencies=["ready"],
                preconditions=[{"key": "ready", "operator": "eq", "value": True}],
            ),
            call(
                "no",
                "echo",
                preconditions=[{"key": "other", "operator": "exists"}],
                failure_behavior="skip",
            ),
        ),
        tools,
    )
    results = by_id(result)
    assert results["go"].status == Status.ACTION_STATUS_SUCCEEDED
    assert results["no"].status == Status.ACTION_STATUS_FAILED
    assert tools.order() == ["go"]


# ------------------------------------------------------------------ policies


async def test_deny_tool_rejects_without_calling() -> None:
    tools = Tools(echo=echo)
    result = await run(
        proposal(
            call("a", "rm"), call("b", "echo", parameters={"x": "$a.output"}), call("c", "echo")
        ),
        tools,
        policies=[{"name": "no-rm", "kind": "deny_tool", "target": "rm"}],
    )
    results = by_id(result)
    assert results["a"].status == Status.ACTION_STATUS_REJECTED
    assert "no-rm" in results["a"].error
    assert results["b"].status == Status.ACTION_STATUS_SKIPPED
    assert results["c"].status == Status.ACTION_STATUS_SUCCEEDED
    assert tools.order() == ["c"]
    assert result.cost.actions_rejected == 1


async def test_deny_tool_param_matches_the_substituted_parameter() -> None:
    async def command(inv: ToolInvocation) -> JSON:
        return "rm -rf /"

    tools = Tools(shell=echo, command=command)
    policy = {
        "name": "p",
        "rule": "deny_tool_param",
        "target": "shell",
        "key": "cmd",
        "pattern": "rm -rf",
    }
    result = await run(
        proposal(
            call("make", "command"),
            call("bad", "shell", parameters={"cmd": "$make.output"}),
            call("good", "shell", parameters={"cmd": "ls"}),
            call("other_key", "shell", parameters={"arg": "rm -rf"}),
        ),
        tools,
        policies=[policy],
    )
    results = by_id(result)
    assert results["bad"].status == Status.ACTION_STATUS_REJECTED
    assert results["good"].status == Status.ACTION_STATUS_SUCCEEDED
    assert results["other_key"].status == Status.ACTION_STATUS_SUCCEEDED
    assert "bad" not in tools.order()


async def test_require_state_rejects_until_the_key_exists() -> None:
    tools = Tools(echo=echo)
    policy = {"name": "need-login", "kind": "require_state", "target": "login"}
    result = await run(proposal(call("a", "echo")), tools, policies=[policy])
    assert result.results[0].status == Status.ACTION_STATUS_REJECTED
    assert "login" in result.results[0].error
    result = await run(proposal(call("a", "echo")), tools, {"login": "me"}, policies=[policy])
    assert result.results[0].status == Status.ACTION_STATUS_SUCCEEDED


def test_json_equal_distinguishes_bools_from_numbers() -> None:
    assert proposals.json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not proposals.json_equal(True, 1)
    assert not proposals.json_equal("1", 1)
    assert not proposals.json_equal({"a": 1}, {"b": 1})
    assert proposals.json_equal(None, None)
