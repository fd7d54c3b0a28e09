"""A remote A2A agent for the A2UI tests, on software nobody here wrote: the a2a-sdk server
(its DefaultRequestHandler, JSON-RPC routes and in-memory task store) served by uvicorn,
running its own AgentExecutor, which answers with an A2UI surface built with the A2UI
agent SDK's builder (a2ui-agent-sdk).

The first message of a task gets a booking form (a Card with a Text and a Button whose
action is `book`) in a data part, and the task waits for input. A message carrying a
`{"a2uiAction": ...}` data part in that task is recorded and answered with an update of
the form's text; the task then completes. Every request's headers are recorded (what the
test checks the bearer credential against).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from a2a.helpers.proto_helpers import get_data_parts, new_data_part, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2
from a2ui.builder.v0_9 import Action, ActionEvent, Button, Card, Column, ComponentTree, Text
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

SURFACE = "booking"
#: The ids the builder gives the form's question and its button (prefixed by the root's).
QUESTION = "root__question"
BUTTON = "root__book"


def booking_form() -> list[dict[str, Any]]:
    """The A2UI messages of the booking form (createSurface, then its components)."""
    tree = ComponentTree(
        Card(
            child=Column(
                children=[
                    Text(id="question", text="Book a table for two?"),
                    Button(
                        id="book",
                        child=Text(id="book_label", text="Book"),
                        action=Action(event=ActionEvent(name="book", context={"seats": 2})),
                    ),
                ]
            )
        )
    )
    return [
        {"version": "v0.9", "createSurface": {"surfaceId": SURFACE}},
        {
            "version": "v0.9",
            "updateComponents": {"surfaceId": SURFACE, "components": tree.flatten()},
        },
    ]


def booked(seats: Any) -> list[dict[str, Any]]:
    text = {"id": QUESTION, "component": "Text", "text": f"Booked for {seats}."}
    return [{"version": "v0.9", "updateComponents": {"surfaceId": SURFACE, "components": [text]}}]


@dataclass
class Seen:
    """What the remote agent received."""

    #: The headers of every HTTP request, lowercase names.
    headers: list[dict[str, str]] = field(default_factory=list)
    #: (task id, context id, the a2uiAction) of every action delivered.
    actions: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    #: Task ids of the tasks started.
    tasks: list[str] = field(default_factory=list)
    #: Set when an action arrives.
    action_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set at shutdown: a slow agent stops waiting, so no task of it outlives the server.
    release: asyncio.Event = field(default_factory=asyncio.Event)


class SurfaceAgent(AgentExecutor):
    def __init__(self, seen: Seen, *, delay: float = 0.0) -> None:
        self.seen = seen
        self.delay = delay

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.seen.release.wait(), self.delay)
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(message)
            await event_queue.enqueue_event(task)
            self.seen.tasks.append(task.id)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        actions = [d["a2uiAction"] for d in get_data_parts(message.parts) if "a2uiAction" in d]
        if not actions:
            parts = [new_data_part(m) for m in booking_form()]
            await updater.requires_input(updater.new_agent_message(parts))
            return
        action = actions[0]
        self.seen.actions.append((task.id, task.context_id, action))
        self.seen.action_arrived.set()
        seats = action.get("context", {}).get("seats")
        seats = int(seats) if isinstance(seats, float) and seats.is_integer() else seats
        await updater.complete(updater.new_agent_message([new_data_part(m) for m in booked(seats)]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


class _RecordHeaders:
    def __init__(self, app: ASGIApp, seen: Seen) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.headers.append(
                {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            )
        await self.app(scope, receive, send)


@dataclass
class RemoteAgent:
    url: str
    seen: Seen


@contextlib.asynccontextmanager
async def remote_agent(*, delay: float = 0.0) -> AsyncIterator[RemoteAgent]:
    """The agent on an ephemeral loopback port; `url` is its JSON-RPC endpoint."""
    seen = Seen()
    card = a2a_pb2.AgentCard(
        name="booking agent",
        description="answers with an A2UI booking form",
        version="1.0",
        default_input_modes=["text/plain"],
        default_output_modes=["application/json"],
    )
    handler = DefaultRequestHandler(SurfaceAgent(seen, delay=delay), InMemoryTaskStore(), card)
    app = _RecordHeaders(Starlette(routes=create_jsonrpc_routes(handler, "/a2a")), seen)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    )
    # A listening socket of our own: its port is known, and a connection made before the
    # server runs waits in the backlog.
    sock = socket.create_server(("127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        port = sock.getsockname()[1]
        yield RemoteAgent(f"http://127.0.0.1:{port}/a2a", seen)
    finally:
        seen.release.set()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 5)
        sock.close()
        await handler.aclose()  # the SDK's own shutdown: no task of it outlives the server
