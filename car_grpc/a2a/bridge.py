"""An A2A task is a chat with the agent (docs/protocol.md, "A2A").

`ChatExecutor` is the a2a-sdk AgentExecutor of every attached agent: the message's text
parts (and data parts, as JSON) become the chat's prompt and its image parts attachments;
the chat runs as `ChatService.Chat` does for a host (car_grpc.core.chats), its host a
one-task session of the caller; then

    token             -> an artifact update (one `reply` artifact, chunk by chunk)
    approval_pending  -> input-required (a host resolves it: agents.chat.approve)
    approval_resolved -> working
    done              -> completed       error -> failed       auth_required -> auth-required

CancelTask cancels the chat at the agent. A task runs at most `task_timeout` seconds and
its reply is at most `reply_max_bytes`; a caller runs at most `tasks_per_caller` at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import Counter
from dataclasses import dataclass

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types.a2a_pb2 import Message, Part, Task, TaskState, TaskStatus
from a2a.utils.errors import InvalidParamsError
from google.protobuf.json_format import MessageToDict

from car_grpc.a2a.tasks import Owner
from car_grpc.core.chats import Chats, GoalScope, check_attachments
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.session import Role as SessionRole
from car_grpc.v1 import chats_pb2
from car_grpc.wire.errors import CarError

log = logging.getLogger(__name__)

#: The artifact a chat's reply is streamed into.
REPLY_ARTIFACT = "reply"
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


@dataclass(frozen=True)
class BridgeLimits:
    task_timeout: float
    reply_max_bytes: int
    tasks_per_caller: int


def chat_session_id(task_id: str) -> str:
    """The chat session of an A2A task: every message of the task continues it."""
    return f"a2a-{task_id}"


def chat_request(agent_id: str, task_id: str, message: Message) -> chats_pb2.ChatRequest:
    """The chat an A2A message asks for; InvalidParamsError naming the part that cannot
    be carried."""
    prompt: list[str] = []
    request = chats_pb2.ChatRequest(agent_id=agent_id, session_id=chat_session_id(task_id))
    for i, part in enumerate(message.parts):
        content = part.WhichOneof("content")
        if content == "text":
            prompt.append(part.text)
        elif content == "data":
            prompt.append(json.dumps(MessageToDict(part.data), separators=(",", ":")))
        elif content in ("raw", "url") and part.media_type in IMAGE_TYPES:
            attachment = request.attachments.add(media_type=part.media_type)
            if content == "raw":
                attachment.type = chats_pb2.ATTACHMENT_TYPE_IMAGE_BASE64
                attachment.data = base64.b64encode(part.raw).decode()
            else:
                attachment.type = chats_pb2.ATTACHMENT_TYPE_IMAGE_URL
                attachment.url = part.url
        else:
            raise InvalidParamsError(
                message=f"message.parts[{i}]: only text, data and image (png, jpeg, gif, "
                "webp) parts can be carried to the agent"
            )
    request.prompt = "\n".join(prompt)
    if not request.prompt.strip():
        raise InvalidParamsError(message="message.parts: the message has no text for the agent")
    try:
        check_attachments(request.attachments)
    except CarError as e:
        raise InvalidParamsError(message=f"message.parts: {e.message}") from None
    return request


@dataclass(eq=False)
class _Running:
    """A task whose chat runs."""

    updater: TaskUpdater
    cancelled: bool = False
    reply_bytes: int = 0
    chunks: int = 0


class ChatExecutor(AgentExecutor):
    def __init__(self, chats: Chats, registry: SessionRegistry, limits: BridgeLimits) -> None:
        self._chats = chats
        self._registry = registry
        self.limits = limits
        self._running: dict[str, _Running] = {}
        #: Tasks running per caller.
        self._per_caller: Counter[str] = Counter()

    def running_for(self, caller: str) -> int:
        return self._per_caller[caller]

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        owner = Owner.of(context.call_context)
        task_id, context_id = context.task_id, context.context_id
        assert task_id and context_id and context.message is not None
        updater = TaskUpdater(event_queue, task_id, context_id)
        if context.current_task is None:
            await event_queue.enqueue_event(
                Task(
                    id=task_id,
                    context_id=context_id,
                    status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                    history=[context.message],
                )
            )
        if self._per_caller[owner.caller] >= self.limits.tasks_per_caller:
            limit = self.limits.tasks_per_caller
            await updater.reject(_agent_text(updater, f"too many tasks: {limit} run at once"))
            return
        request = chat_request(owner.agent_id, task_id, context.message)
        running = _Running(updater)
        self._running[task_id] = running
        self._per_caller[owner.caller] += 1
        try:
            await self._chat(owner, request, running)
        finally:
            del self._running[task_id]
            self._per_caller[owner.caller] -= 1
            if not self._per_caller[owner.caller]:
                del self._per_caller[owner.caller]

    async def _chat(self, owner: Owner, request: chats_pb2.ChatRequest, run: _Running) -> None:
        updater = run.updater
        host = self._registry.open(streaming=False, peer=f"a2a:{owner.caller}")
        host.role = SessionRole.DAEMON
        timeout = self.limits.task_timeout
        try:
            async with asyncio.timeout(timeout):
                # A daemon-role stand-in, but the A2A caller's own goals only: it sets none.
                goals = GoalScope(f"a2a:{owner.caller}", sees_all=False)
                async for item in self._chats.chat_stream(host, request, goals):
                    if item.HasField("accepted"):
                        await updater.start_work()
                    elif run.cancelled or await self._on_event(item.event.event, run):
                        return
        except CarError as e:  # not attached, refused, no ack in time
            await updater.failed(_agent_text(updater, e.message))
            return
        except TimeoutError:
            await updater.failed(_agent_text(updater, f"the task ran past {timeout:g}s"))
            return
        finally:
            await asyncio.shield(self._registry.close(host))
        if not run.cancelled:  # the chat ended without a terminal event of its own
            await updater.failed(_agent_text(updater, "the chat ended without an answer"))

    async def _on_event(self, event: chats_pb2.ChatEvent, run: _Running) -> bool:
        """Carry one chat event to the task; True once the task is settled."""
        updater, kind = run.updater, event.kind
        if kind == "token" and event.delta:
            run.reply_bytes += len(event.delta.encode())
            if run.reply_bytes > self.limits.reply_max_bytes:
                limit = self.limits.reply_max_bytes
                await updater.failed(_agent_text(updater, f"the reply exceeded {limit} bytes"))
                return True
            await updater.add_artifact(
                [Part(text=event.delta)],
                artifact_id=REPLY_ARTIFACT,
                name=REPLY_ARTIFACT,
                append=run.chunks > 0,
            )
            run.chunks += 1
        elif kind == "approval_pending":
            text = (
                f"approval {event.approval_id} is pending: a host resolves it (agents.chat.approve)"
            )
            await updater.requires_input(_agent_text(updater, text))
        elif kind == "approval_resolved":
            await updater.start_work()
        elif kind == "done":
            await updater.complete()
            return True
        elif kind == "error":
            await updater.failed(_agent_text(updater, event.message or "the agent failed"))
            return True
        elif kind == "auth_required":
            await updater.requires_auth(_agent_text(updater, "the agent needs authentication"))
            return True
        return False

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """CancelTask: the chat is cancelled at the agent, the task ends canceled."""
        task_id = context.task_id or ""
        running = self._running.get(task_id)
        if running is not None:
            running.cancelled = True
            chat = self._chats.open.get(chat_session_id(task_id))
            if chat is not None:
                self._chats.end(
                    chat,
                    "chat cancelled by the A2A caller",
                    cancel_agent=True,
                    tell_host=True,
                    kind=None,
                )
            await running.updater.cancel()
            return
        await TaskUpdater(event_queue, task_id, context.context_id or "").cancel()


def _agent_text(updater: TaskUpdater, text: str) -> Message:
    return updater.new_agent_message([Part(text=text)])
