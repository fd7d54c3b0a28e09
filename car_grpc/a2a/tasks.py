"""The a2a-sdk's TaskStore over the store's A2A task repository.

A task belongs to the agent it was sent to and the caller that sent it: it is found, listed
and changed only through that agent's endpoint by that caller (anyone else gets
TaskNotFound). Who is asking is in the call context (`state`, set where the request came
in: car_grpc.a2a.server).

The SDK saves the whole task after every event, so a streamed reply would be one write per
token, each rewriting a task that keeps growing. A save of a task that was already written
as working and still is (a token appended) is therefore held back and written at most
every `flush_interval` seconds; any other save (a change of state: working,
input-required, completed, ...) is written at once, superseding what was held back,
before the caller hears of it. Reads see held-back saves. Stored copies carry each
artifact's adjacent text chunks joined into one part (what a client streaming the chunks
puts together itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from a2a.server.context import ServerCallContext
from a2a.server.tasks import TaskStore
from a2a.types.a2a_pb2 import (
    ListTasksRequest,
    ListTasksResponse,
    Part,
    Role,
    Task,
    TaskState,
)

from car_grpc.clock import now_ms
from car_grpc.store.repositories import A2aTaskRow, A2aTaskStore

log = logging.getLogger(__name__)

#: States a task does not leave.
TERMINAL = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_REJECTED,
    }
)
#: States in which a chat runs the task: a task found in one at start lost its chat.
RUNNING = (
    TaskState.TASK_STATE_SUBMITTED,
    TaskState.TASK_STATE_WORKING,
    TaskState.TASK_STATE_INPUT_REQUIRED,
)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100

#: Keys of ServerCallContext.state.
AGENT_KEY = "car_agent_id"
CALLER_KEY = "car_a2a_caller"


@dataclass(frozen=True)
class Owner:
    agent_id: str
    caller: str

    @classmethod
    def of(cls, context: ServerCallContext) -> Owner:
        return cls(str(context.state.get(AGENT_KEY, "")), str(context.state.get(CALLER_KEY, "")))


@dataclass(frozen=True)
class _Held:
    task: Task
    owner: Owner


def _row(task: Task, owner: Owner) -> A2aTaskRow:
    return A2aTaskRow(
        task.id, owner.agent_id, owner.caller, task.context_id, task.status.state, now_ms(),
        compacted(task).SerializeToString(),
    )  # fmt: skip


def compacted(task: Task) -> Task:
    """A copy of `task` whose artifacts' adjacent plain text parts are joined."""
    out = Task()
    out.CopyFrom(task)
    for artifact in out.artifacts:
        parts: list[Part] = []
        for part in artifact.parts:
            previous = parts[-1] if parts else None
            if previous is not None and _plain_text(previous) and _plain_text(part):
                previous.text += part.text
            else:
                copy = Part()
                copy.CopyFrom(part)
                parts.append(copy)
        del artifact.parts[:]
        artifact.parts.extend(parts)
    return out


def _plain_text(part: Part) -> bool:
    return (
        part.WhichOneof("content") == "text"
        and not part.HasField("metadata")
        and not part.filename
        and part.media_type in ("", "text/plain")
    )


class A2aTasks(TaskStore):
    def __init__(self, store: A2aTaskStore, *, flush_interval: float, keep_per_caller: int) -> None:
        self._store = store
        self._flush_interval = flush_interval
        self._keep = keep_per_caller
        #: Saves held back, by task id (at most one per running task: the latest).
        self._held: dict[str, _Held] = {}
        #: Tasks last written as working: their next saves while still working (a token
        #: appended) are held back. Only a running task is in here.
        self._working: set[str] = set()
        #: Writes of one task take turns (FIFO), so an older save never lands last.
        self._locks: dict[str, asyncio.Lock] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}

    async def save(self, task: Task, context: ServerCallContext) -> None:
        owner = Owner.of(context)
        working = task.status.state == TaskState.TASK_STATE_WORKING
        if working and task.id in self._working:
            # Held as is: serialized only when written (the SDK keeps updating this very
            # object, so what is written then is the latest).
            self._held[task.id] = _Held(task, owner)
            if task.id not in self._flushers:
                self._flushers[task.id] = asyncio.create_task(self._flush_later(task.id))
            return
        async with self._lock(task.id):
            self._held.pop(task.id, None)  # this save is newer
            await self._store.put(_row(task, owner))
        if working:
            self._working.add(task.id)
            return
        self._forget(task.id)
        if task.status.state in TERMINAL:
            await self._store.prune(owner.caller, self._keep, sorted(TERMINAL))

    async def _flush_later(self, task_id: str) -> None:
        try:
            await asyncio.sleep(self._flush_interval)
            async with self._lock(task_id):
                held = self._held.pop(task_id, None)
                if held is not None:
                    await self._store.put(_row(held.task, held.owner))
        except Exception:
            log.exception("writing A2A task %s failed", task_id)
        finally:
            self._flushers.pop(task_id, None)

    def _lock(self, task_id: str) -> asyncio.Lock:
        return self._locks.setdefault(task_id, asyncio.Lock())

    def _forget(self, task_id: str) -> None:
        self._working.discard(task_id)
        lock = self._locks.get(task_id)
        if lock is not None and not lock.locked():
            del self._locks[task_id]
        flusher = self._flushers.pop(task_id, None)
        if flusher is not None:
            flusher.cancel()

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        owner = Owner.of(context)
        held = self._held.get(task_id)
        if held is not None:
            return compacted(held.task) if held.owner == owner else None
        row = await self._store.get(task_id)
        if row is None or not self._owned(row, owner):
            return None
        return Task.FromString(row.task)

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        owner = Owner.of(context)
        size = params.page_size if params.HasField("page_size") else DEFAULT_PAGE_SIZE
        size = min(max(size, 1), MAX_PAGE_SIZE)
        offset = int(params.page_token) if params.page_token.isdigit() else 0
        rows, total = await self._store.page(
            owner.agent_id,
            owner.caller,
            context_id=params.context_id or None,
            state=params.status or None,
            limit=size,
            offset=offset,
        )
        tasks = [self._latest(r) for r in rows]
        after = offset + len(rows)
        return ListTasksResponse(
            tasks=tasks,
            next_page_token=str(after) if after < total else "",
            page_size=size,
            total_size=total,
        )

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        row = await self._store.get(task_id)
        if row is not None and self._owned(row, Owner.of(context)):
            self._held.pop(task_id, None)
            self._forget(task_id)
            await self._store.delete(task_id)

    def _latest(self, row: A2aTaskRow) -> Task:
        held = self._held.get(row.task_id)
        return compacted(held.task) if held is not None else Task.FromString(row.task)

    @staticmethod
    def _owned(row: A2aTaskRow, owner: Owner) -> bool:
        return (row.agent_id, row.caller) == (owner.agent_id, owner.caller)

    async def forget_finished(self, caller: str) -> None:
        """Delete the finished tasks of `caller` (a session that closed: nobody reads them)."""
        await self._store.prune(caller, 0, sorted(TERMINAL))

    async def flush(self) -> None:
        """Write every held-back save now (at shutdown)."""
        for flusher in list(self._flushers.values()):
            flusher.cancel()
        for task_id in list(self._held):
            async with self._lock(task_id):
                held = self._held.pop(task_id, None)
                if held is not None:
                    with contextlib.suppress(Exception):
                        await self._store.put(_row(held.task, held.owner))

    async def fail_unfinished(self, reason: str) -> int:
        """At start: the tasks a stop left running lost their chats; they end failed."""
        rows = await self._store.in_states([int(s) for s in RUNNING])
        for row in rows:
            task = Task.FromString(row.task)
            if task.status.HasField("message"):
                task.history.append(task.status.message)
            task.status.Clear()
            task.status.state = TaskState.TASK_STATE_FAILED
            task.status.timestamp.GetCurrentTime()
            message = task.status.message
            message.message_id = f"{task.id}-restart"
            message.role = Role.ROLE_AGENT
            message.parts.add().text = reason
            await self._store.put(
                A2aTaskRow(
                    row.task_id, row.agent_id, row.caller, row.context_id,
                    TaskState.TASK_STATE_FAILED, now_ms(), task.SerializeToString(),
                )
            )  # fmt: skip
        return len(rows)
