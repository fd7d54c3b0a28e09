"""Attached agents reached over A2A by the official a2a-sdk client (JSON-RPC + SSE and
gRPC): the agent is a real session attached over the WebSocket gateway (JSON-RPC, as
car-runtime speaks it), the caller a real A2A client with a token from a2a-clients."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from a2a.client import (
    A2AClientError,
    AuthInterceptor,
    ClientConfig,
    CredentialService,
    create_client,
)
from a2a.client.client import Client, ClientCallContext
from a2a.types import a2a_pb2_grpc
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetExtendedAgentCardRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import InternalError, UnsupportedOperationError

from car_grpc.config import Config
from car_grpc.connection_caps import RETRY_AFTER
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.store import A2aTaskRow
from tests.bounded import WAIT_BOUND, bounded, stopped, until
from tests.conftest import make_config
from tests.postgres_server import PostgresServer
from tests.processes import launch
from tests.test_chats_ws import car_runtime_agent
from tests.ws_helpers import Rpc, rpc, running

AGENT = "agent-1"
COMPLETED = TaskState.TASK_STATE_COMPLETED
WORKING = TaskState.TASK_STATE_WORKING


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, chat_ack_timeout=2.0)


class Token(CredentialService):
    """The caller's bearer token, for the card's `bearer` scheme."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(
        self, security_scheme_name: str, context: ClientCallContext | None
    ) -> str | None:
        return self.token


async def caller_token(core: Core, name: str = "peer") -> str:
    assert core.parts is not None and core.parts.a2a is not None
    return await core.parts.a2a.callers.add(name)


@contextlib.asynccontextmanager
async def attached(gateway: Gateway, core: Core, agent_id: str = AGENT) -> AsyncIterator[Rpc]:
    """A session attached as `agent_id` over the WebSocket gateway."""
    assert core.parts is not None
    token = await core.parts.agent_tokens.add(agent_id)
    async with rpc(gateway.url) as agent:
        await agent.login(token, agent_id=agent_id)
        yield agent


@contextlib.asynccontextmanager
async def a2a_client(
    core: Core,
    token: str,
    *,
    transport: str = "JSONRPC",
    agent_id: str = AGENT,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[Client]:
    """An a2a-sdk client that resolved the agent's card and speaks `transport` (over
    `http`, if given)."""
    config = ClientConfig(
        supported_protocol_bindings=[transport],
        grpc_channel_factory=grpc.aio.insecure_channel,
        httpx_client=http,
    )
    client = await create_client(
        f"{core.a2a_url}/a2a/{agent_id}", config, interceptors=[AuthInterceptor(Token(token))]
    )
    try:
        yield client
    finally:
        await client.close()


def user_message(text: str, **fields: Any) -> Message:
    return Message(
        role=Role.ROLE_USER, message_id=f"m-{text[:8]}", parts=[Part(text=text)], **fields
    )


async def take_chat(agent: Rpc) -> dict[str, Any]:
    """Accept the next agent.chat; its params."""
    request = await agent.expect_request("agent.chat")
    await agent.answer(request, {"accepted": True})
    params: dict[str, Any] = request["params"]
    return params


async def say(agent: Rpc, session_id: str, kind: str, **fields: Any) -> None:
    await agent.notify("agent.chat.event", {"session_id": session_id, "kind": kind, **fields})


def reply_text(task: Task) -> str:
    return "".join(p.text for a in task.artifacts for p in a.parts)


@pytest.mark.parametrize("transport", ["JSONRPC", "GRPC"])
async def test_a_message_streams_the_reply_token_by_token_and_the_task_is_kept(
    served: tuple[Core, Gateway], transport: str
) -> None:
    core, gateway = served
    token = await caller_token(core)
    async with contextlib.AsyncExitStack() as stack:
        agent = await stack.enter_async_context(attached(gateway, core))
        client = await stack.enter_async_context(a2a_client(core, token, transport=transport))
        card = await client.get_extended_agent_card(GetExtendedAgentCardRequest())
        assert card.name == AGENT and "bearer" in card.security_schemes
        updates: list[StreamResponse] = []

        async def read() -> None:
            async for item in client.send_message(SendMessageRequest(message=user_message("hi"))):
                updates.append(item)

        reader = asyncio.create_task(read())
        chat = await take_chat(agent)
        assert chat["prompt"] == "hi" and chat["session_id"].startswith("a2a-")
        for delta in ("Hel", "lo", "!"):
            await say(agent, chat["session_id"], "token", delta=delta)
        await say(agent, chat["session_id"], "done")
        await asyncio.wait_for(reader, 10)
        chunks = [
            u.artifact_update.artifact.parts[0].text
            for u in updates
            if u.HasField("artifact_update")
        ]
        assert chunks == ["Hel", "lo", "!"]
        assert updates[-1].status_update.status.state == COMPLETED
        task_id = updates[-1].status_update.task_id
        await agent.close()  # the task outlives the agent's session
        task = await client.get_task(GetTaskRequest(id=task_id))
    assert task.status.state == COMPLETED and reply_text(task) == "Hello!"
    assert task.history[0].parts[0].text == "hi"


async def task_id_of(agent: Rpc, chat: dict[str, Any]) -> str:
    session_id: str = chat["session_id"]
    return session_id.removeprefix("a2a-")


@pytest.mark.parametrize("transport", ["JSONRPC", "GRPC"])
async def test_cancel_task_cancels_the_chat_at_the_agent(
    served: tuple[Core, Gateway], transport: str
) -> None:
    core, gateway = served
    token = await caller_token(core)
    async with (
        attached(gateway, core) as agent,
        a2a_client(core, token, transport=transport) as client,
    ):
        stream = client.send_message(SendMessageRequest(message=user_message("work long")))
        first = asyncio.create_task(next_of(stream))
        chat = await take_chat(agent)
        await say(agent, chat["session_id"], "token", delta="partial")
        await asyncio.wait_for(first, 10)
        task_id = await task_id_of(agent, chat)
        cancelled = await client.cancel_task(CancelTaskRequest(id=task_id))
        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        notice = await agent.expect_notification("agent.chat.cancel")
        assert notice == {"session_id": chat["session_id"]}
        await cast(AsyncGenerator[StreamResponse, None], stream).aclose()
        stored = await client.get_task(GetTaskRequest(id=task_id))
        assert stored.status.state == TaskState.TASK_STATE_CANCELED
        assert core.parts is not None and chat["session_id"] not in core.parts.chats.open


@pytest.mark.parametrize("transport", ["JSONRPC", "GRPC"])
async def test_a_wrong_or_missing_peer_token_is_refused(
    served: tuple[Core, Gateway], transport: str
) -> None:
    core, gateway = served
    await caller_token(core)
    async with attached(gateway, core) as agent:
        for token in ("not-a-token", ""):
            async with a2a_client(core, token, transport=transport) as client:
                with pytest.raises(A2AClientError) as refused:
                    await anext(client.send_message(SendMessageRequest(message=user_message("x"))))
                assert (
                    "401" in str(refused.value) or "unauthenticated" in str(refused.value).lower()
                )
        assert await agent.queued() == []  # nothing reached the agent
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{core.a2a_url}/a2a/{AGENT}", json={"jsonrpc": "2.0"})
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")


async def test_a_removed_caller_is_refused_at_once(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    token = await caller_token(core, "leaving")
    assert core.parts is not None and core.parts.a2a is not None
    async with attached(gateway, core), a2a_client(core, token) as client:
        assert await core.parts.a2a.callers.remove("leaving")
        with pytest.raises(A2AClientError, match="401"):
            await client.get_task(GetTaskRequest(id="any"))


async def jsonrpc(
    core: Core, agent_id: str, token: str, method: str, params: Any, version: str | None = "1.0"
) -> Any:
    """One A2A JSON-RPC request, as a peer without the SDK sends it (`version`: its
    A2A-Version header; None sends none, as a v0.3 client does)."""
    headers = {"Authorization": f"Bearer {token}"}
    if version is not None:
        headers["A2A-Version"] = version
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{core.a2a_url}/a2a/{agent_id}",
            json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
            headers=headers,
        )
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_an_agent_that_is_not_attached_gets_a_precise_a2a_error(
    served: tuple[Core, Gateway],
) -> None:
    core, _ = served
    token = await caller_token(core)
    async with httpx.AsyncClient() as http:
        card = await http.get(f"{core.a2a_url}/a2a/ghost/.well-known/agent-card.json")
    assert card.status_code == 404 and card.json() == {"error": "agent 'ghost' is not attached"}
    message = {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hello?"}]}
    answer = await jsonrpc(core, "ghost", token, "SendMessage", {"message": message})
    assert "agent 'ghost' is not attached" in answer["error"]["message"], answer
    answer = await jsonrpc(core, "ghost", token, "GetTask", {"id": "nope"})
    assert answer["error"]["code"] == -32001, answer  # TaskNotFound
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SendMessage(
                SendMessageRequest(tenant="ghost", message=user_message("hello?")),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "agent 'ghost' is not attached" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetTask(GetTaskRequest(tenant="ghost", id="x"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tasks_belong_to_their_caller_and_agent(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    mine, theirs = await caller_token(core, "me"), await caller_token(core, "them")
    async with attached(gateway, core) as agent, a2a_client(core, mine) as client:
        reader = asyncio.create_task(
            drain(client.send_message(SendMessageRequest(message=user_message("q"))))
        )
        chat = await take_chat(agent)
        await say(agent, chat["session_id"], "done")
        await asyncio.wait_for(reader, 10)
        task_id = await task_id_of(agent, chat)
        listed = await client.list_tasks(ListTasksRequest())
        assert [t.id for t in listed.tasks] == [task_id]
    answer = await jsonrpc(core, AGENT, theirs, "GetTask", {"id": task_id})
    assert answer["error"]["code"] == -32001
    answer = await jsonrpc(core, "other-agent", mine, "GetTask", {"id": task_id})
    assert answer["error"]["code"] == -32001
    answer = await jsonrpc(core, AGENT, mine, "GetTask", {"id": task_id})
    assert answer["result"]["status"]["state"] == "TASK_STATE_COMPLETED"


async def next_of(stream: AsyncIterator[StreamResponse]) -> StreamResponse:
    return await anext(stream)


async def drain(stream: AsyncIterator[StreamResponse]) -> list[StreamResponse]:
    return [item async for item in stream]


@pytest.mark.parametrize("transport", ["JSONRPC", "GRPC"])
async def test_subscribe_to_task_resumes_a_running_task(
    served: tuple[Core, Gateway], transport: str
) -> None:
    core, gateway = served
    token = await caller_token(core)
    async with (
        attached(gateway, core) as agent,
        a2a_client(core, token, transport=transport) as client,
    ):
        request = SendMessageRequest(
            message=user_message("go"),
            configuration=SendMessageConfiguration(return_immediately=True),
        )
        sending = asyncio.create_task(next_of(client.send_message(request)))
        chat = await take_chat(agent)
        first = await asyncio.wait_for(sending, 10)
        task_id = first.task.id or first.status_update.task_id
        assert task_id == await task_id_of(agent, chat)
        await say(agent, chat["session_id"], "token", delta="one ")
        resumed = client.subscribe(SubscribeToTaskRequest(id=task_id))
        snapshot = await asyncio.wait_for(anext(resumed), 10)
        assert snapshot.task.id == task_id
        rest = asyncio.create_task(drain(resumed))
        await say(agent, chat["session_id"], "token", delta="two")
        await say(agent, chat["session_id"], "done")
        updates = await asyncio.wait_for(rest, 10)
        seen = reply_text(snapshot.task) + "".join(
            u.artifact_update.artifact.parts[0].text
            for u in updates
            if u.HasField("artifact_update")
        )
        assert seen.endswith("two") and "one " in seen
        assert updates[-1].status_update.status.state == COMPLETED
        task = await client.get_task(GetTaskRequest(id=task_id))
        assert reply_text(task) == "one two"


async def test_tasks_survive_a_restart_and_one_left_running_ends_failed(config: Config) -> None:
    async with running(config) as (core, gateway):
        token = await caller_token(core)
        async with attached(gateway, core) as agent, a2a_client(core, token) as client:
            reader = asyncio.create_task(
                drain(client.send_message(SendMessageRequest(message=user_message("one"))))
            )
            chat = await take_chat(agent)
            await say(agent, chat["session_id"], "token", delta="kept")
            await say(agent, chat["session_id"], "done")
            await asyncio.wait_for(reader, 10)
            done_id = await task_id_of(agent, chat)
            stream = client.send_message(SendMessageRequest(message=user_message("two")))
            started = asyncio.create_task(next_of(stream))
            chat = await take_chat(agent)
            await asyncio.wait_for(started, 10)
            left_id = await task_id_of(agent, chat)
            # The server stops while the second task runs.
            await stopped(core.stop(grace=0))
    async with running(config) as (core, _):
        answer = await jsonrpc(core, AGENT, token, "GetTask", {"id": done_id})
        assert answer["result"]["status"]["state"] == "TASK_STATE_COMPLETED"
        assert answer["result"]["artifacts"][0]["parts"] == [{"text": "kept"}]
        answer = await jsonrpc(core, AGENT, token, "GetTask", {"id": left_id})
        status = answer["result"]["status"]
        # Its chat ended with the stop (the agent's connection went, or the task was
        # cancelled): either way it failed, and says why.
        assert status["state"] == "TASK_STATE_FAILED" and status["message"]["parts"][0]["text"]


async def test_a_task_a_crash_left_running_ends_failed_at_start(config: Config) -> None:
    running_task = Task(id="t-crash", context_id="c", status=TaskStatus(state=WORKING))
    async with running(config) as (core, _):
        token = await caller_token(core)
        assert core.parts is not None
        # As a crash leaves it: stored as working, with no chat behind it.
        await core.parts.store.a2a_tasks.put(
            A2aTaskRow("t-crash", AGENT, "peer", "c", WORKING, 1, running_task.SerializeToString())
        )
    async with running(config) as (core, _):
        answer = await jsonrpc(core, AGENT, token, "GetTask", {"id": "t-crash"})
    status = answer["result"]["status"]
    assert status["state"] == "TASK_STATE_FAILED"
    assert status["message"]["parts"][0]["text"] == "the server stopped while the task ran"


async def test_agent_going_away_fails_the_task_and_approvals_ask_for_input(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    token = await caller_token(core)
    async with a2a_client_when_attached(gateway, core, token) as (agent, client):
        reader = asyncio.create_task(
            drain(client.send_message(SendMessageRequest(message=user_message("risky"))))
        )
        chat = await take_chat(agent)
        await say(agent, chat["session_id"], "approval_pending", approval_id="ap-1")
        await say(agent, chat["session_id"], "approval_resolved", approval_id="ap-1")
        await agent.close()
        updates = await asyncio.wait_for(reader, 10)
    states = [u.status_update.status.state for u in updates if u.HasField("status_update")]
    assert states == [
        TaskState.TASK_STATE_WORKING,
        TaskState.TASK_STATE_INPUT_REQUIRED,
        TaskState.TASK_STATE_WORKING,
        TaskState.TASK_STATE_FAILED,
    ]
    assert "disconnected" in updates[-1].status_update.status.message.parts[0].text


@contextlib.asynccontextmanager
async def a2a_client_when_attached(
    gateway: Gateway, core: Core, token: str
) -> AsyncIterator[tuple[Rpc, Client]]:
    async with attached(gateway, core) as agent, a2a_client(core, token) as client:
        yield agent, client


async def test_bounds_body_size_running_tasks_per_caller_reply_size_and_time(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        a2a_max_body_bytes=2048,
        a2a_tasks_per_caller=1,
        a2a_reply_max_bytes=8,
        a2a_task_timeout=1.0,
    )
    async with running(config) as (core, gateway):
        token = await caller_token(core)
        async with httpx.AsyncClient() as http:
            url = f"{core.a2a_url}/a2a/{AGENT}"
            big = await http.post(
                url, content=b"x" * 4096, headers={"Authorization": f"Bearer {token}"}
            )
            assert big.status_code == 413 and "over 2048 bytes" in big.text

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b" " * 1024

            streamed = await http.post(
                url, content=chunked(), headers={"Authorization": f"Bearer {token}"}
            )
            assert "Payload too large" in streamed.text, streamed.text
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SendMessage(
                    SendMessageRequest(tenant=AGENT, message=user_message("x" * 4096)),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "request over 2048 bytes (a2a_max_body_bytes)"
        async with a2a_client_when_attached(gateway, core, token) as (agent, client):
            first = asyncio.create_task(
                drain(client.send_message(SendMessageRequest(message=user_message("a"))))
            )
            chat = await take_chat(agent)
            with pytest.raises(UnsupportedOperationError, match="too many tasks: 1 run at once"):
                await drain(client.send_message(SendMessageRequest(message=user_message("b"))))
            await say(agent, chat["session_id"], "token", delta="0123456789")
            updates = await asyncio.wait_for(first, 10)
            failed = updates[-1].status_update.status
            assert failed.state == TaskState.TASK_STATE_FAILED
            assert failed.message.parts[0].text == "the reply exceeded 8 bytes"
            assert await agent.expect_notification("agent.chat.cancel")
            # The agent never answers this one: the task fails when its time is up.
            slow = asyncio.create_task(
                drain(client.send_message(SendMessageRequest(message=user_message("c"))))
            )
            await take_chat(agent)
            updates = await asyncio.wait_for(slow, 10)
            failed = updates[-1].status_update.status
            assert failed.message.parts[0].text == "the task ran past 1s"


async def test_a2a_http_requests_count_under_max_sessions_and_past_it_get_503(
    tmp_path: Path,
) -> None:
    """An A2A request over HTTP is held as a stream of the core's while it is served (its
    SSE stream as long as it streams): with the agent's session and two streams held, a
    core of max_sessions 3 refuses the next request with 503 and Retry-After, naming the
    limit, and takes requests again once a stream ends."""
    config = make_config(tmp_path, max_sessions=3)
    async with running(config) as (core, gateway):
        assert core.parts is not None
        registry = core.parts.registry
        token = await caller_token(core)
        async with a2a_client_when_attached(gateway, core, token) as (agent, client):
            assert registry.streamed == 1  # the agent's session
            sending = client.send_message(SendMessageRequest(message=user_message("go")))
            first = asyncio.create_task(next_of(sending))
            chat = await take_chat(agent)
            await asyncio.wait_for(first, 10)
            task_id = await task_id_of(agent, chat)
            resumed = client.subscribe(SubscribeToTaskRequest(id=task_id))
            assert (await asyncio.wait_for(anext(resumed), 10)).task.id == task_id
            assert registry.streamed == 3
            async with httpx.AsyncClient() as http:
                refused = await http.post(
                    f"{core.a2a_url}/a2a/{AGENT}",
                    json={
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "GetTask",
                        "params": {"id": task_id},
                    },
                    headers={"Authorization": f"Bearer {token}"},
                )
            assert (refused.status_code, refused.headers["Retry-After"]) == (503, str(RETRY_AFTER))
            message = (
                "too many streams: the core holds at most 3 sessions and streams (max_sessions)"
            )
            assert refused.json()["error"] == {"code": -32603, "message": message}
            await cast(AsyncGenerator[StreamResponse, None], resumed).aclose()  # the client goes
            await until(lambda: registry.streamed == 2, "the subscription's slot freed")
            assert (await client.get_task(GetTaskRequest(id=task_id))).id == task_id
            await say(agent, chat["session_id"], "done")
            updates = await asyncio.wait_for(drain(sending), 10)
            assert updates[-1].status_update.status.state == COMPLETED
        await until(lambda: registry.streamed == 0, "every slot freed")


def rss_bytes() -> int:
    """This process's resident memory (the core is served in it), from /proc."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_reader_that_stops_reading_ends_its_stream_and_the_core_holds_little(
    tmp_path: Path,
) -> None:
    """A `message/stream` reader that reads the task, then nothing while the agent streams
    a 9 MiB reply in 64 KiB tokens. The a2a-sdk kept, with each event queued for such a
    reader, a copy of the whole task (the reply so far): here the core grew by some
    570 MiB. Now the core holds at most 256 events / 1 MiB behind a reader, then ends its
    stream: its memory grows by the reply's passing copies (some 90 MiB here), and
    the reader gets the documented resubscribe error before the reply's end. Over SSE the
    sockets take a few MiB first (the kernel's, not the core's); the reader's receive
    buffer is fixed so that it does not grow to take more."""
    config = make_config(tmp_path, a2a_reply_max_bytes=16 * 1024 * 1024)
    tokens, delta = 144, "y" * 64 * 1024
    fixed = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)]
    transport = httpx.AsyncHTTPTransport(socket_options=fixed)
    async with (
        running(config) as (core, gateway),
        httpx.AsyncClient(transport=transport, timeout=WAIT_BOUND) as http,
        attached(gateway, core) as agent,
        a2a_client(core, token := await caller_token(core), http=http) as client,
        a2a_client(core, token) as asking,
    ):
        stream = client.send_message(SendMessageRequest(message=user_message("long")))
        first = asyncio.create_task(next_of(stream))
        chat = await take_chat(agent)
        task_id = (await bounded(first)).task.id
        gc.collect()
        before = rss_bytes()
        for _ in range(tokens):
            await say(agent, chat["session_id"], "token", delta=delta)
        await say(agent, chat["session_id"], "done")

        async def completed() -> None:  # every token taken from the agent
            task = await asking.get_task(GetTaskRequest(id=task_id))
            while task.status.state != COMPLETED:
                await asyncio.sleep(0.05)
                task = await asking.get_task(GetTaskRequest(id=task_id))

        await bounded(completed(), "the task's completion")
        gc.collect()
        grown = rss_bytes() - before
        assert grown < 192 * 1024 * 1024, f"the core grew {grown >> 20} MiB for an unread stream"
        chunks = 0
        with pytest.raises(InternalError, match=r"fell more than 256 events .* resubscribe"):
            async for update in stream:
                chunks += update.HasField("artifact_update")
    assert 0 < chunks < tokens


def readme_example() -> str:
    """The Python block under `<!-- a2a-example -->` in README.md."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme.split("<!-- a2a-example -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_example_talks_to_an_attached_agent(
    served: tuple[Core, Gateway], tmp_path: Path
) -> None:
    core, gateway = served
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {
        **os.environ,
        "A2A_AGENT_URL": f"{core.a2a_url}/a2a/my-agent",
        "A2A_TOKEN": await caller_token(core, "my-peer"),
    }
    async with (
        attached(gateway, core, "my-agent") as agent,
        launch([sys.executable, str(script)], env=env, stdout=True) as example,
    ):
        chat = await take_chat(agent)
        assert chat["prompt"] == "Hello!"
        for delta in ("Hi ", "there"):
            await say(agent, chat["session_id"], "token", delta=delta)
        await say(agent, chat["session_id"], "done")
        code, out = await example.output(30)
    assert code == 0, example.log
    assert out.splitlines()[-2:] == ["Hi there", "[TASK_STATE_COMPLETED]"]


async def test_v0_3_method_names_are_served_as_aliases(served: tuple[Core, Gateway]) -> None:
    core, gateway = served
    token = await caller_token(core)
    message = {"role": "user", "messageId": "m-03", "parts": [{"kind": "text", "text": "old"}]}
    async with attached(gateway, core) as agent:
        sending = asyncio.create_task(
            jsonrpc(core, AGENT, token, "message/send", {"message": message}, version=None)
        )
        chat = await take_chat(agent)
        assert chat["prompt"] == "old"
        await say(agent, chat["session_id"], "token", delta="still works")
        await say(agent, chat["session_id"], "done")
        answer = await asyncio.wait_for(sending, 10)
    task = answer["result"]
    assert task["kind"] == "task" and task["status"]["state"] == "completed", answer
    got = await jsonrpc(core, AGENT, token, "tasks/get", {"id": task["id"]}, version=None)
    assert got["result"]["artifacts"][0]["parts"] == [{"kind": "text", "text": "still works"}]


async def test_a_follow_up_message_continues_an_auth_required_task_in_the_same_chat_session(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    token = await caller_token(core)
    async with a2a_client_when_attached(gateway, core, token) as (agent, client):
        first = asyncio.create_task(
            drain(client.send_message(SendMessageRequest(message=user_message("first"))))
        )
        chat = await take_chat(agent)
        await say(agent, chat["session_id"], "auth_required")
        updates = await asyncio.wait_for(first, 10)
        paused = updates[-1].status_update
        assert paused.status.state == TaskState.TASK_STATE_AUTH_REQUIRED
        follow_up = user_message("signed in", task_id=paused.task_id, context_id=paused.context_id)
        second = asyncio.create_task(
            drain(client.send_message(SendMessageRequest(message=follow_up)))
        )
        again = await take_chat(agent)
        assert again["session_id"] == chat["session_id"] and again["prompt"] == "signed in"
        await say(agent, again["session_id"], "token", delta="ok")
        await say(agent, again["session_id"], "done")
        await asyncio.wait_for(second, 10)
        task = await client.get_task(GetTaskRequest(id=paused.task_id))
    assert task.status.state == COMPLETED and reply_text(task) == "ok"
    assert [m.parts[0].text for m in task.history if m.role == Role.ROLE_USER] == [
        "first",
        "signed in",
    ]


async def test_the_card_says_what_the_agent_registered_and_how_to_reach_it(
    served: tuple[Core, Gateway],
) -> None:
    core, gateway = served
    async with attached(gateway, core) as agent:
        await agent.result(
            "host.register_agent",
            {"id": AGENT, "name": "Helper", "kind": "assistant", "capabilities": ["search"]},
        )
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{core.a2a_url}/a2a/{AGENT}/.well-known/agent-card.json")
    card = answer.json()
    assert card["name"] == "Helper" and "(assistant)" in card["description"]
    assert [s["id"] for s in card["skills"]] == ["chat", "search"]
    assert card["supportedInterfaces"] == [
        {
            "url": f"{core.a2a_url}/a2a/{AGENT}",
            "protocolBinding": "JSONRPC",
            "protocolVersion": "1.0",
        },
        {
            "url": core.grpc_address,
            "protocolBinding": "GRPC",
            "protocolVersion": "1.0",
            "tenant": AGENT,
        },
    ]
    assert card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
    assert card["securityRequirements"] == [{"schemes": {"bearer": {}}}]
    assert card["capabilities"]["streaming"] is True


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_long_reply_is_written_in_few_commits_on_either_store(
    tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """200 tokens: each reaches the caller, the store takes far fewer writes (a streamed
    reply is held back between changes of state), and the stored reply is whole."""
    overrides: dict[str, object] = {}
    if store == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        overrides["store"] = server.create_database("a2a")
    async with running(make_config(tmp_path, **overrides)) as (core, gateway):
        token = await caller_token(core)
        assert core.parts is not None
        database = getattr(core.parts.store, "database", None)
        async with a2a_client_when_attached(gateway, core, token) as (agent, client):
            reader = asyncio.create_task(
                drain(client.send_message(SendMessageRequest(message=user_message("long"))))
            )
            chat = await take_chat(agent)
            before = getattr(database, "committed_writes", 0)
            for n in range(200):
                await say(agent, chat["session_id"], "token", delta=f"{n} ")
            await say(agent, chat["session_id"], "done")
            updates = await asyncio.wait_for(reader, 30)
            writes = getattr(database, "committed_writes", 0) - before
            task = await client.get_task(GetTaskRequest(id=updates[-1].status_update.task_id))
    assert sum(u.HasField("artifact_update") for u in updates) == 200
    assert reply_text(task) == "".join(f"{n} " for n in range(200))
    assert len(task.artifacts[0].parts) == 1  # stored joined
    if store == "sqlite":
        assert writes < 40, writes


@pytest.mark.parametrize("transport", ["JSONRPC", "GRPC"])
async def test_a_car_runtime_agent_answers_an_a2a_client(
    served: tuple[Core, Gateway], tmp_path: Path, transport: str
) -> None:
    """Neither end is ours: the official car-runtime client is the agent (it streams back
    the agent.chat params it got, in four tokens), the a2a-sdk client the caller."""
    core, gateway = served
    token = await caller_token(core)
    async with (
        car_runtime_agent(core, gateway, tmp_path / "agent-home", "rt-agent"),
        a2a_client(core, token, transport=transport, agent_id="rt-agent") as client,
    ):
        request = SendMessageRequest(message=user_message("hello from A2A"))
        updates = await asyncio.wait_for(drain(client.send_message(request)), 20)
        chunks = [
            u.artifact_update.artifact.parts[0].text
            for u in updates
            if u.HasField("artifact_update")
        ]
        assert len(chunks) == 4
        asked = json.loads("".join(chunks))
        assert asked["prompt"] == "hello from A2A" and asked["session_id"].startswith("a2a-")
        assert updates[-1].status_update.status.state == COMPLETED
        task = await client.get_task(GetTaskRequest(id=updates[-1].status_update.task_id))
        assert json.loads(reply_text(task)) == asked


async def test_an_a2a_chat_carries_no_goal_another_token_stored_for_its_session(
    served: tuple[Core, Gateway],
) -> None:
    """The A2A caller is no daemon: a standing goal someone else set (here with the
    daemon token) for its task's chat session is not forwarded into its chat."""
    core, gateway = served
    token = await caller_token(core)
    assert core.parts is not None and core.parts.tokens is not None
    async with (
        a2a_client_when_attached(gateway, core, token) as (agent, client),
        rpc(gateway.url) as daemon,
    ):
        await daemon.login(core.parts.tokens.daemon)
        first = asyncio.create_task(
            drain(client.send_message(SendMessageRequest(message=user_message("first"))))
        )
        chat = await take_chat(agent)
        session_id = chat["session_id"]
        await say(agent, session_id, "auth_required")
        paused = (await asyncio.wait_for(first, 10))[-1].status_update
        await daemon.result("goal.set", {"session_id": session_id, "check": "not yours"})
        follow_up = user_message("again", task_id=paused.task_id, context_id=paused.context_id)
        second = asyncio.create_task(
            drain(client.send_message(SendMessageRequest(message=follow_up)))
        )
        again = await take_chat(agent)
        assert again["session_id"] == session_id and "goal" not in again
        await say(agent, session_id, "done")
        await asyncio.wait_for(second, 10)
        stored = await daemon.result("goal.status", {"session_id": session_id})
        assert stored["goal"]["status"] == "active"  # no chat of the caller's ran it
