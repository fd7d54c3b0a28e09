"""The A2A methods inside a session (docs/protocol.md §7b), over a real WebSocket: the
caller is a session of the gateway, the agent a session attached over the gateway, the
A2A request handling the same as the A2A listener's."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.v1 import a2ui_pb2
from car_grpc.wire import codec
from tests.session_client import connect
from tests.test_a2a_e2e import AGENT, attached, caller_token, config, jsonrpc, say, take_chat
from tests.ws_client import Rpc, rpc
from tests.ws_helpers import daemon_token

__all__ = ["config"]  # the fixture of test_a2a_e2e, used here (and by conftest's served)


def message(text: str, **fields: Any) -> dict[str, Any]:
    return {"role": "ROLE_USER", "messageId": f"m-{text}", "parts": [{"text": text}], **fields}


async def send(caller: Rpc, agent: Rpc, text: str, *reply: str) -> dict[str, Any]:
    """SendMessage from `caller`, answered by `agent` with `reply` then done; the task."""
    sending = asyncio.create_task(
        caller.result("SendMessage", {"tenant": AGENT, "message": message(text)})
    )
    chat = await take_chat(agent)
    assert chat["prompt"] == text
    for delta in reply:
        await say(agent, chat["session_id"], "token", delta=delta)
    await say(agent, chat["session_id"], "done")
    answer = await asyncio.wait_for(sending, 10)
    task: dict[str, Any] = answer["task"]
    return task


def reply_of(task: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for a in task.get("artifacts", []) for p in a["parts"])


async def test_a_session_sends_a_message_gets_the_reply_and_alone_sees_its_task(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with (
        attached(gateway, core) as agent,
        rpc(gateway.url) as caller,
        rpc(gateway.url) as other,
    ):
        await caller.login(daemon_token(core))
        await other.login(daemon_token(core))
        task = await send(caller, agent, "hi", "Hel", "lo")
        assert task["status"]["state"] == "TASK_STATE_COMPLETED" and reply_of(task) == "Hello"

        got = await caller.result("GetTask", {"tenant": AGENT, "id": task["id"]})
        assert got["status"]["state"] == "TASK_STATE_COMPLETED" and reply_of(got) == "Hello"
        listed = await caller.result("ListTasks", {"tenant": AGENT})
        assert [t["id"] for t in listed["tasks"]] == [task["id"]]
        card = await caller.result("GetExtendedAgentCard", {"tenant": AGENT})
        assert card["name"] == AGENT

        # Another session (same daemon token) sees nothing of it.
        refused = await other.error("GetTask", {"tenant": AGENT, "id": task["id"]})
        assert refused["code"] == -32602 and refused["data"]["a2a"]["code"] == -32001
        assert (await other.result("ListTasks", {"tenant": AGENT})).get("tasks", []) == []
        refused = await other.error("CancelTask", {"tenant": AGENT, "id": task["id"]})
        assert refused["data"]["a2a"]["code"] == -32001

        # Push notifications are not supported, as on the A2A listener.
        refused = await caller.error(
            "CreateTaskPushNotificationConfig",
            {"tenant": AGENT, "taskId": task["id"], "url": "https://example.com/hook"},
        )
        assert refused["code"] == -32603 and refused["data"]["a2a"]["code"] == -32003
        # The agent is named: without `tenant` the params are wrong, saying so.
        missing = await caller.error("GetTask", {"id": task["id"]})
        assert missing["code"] == -32602 and "tenant" in missing["message"]
    # Nobody can read a closed session's tasks: its finished ones are deleted.
    assert core.parts is not None
    async with asyncio.timeout(5):  # the core closes the session after the socket
        while True:
            if await core.parts.store.a2a_tasks.get(task["id"]) is None:
                break
            await asyncio.sleep(0.02)


async def test_a_session_and_an_a2a_listener_caller_see_none_of_each_others_tasks(
    served: tuple[Core, Gateway],
) -> None:
    """The session's A2A methods and the listener share one dispatcher builder, and each
    call runs as its own caller: the session's task is not the HTTP caller's, nor the
    HTTP caller's task the session's."""
    core, gateway = served
    peer = await caller_token(core)
    async with attached(gateway, core) as agent, rpc(gateway.url) as caller:
        await caller.login(daemon_token(core))
        task = await send(caller, agent, "mine")
        answer = await jsonrpc(core, AGENT, peer, "GetTask", {"id": task["id"]})
        assert answer["error"]["code"] == -32001
        assert (await jsonrpc(core, AGENT, peer, "ListTasks", {}))["result"].get("tasks", []) == []

        sending = asyncio.create_task(
            jsonrpc(core, AGENT, peer, "SendMessage", {"message": message("theirs")})
        )
        chat = await take_chat(agent)
        await say(agent, chat["session_id"], "done")
        theirs = (await asyncio.wait_for(sending, 10))["result"]["task"]
        refused = await caller.error("GetTask", {"tenant": AGENT, "id": theirs["id"]})
        assert refused["data"]["a2a"]["code"] == -32001
        listed = await caller.result("ListTasks", {"tenant": AGENT})
        assert [t["id"] for t in listed["tasks"]] == [task["id"]]


async def test_cancel_task_cancels_a_running_task_and_v0_3_names_work(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with attached(gateway, core) as agent, rpc(gateway.url) as caller:
        await caller.login(daemon_token(core))
        sending = asyncio.create_task(
            caller.result("SendMessage", {"tenant": AGENT, "message": message("long")})
        )
        chat = await take_chat(agent)
        await say(agent, chat["session_id"], "token", delta="partial")
        task_id = chat["session_id"].removeprefix("a2a-")
        cancelled = await caller.result("CancelTask", {"tenant": AGENT, "id": task_id})
        assert cancelled["status"]["state"] == "TASK_STATE_CANCELED"
        assert await agent.expect_notification("agent.chat.cancel") == {
            "session_id": chat["session_id"]
        }
        answer = await asyncio.wait_for(sending, 10)
        assert answer["task"]["status"]["state"] == "TASK_STATE_CANCELED"

        old = {"role": "user", "messageId": "m-03", "parts": [{"kind": "text", "text": "old"}]}
        sending = asyncio.create_task(
            caller.result("message/send", {"tenant": AGENT, "message": old})
        )
        chat = await take_chat(agent)
        assert chat["prompt"] == "old"
        await say(agent, chat["session_id"], "token", delta="still works")
        await say(agent, chat["session_id"], "done")
        task = await asyncio.wait_for(sending, 10)
        assert task["kind"] == "task" and task["status"]["state"] == "completed"
        got = await caller.result("tasks/get", {"tenant": AGENT, "id": task["id"]})
        assert got["artifacts"][0]["parts"] == [{"kind": "text", "text": "still works"}]


async def test_the_grpc_session_stream_serves_them_too(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    assert core.parts is not None and core.parts.tokens is not None
    async with attached(gateway, core) as agent:
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            client = await connect(channel, token=core.parts.tokens.daemon)
            request = a2ui_pb2.A2aSessionRequest(
                tenant=AGENT, params=codec.to_struct({"message": message("grpc")})
            )
            sending = asyncio.create_task(client.request("a2a_send_message", request))
            chat = await take_chat(agent)
            await say(agent, chat["session_id"], "done")
            reply = await asyncio.wait_for(sending, 10)
            await client.close()
        answer: Any = codec.value_to_json(reply.result)
        assert answer["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
