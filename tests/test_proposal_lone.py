"""A proposal that is one tool call of the session's own client takes a path of its own
(`proposals.lone_call`, `run_lone`: no plan, no executor's run). Each case here runs the
same inputs on a real core through that path and through the general one (plan and
executor, forced by making `lone_call` find nothing) and compares everything the client
and the core show: the answer (result or error, times aside), the `tools.execute`
requests, the `tools.cancel` notices, whether the session is halted, its state, and the
core's request and callback metrics. The first run must have taken the lone path, the
second must not have."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.core import proposals
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.v1 import session_pb2, state_pb2, tools_pb2, tools_pb2_grpc
from car_grpc.wire.codec import json_to_message
from car_grpc.wire.errors import INVALID_PARAMS, CarError
from tests.conftest import make_config
from tests.session_client import SessionClient, connect
from tests.tool_host import ToolHost, terminal_error
from tests.ws_helpers import rpc, running, running_core

JSON = Any
Tool = Callable[[tools_pb2.ExecuteToolRequest], Awaitable[JSON]]
Status = tools_pb2.ActionStatus


def daemon_token(core: Core) -> str:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon


def submit_request(proposal: dict[str, JSON], **extra: JSON) -> tools_pb2.SubmitProposalRequest:
    req = tools_pb2.SubmitProposalRequest()
    json_to_message({"proposal": proposal, **extra}, req)
    return req


def call(**extra: JSON) -> dict[str, JSON]:
    return {"id": "a", "type": "tool_call", "tool": "t", **extra}


def timeless(result: tools_pb2.ProposalResult) -> tools_pb2.ProposalResult:
    """`result` with what depends on the clock zeroed, a fresh proposal id checked for its
    form and blanked."""
    copy = tools_pb2.ProposalResult()
    copy.CopyFrom(result)
    if copy.proposal_id.startswith("proposal-"):
        assert re.fullmatch(r"proposal-[0-9a-f]{32}", copy.proposal_id)
        copy.proposal_id = "proposal-"
    for item in copy.results:
        assert item.timestamp > 0
        item.timestamp = 0
        item.duration_ms = 0
    copy.cost.total_duration_ms = 0
    return copy


@dataclass
class Seen:
    """What one submission showed."""

    answer: tools_pb2.ProposalResult | tuple[int, str]
    requests: list[tuple[str, tools_pb2.ExecuteToolRequest]]
    cancels: list[tools_pb2.CancelToolNotice]
    halted: bool
    state: dict[str, JSON]
    metrics: tuple[dict[Any, float], dict[Any, int]]


def metrics_of(core: Core) -> tuple[dict[Any, float], dict[Any, int]]:
    assert core.parts is not None
    m = core.parts.metrics
    series = m.callback_seconds.series
    return dict(m.requests.values), {k: s.count for k, s in series.items()}


def delta(before: dict[Any, Any], after: dict[Any, Any]) -> dict[Any, Any]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


class Paths:
    """Runs a case through the lone path, then through the general one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.lone_runs = 0
        run_lone = proposals.run_lone

        async def counted(*args: Any, **kwargs: Any) -> None:
            self.lone_runs += 1
            await run_lone(*args, **kwargs)

        monkeypatch.setattr(proposals, "run_lone", counted)

    async def both(self, case: Callable[[], Awaitable[Seen]]) -> tuple[Seen, Seen]:
        lone = await case()
        assert self.lone_runs == 1, "the lone path was not taken"
        with self.monkeypatch.context() as m:
            m.setattr(proposals, "lone_call", lambda proposal: None)
            general = await case()
        assert self.lone_runs == 1, "the general path took the lone one"
        return lone, general


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    return Paths(monkeypatch)


async def submit_on(
    core: Core,
    channel: grpc.aio.Channel,
    proposal: dict[str, JSON],
    tool: Tool,
    *,
    extra: dict[str, JSON] | None = None,
    setup: Callable[[SessionClient], Awaitable[None]] | None = None,
) -> Seen:
    """One submission on a fresh session, its tools answered by `tool`."""
    client = await connect(channel, token=daemon_token(core))
    if setup is not None:
        await setup(client)
    host = ToolHost(client, tool)
    before = metrics_of(core)
    answer: tools_pb2.ProposalResult | tuple[int, str]
    try:
        reply = await client.request("proposal_submit", submit_request(proposal, **(extra or {})))
        answer = timeless(reply.result)
    except CarError as e:
        answer = (e.code, e.message)
    after = metrics_of(core)
    cancels = []
    while not client.notifications.empty():  # sent before the answer: here already
        frame = client.notifications.get_nowait()
        assert frame.WhichOneof("body") == "tools_cancel", frame
        cancels.append(frame.tools_cancel)
    cleared = await client.request("session_clear_halt", session_pb2.ClearHaltRequest())
    snapshot = await client.request("state_snapshot", state_pb2.SnapshotStateRequest())
    requests = list(host.requests)
    await host.close()
    await client.close()
    return Seen(
        answer,
        requests,
        cancels,
        cleared.cleared,
        {k: v for k, v in snapshot.state.fields.items()},
        (delta(before[0], after[0]), delta(before[1], after[1])),
    )


def same(lone: Seen, general: Seen) -> None:
    assert lone.answer == general.answer  # first on its own: the clearer diff
    assert lone == general


def answer_with(output: JSON) -> Tool:
    async def tool(req: tools_pb2.ExecuteToolRequest) -> JSON:
        return output

    return tool


def raising(error: CarError) -> Tool:
    async def tool(req: tools_pb2.ExecuteToolRequest) -> JSON:
        raise error

    return tool


OUTPUT = {"ok": True, "n": 5, "list": [1, "two", None, {"x": -0.5}], "s": "é\u0000"}


@pytest.mark.parametrize(
    ("proposal", "extra"),
    [
        ({"id": "p1", "actions": [call()]}, {}),
        ({"actions": [call()]}, {}),  # a fresh proposal id
        ({"id": "p2", "actions": [call(parameters={"q": [1, {"r": "s"}], "t": "$x"})]}, {}),
        ({"id": "p3", "actions": [call(failure_behavior="skip", idempotent=True)]}, {}),
        ({"id": "p4", "actions": [call()]}, {"session_id": "label-7"}),
    ],
)
async def test_a_tool_calls_answer(
    core: Core,
    channel: grpc.aio.Channel,
    paths: Paths,
    proposal: dict[str, JSON],
    extra: dict[str, JSON],
) -> None:
    tool = answer_with(OUTPUT)
    lone, general = await paths.both(lambda: submit_on(core, channel, proposal, tool, extra=extra))
    same(lone, general)
    assert isinstance(lone.answer, tools_pb2.ProposalResult)
    assert lone.answer.results[0].status == Status.ACTION_STATUS_SUCCEEDED
    assert len(lone.requests) == 1 and not lone.cancels


@pytest.mark.parametrize("behavior", ["abort", "skip"])
async def test_a_client_error_fails_the_action(
    core: Core, channel: grpc.aio.Channel, paths: Paths, behavior: str
) -> None:
    tool = raising(CarError(-32000, "tool broke"))
    proposal = {"id": "p", "actions": [call(failure_behavior=behavior)]}
    lone, general = await paths.both(lambda: submit_on(core, channel, proposal, tool))
    same(lone, general)
    assert isinstance(lone.answer, tools_pb2.ProposalResult)
    assert lone.answer.results[0].error == "tool broke" and not lone.halted


async def test_a_terminal_error_halts_the_session(
    core: Core, channel: grpc.aio.Channel, paths: Paths
) -> None:
    tool = raising(terminal_error("disk gone"))
    proposal = {"id": "p", "actions": [call()]}
    lone, general = await paths.both(lambda: submit_on(core, channel, proposal, tool))
    same(lone, general)
    assert isinstance(lone.answer, tools_pb2.ProposalResult)
    assert lone.answer.results[0].terminal and lone.halted


async def test_a_policy_rejects_the_call(
    core: Core, channel: grpc.aio.Channel, paths: Paths
) -> None:
    async def deny(client: SessionClient) -> None:
        policy = state_pb2.PolicyDefinition(
            name="no-t",
            kind=state_pb2.POLICY_KIND_DENY_TOOL_PARAM,
            target="t",
            key="p",
            pattern="rm",
        )
        await client.request("policy_register", state_pb2.RegisterPolicyRequest(policy=policy))

    tool = answer_with(1)
    for params in ({"p": "rm -rf"}, {"p": "ls"}):
        proposal = {"id": "p", "actions": [call(parameters=params)]}
        lone, general = await paths.both(
            functools.partial(submit_on, core, channel, proposal, tool, setup=deny)
        )
        same(lone, general)
        paths.lone_runs = 0
    assert isinstance(lone.answer, tools_pb2.ProposalResult)


OTHER_SHAPES: list[tuple[dict[str, JSON], bool]] = [  # (proposal, refused by plan)
    ({"actions": [call(), call(id="b")]}, False),
    ({"actions": [call(timeout_ms=5000)]}, False),
    ({"actions": [call(failure_behavior="retry", max_retries=0)]}, False),
    ({"actions": [call(preconditions=[{"key": "k", "operator": "not_exists"}])]}, False),
    ({"actions": [call(state_dependencies=["k"])]}, False),
    ({"actions": [{"id": "a", "type": "state_read", "parameters": {"key": "k"}}]}, False),
    ({"actions": [call(dependencies=["a"])]}, True),  # a cycle
    ({"actions": [call(parameters={"x": ["$a.output"]})]}, True),  # a cycle
    ({"actions": [call(parameters={"x": "$b.output"})]}, True),  # no such action
    ({"actions": [call(tool="")]}, True),
    ({"actions": [call(id="")]}, True),
]


async def test_other_shapes_and_a_halted_session_take_the_general_path(
    core: Core, channel: grpc.aio.Channel, paths: Paths
) -> None:
    client = await connect(channel, token=daemon_token(core))
    host = ToolHost(client, answer_with(1))
    for proposal, refused in OTHER_SHAPES:
        if refused:
            with pytest.raises(CarError) as err:
                await client.request("proposal_submit", submit_request(proposal))
            assert err.value.code == INVALID_PARAMS
        else:
            await client.request("proposal_submit", submit_request(proposal))
    assert paths.lone_runs == 0
    await host.close()
    # Halted: the action skipped, no call, answered by the general path.
    host = ToolHost(client, raising(terminal_error("gone")))
    await client.request("proposal_submit", submit_request({"actions": [call()]}))
    assert paths.lone_runs == 1
    halted = await client.request("proposal_submit", submit_request({"actions": [call()]}))
    assert paths.lone_runs == 1
    assert halted.result.results[0].status == Status.ACTION_STATUS_SKIPPED
    await host.close()
    await client.close()


async def test_the_backstop_timeout_cancels_the_call(tmp_path: Path, paths: Paths) -> None:
    async with (
        running_core(make_config(tmp_path, tool_timeout=0.2).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):

        async def never(req: tools_pb2.ExecuteToolRequest) -> JSON:
            await asyncio.Event().wait()

        proposal = {"id": "p", "actions": [call()]}
        lone, general = await paths.both(lambda: submit_on(core, channel, proposal, never))
    same(lone, general)
    assert isinstance(lone.answer, tools_pb2.ProposalResult)
    assert lone.answer.results[0].error == "tool 't' callback timed out (0.2s)"
    assert [(c.action_id, c.reason) for c in lone.cancels] == [("a", "timeout")]


async def test_the_handler_deadline_cancels_the_call(tmp_path: Path, paths: Paths) -> None:
    async with (
        running_core(make_config(tmp_path, handler_timeout=0.3).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):

        async def never(req: tools_pb2.ExecuteToolRequest) -> JSON:
            await asyncio.Event().wait()

        proposal = {"id": "p", "actions": [call()]}
        lone, general = await paths.both(lambda: submit_on(core, channel, proposal, never))
    same(lone, general)
    assert isinstance(lone.answer, tuple) and "handler deadline exceeded" in lone.answer[1]
    assert [(c.action_id, c.reason) for c in lone.cancels] == [("a", "proposal cancelled")]


async def test_the_client_gone_mid_call(
    core: Core, channel: grpc.aio.Channel, paths: Paths
) -> None:
    """The typed SubmitProposal bound to a session whose stream ends with the call
    pending: the answer says the session closed."""
    token = daemon_token(core)

    async def case() -> Seen:
        client = SessionClient(channel)
        auth = await client.request("session_auth", session_pb2.AuthenticateRequest(token=token))
        meta = (("authorization", f"Bearer {token}"), ("car-session-id", auth.session_id))
        before = metrics_of(core)
        req = submit_request({"id": "p", "actions": [call()]})
        submitted = tools_pb2_grpc.ToolServiceStub(channel).SubmitProposal(req, metadata=meta)
        frame = await client.next_server_request()
        await client.close()  # the stream gone with the callback pending
        reply = await asyncio.wait_for(submitted, 10)
        return Seen(
            timeless(reply.result),
            [(frame.id, frame.tools_execute)],
            [],
            False,
            {},
            (delta(before[0], metrics_of(core)[0]), delta(before[1], metrics_of(core)[1])),
        )

    lone, general = await paths.both(case)
    same(lone, general)
    assert isinstance(lone.answer, tools_pb2.ProposalResult)
    assert lone.answer.results[0].error == "tool 't' callback failed: session closed"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Core, Gateway]]:
    async with running(make_config(tmp_path)) as pair:
        yield pair


async def test_through_the_gateway_the_answer_text_is_the_same(
    served: tuple[Core, Gateway], paths: Paths
) -> None:
    """A bridged session (car-grpc's gateway): the result's text, byte for byte but the
    clock's fields, for an answer, an error answer and a terminal one."""
    core, gateway = served

    async def case(answer: JSON) -> Seen:
        async with rpc(gateway.url) as client:
            await client.login(daemon_token(core))
            sent = asyncio.create_task(
                client.call(
                    "proposal.submit",
                    {"proposal": {"id": "p", "actions": [call(parameters={"k": [1, 2]})]}},
                )
            )
            request = await client.expect_request("tools.execute")
            await client.send({"jsonrpc": "2.0", "id": request["id"], **answer})
            reply = await sent
            result = reply.get("result")
            if result is not None:
                for item in result["results"]:
                    item["timestamp"] = item["duration_ms"] = 0
                result["cost"]["total_duration_ms"] = 0
            return Seen(reply, [(request["id"], request["params"])], [], False, {}, ({}, {}))

    for answer in (
        {"result": {"z": 1, "a": [True, None, 2.5, "x"]}},
        {"error": {"code": -32000, "message": "no"}},
        {"error": {"code": -32000, "message": "gone", "data": {"terminal": True}}},
    ):
        lone, general = await paths.both(functools.partial(case, answer))
        same(lone, general)
        paths.lone_runs = 0
