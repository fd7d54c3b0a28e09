"""Agent runs (docs/protocol.md §4): a run's lifecycle, its durable trace and its live readers.

A run is `in_progress` from runs.start until runs.complete (`completed`) or until the
connection that owns it has been gone for Config.run_complete_grace (`incomplete`).
Every in-progress run of this process is in `Runs.live`, with the one lock that orders
its writes: each write is decided, committed to the store and fanned out under that lock,
so readers see records in commit order and a decision (limit, terminal) never races an
append. The sections that change a run run to the end even when their request is
cancelled (disconnect, deadline): a commit is never left half-applied in memory.

Readers: `runs.subscribe` (a snapshot plus `runs.trace.event` notifications through a
bounded per-subscription queue that drops its oldest events when full, so the newest
event, and with it the cursor gap and the final `ended`, always arrives), `WatchRun`
(reads the store from a cursor and waits for appends: a slow reader simply reads later),
`runs.get_trace` and `runs.list`.

Authorization (declared per method in session.proto, refined here): an attached agent
opens runs only as itself, an unattached session as any agent. Turns are written only by
a session attached as the run's agent (the host token does not write); a run is completed
by that agent or by the session that started it (a one-shot script without an agent
identity). A run is resumed through its idempotency key only by the same two, and never
taken from another live session. The run's agent and host-role sessions read. Everyone
else gets the same answer as for an unknown run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import TypeAlias, TypeVar

from google.protobuf.message import Message

from car_grpc.clock import now_ms
from car_grpc.core.background import Background
from car_grpc.core.metrics import Metrics
from car_grpc.core.router import Reply, handles, streams
from car_grpc.core.run_turns import DEFAULT_VERDICT, KEPT, TOO_LARGE, capped
from car_grpc.core.session import ClientSession, Role, SessionClosed
from car_grpc.store.repositories import RunRow, RunStore, StoreConflict, StoreUnavailable
from car_grpc.v1 import runs_pb2, session_pb2
from car_grpc.wire import api, batch, turn_text
from car_grpc.wire.codec import enum_to_json, to_value
from car_grpc.wire.errors import (
    INTERNAL,
    INVALID_PARAMS,
    CarError,
    failed_precondition,
    field_error,
    invalid_params,
    not_found,
    permission_denied,
    require,
)
from car_grpc.wire.twins import fill_out

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TURNS_PER_RUN = 2000
MAX_TURNS_PER_BATCH = 256
#: started + every turn + ended.
MAX_RECORDS_PER_RUN = MAX_TURNS_PER_RUN + 2
#: The -32602 message of every malformed runs.record_turns (declared in runs.proto).
RECORD_TURNS_USAGE = api.params_usage(runs_pb2.RecordTurnsRequest.DESCRIPTOR)
#: Records WatchRun reads from the store at a time.
_WATCH_PAGE = 256
#: How long WatchRun waits for an append before it looks at the run again.
_WATCH_RECHECK = 30.0

IN_PROGRESS = runs_pb2.RUN_STATUS_IN_PROGRESS
COMPLETED = runs_pb2.RUN_STATUS_COMPLETED
INCOMPLETE = runs_pb2.RUN_STATUS_INCOMPLETE
STARTED = runs_pb2.RUN_RECORD_KIND_STARTED
TURN = runs_pb2.RUN_RECORD_KIND_TURN
ENDED = runs_pb2.RUN_RECORD_KIND_ENDED
RunStatus: TypeAlias = runs_pb2.RunStatus.ValueType
DropReason: TypeAlias = runs_pb2.RunDropReason.ValueType


def slug(name: str) -> str:
    """Lowercase words joined by "-": "My Agent!" -> "my-agent"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def may_write(session: ClientSession, agent_id: str) -> bool:
    """Writes are owner-only: the session must be attached as the run's agent."""
    return session.role is Role.AGENT and session.agent_id == agent_id


def may_complete(session: ClientSession, run: LiveRun) -> bool:
    """The run's agent, or the session that started it."""
    return may_write(session, run.agent_id) or run.starter_id == session.id


def _not_found(run_id: str, answer: Message | None = None) -> CarError:
    message = f"invalid params: unknown run {run_id!r}: run_id"
    return not_found(INVALID_PARAMS, message, answer=answer)


def _usage_error(field: str) -> CarError:
    return CarError(INVALID_PARAMS, RECORD_TURNS_USAGE, to_value({"field": field}))


def ended_record(
    status: RunStatus, outcome: runs_pb2.RunOutcome | None = None
) -> runs_pb2.RunRecord:
    record = runs_pb2.RunRecord(record=ENDED, timestamp=now_ms())
    record.ended.status = status
    if outcome is not None:
        record.ended.outcome.CopyFrom(outcome)
    return record


class Subscription:
    """One session's `runs.subscribe` to one run.

    An event goes straight into the session's queue when it fits there without waiting
    and nothing of the subscription waits before it; otherwise it waits in a bounded
    queue that a pump drains into the session (waiting on the session's own
    backpressure). When that queue is full the oldest event is dropped: the recorder
    never waits, and the subscriber sees the jump in cursors.
    """

    def __init__(self, runs: Runs, session: ClientSession, run_id: str) -> None:
        self.runs = runs
        self.session = session
        self.run_id = run_id
        #: `runs.trace.event` frames serialized once for every subscriber of the run, and
        #: whether each is the run's end.
        self.events: collections.deque[tuple[bytes, bool]] = collections.deque(
            maxlen=runs.subscriber_queue
        )
        self.dropped = 0
        self._ready = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._stopped = False

    def offer(self, event: tuple[bytes, bool]) -> None:
        if not self.events and self._pump is not None and not self._stopped and self._put(event):
            return
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
            self.runs.metrics.queue_drops.inc("run_subscriber")
        self.events.append(event)
        self._ready.set()

    def offer_all(self, events: Sequence[tuple[bytes, bool]]) -> None:
        """offer() of each event, in order: those that fit go into the session's queue
        in one step (a batch of 256 turns makes 256 events)."""
        taken = 0
        if not self.events and self._pump is not None and not self._stopped:
            taken = self._put_all(events)
        for i in range(taken, len(events)):
            self.offer(events[i])

    def _put_all(self, events: Sequence[tuple[bytes, bool]]) -> int:
        """_put() of events from the first on, while each fits: how many went."""
        session = self.session
        if session.closed.is_set() or not session.streaming:
            return 0
        # Up to the run's end, if it is among them: nothing goes after it (_put stops).
        upto = next((i + 1 for i, (_, ended) in enumerate(events) if ended), len(events))
        taken = session.outbound.put_many_nowait([frame for frame, _ in events[:upto]])
        if taken and events[taken - 1][1]:
            self.stop()
            self.runs.forget(self)
        return taken

    def _put(self, event: tuple[bytes, bool]) -> bool:
        """Queue `event` for the session at once when it fits without waiting (and nothing
        of this subscription waits before it): no hop through the pump. False: it did
        not fit, the pump takes it in its turn."""
        session = self.session
        if session.closed.is_set() or not session.streaming:
            return False
        frame, ended = event
        try:
            session.outbound.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        if ended:
            self.stop()
            self.runs.forget(self)
        return True

    def start(self) -> None:
        """Start delivering (called once the snapshot response is queued)."""
        if not self._stopped and self._pump is None:
            self._pump = asyncio.create_task(self._deliver())

    def stop(self) -> None:
        self._stopped = True
        if self._pump is not None:
            self._pump.cancel()

    async def _deliver(self) -> None:
        with contextlib.suppress(SessionClosed):
            while True:
                await self._ready.wait()  # ends with the session or the subscription
                self._ready.clear()
                while self.events:
                    frame, ended = self.events.popleft()
                    await self.session.send(frame)
                    if ended:
                        self.runs.forget(self)
                        return


@dataclass(frozen=True)
class StoredTurns:
    """Turns appended together as the store keeps them: their RunRecords serialized (kind
    turn, one timestamp, indexes from `first_index`), by turn_records."""

    records: list[bytes]
    timestamp: int
    first_index: int


#: RunRecord's `turn` and RunTurn's `index`: their tags.
_TURN_TAG = batch.varint(runs_pb2.RunRecord.DESCRIPTOR.fields_by_name["turn"].number << 3 | 2)
_INDEX_TAG = batch.varint(runs_pb2.RunTurn.DESCRIPTOR.fields_by_name["index"].number << 3)


def turn_records(turns: Sequence[bytes], first_index: int, timestamp: int) -> StoredTurns:
    """The records of serialized turns as stored (kind turn, `timestamp`, each turn's index
    from `first_index`; the turns have none of their own, capped() clears it): each turn's
    bytes with its index before them, not a copy of the turn in a RunRecord serialized
    again (a third of the cost; bench/README.md, turns5). The index is RunTurn's first
    field and the turn RunRecord's last set, so this is the bytes serializing gives."""
    head = runs_pb2.RunRecord(record=TURN, timestamp=timestamp).SerializeToString() + _TURN_TAG
    varint = batch.varint
    records = []
    for i, data in enumerate(turns):
        index = varint(first_index + i)
        size = varint(len(_INDEX_TAG) + len(index) + len(data))
        records.append(b"".join((head, size, _INDEX_TAG, index, data)))
    return StoredTurns(records, timestamp, first_index)


#: A fan-out held for after an answer: the records, the first one's cursor, their texts,
#: and the run's status and subscribers when they were published (LiveRun.publish).
_Fanout: TypeAlias = tuple[
    Sequence[runs_pb2.RunRecord] | StoredTurns,
    int,
    Sequence[str | None],
    RunStatus,
    list[Subscription],
]


class LiveRun:
    """An in-progress run of this process (and, once ended, its last state)."""

    def __init__(self, row: RunRow, owner: ClientSession | None) -> None:
        self.run_id = row.run_id
        self.agent_id = row.agent_id
        self.status: RunStatus = row.status
        self.turn_count = row.turn_count
        self.record_count = row.record_count
        #: The connection whose close makes the run incomplete (None: a one-call session).
        self.owner = owner
        #: The session that opened the run (it may complete it).
        self.starter_id = owner.id if owner is not None else ""
        self.lock = asyncio.Lock()
        self.subscribers: dict[str, Subscription] = {}
        #: Set (and replaced) after every commit: wakes WatchRun readers.
        self.appended = asyncio.Event()
        #: WatchRun readers of a run held by another core (see Runs.remote).
        self.watchers = 0
        #: The fan-out held until its recorder's answer is written (`publish(after_answer)`;
        #: one at most), with the run's status and subscribers when it was published.
        self._held: _Fanout | None = None

    def publish(
        self,
        records: Sequence[runs_pb2.RunRecord] | StoredTurns,
        first_cursor: int,
        texts: Sequence[str | None] = (),
        *,
        after_answer: bool = False,
    ) -> None:
        """Fan committed records out to subscribers and watchers (never waits). `texts`:
        for each record, the JSON members of its turn after `index` (turn_text.py) when
        known, for the subscribers behind car-grpc's gateway. `after_answer`: the
        subscribers' events are built and queued by `release()`, which the caller runs
        once its answer is queued (the recorder's answer need not wait for the fan-out;
        its events keep their place: anything published later releases them first)."""
        self.release()  # what an earlier answer held goes first: at most one is held
        fanout = (records, first_cursor, texts, self.status, list(self.subscribers.values()))
        if after_answer and fanout[4]:
            self._held = fanout
        else:
            self._fan_out(*fanout)
        woken, self.appended = self.appended, asyncio.Event()
        woken.set()

    def release(self) -> None:
        """Fan out what `publish` held for after an answer (none: nothing)."""
        if (held := self._held) is not None:
            self._held = None
            self._fan_out(*held)

    def _fan_out(
        self,
        records: Sequence[runs_pb2.RunRecord] | StoredTurns,
        first_cursor: int,
        texts: Sequence[str | None],
        status: RunStatus,
        subs: list[Subscription],
    ) -> None:
        if subs:
            # What every event of this call shares, serialized once.
            head = runs_pb2.RunTraceEvent(
                run_id=self.run_id, agent_id=self.agent_id, status=status
            ).SerializeToString()
            bridged = [sub.session.bridged for sub in subs]
            typed = not all(bridged)  # some subscriber takes the event as protobuf
            count = len(records.records) if isinstance(records, StoredTurns) else len(records)
            text_head = text_tail = ""
            if len(texts) == count and any(bridged):
                text_head = turn_text.event_head(self.run_id, self.agent_id)
                text_tail = turn_text.event_tail(enum_to_json(_STATUS_ENUM, status))
            # Every subscriber behind car-grpc's gateway (the usual record_turns fan-out):
            # all take the same events, so one list serves them all.
            offers: list[list[tuple[bytes, bool]]] = [[] for _ in (subs if typed else subs[:1])]
            for i in range(count):
                cursor = first_cursor + i
                if isinstance(records, StoredTurns):
                    ended, timestamp, index = False, records.timestamp, records.first_index + i
                else:
                    record = records[i]
                    ended, timestamp, index = (
                        record.record == ENDED,
                        record.timestamp,
                        record.turn.index,
                    )
                members = texts[i] if text_head else None
                # Each encoding built once, for every subscriber that takes it.
                as_text = None
                if members is not None:
                    text = turn_text.event_text(
                        text_head, timestamp, index, members, cursor, text_tail
                    )
                    as_text = (_text_event(text), ended)
                if as_text is not None and not typed:
                    full = as_text
                elif isinstance(records, StoredTurns):
                    full = (_turn_event(head, records.records[i], cursor), ended)
                else:
                    full = (_trace_event(head, records[i], cursor), ended)
                if not typed:
                    offers[0].append(full)
                    continue
                for events, text_ok in zip(offers, bridged, strict=True):
                    events.append(as_text if text_ok and as_text is not None else full)
            for sub, events in zip(subs, offers if typed else offers * len(subs), strict=True):
                sub.offer_all(events)


#: ServerFrame's `runs_trace_event` and RunTraceEvent's `record`: their field numbers.
_TRACE_EVENT_FIELD = session_pb2.ServerFrame.DESCRIPTOR.fields_by_name["runs_trace_event"].number
_RECORD_FIELD = runs_pb2.RunTraceEvent.DESCRIPTOR.fields_by_name["record"].number
_PARAMS_TEXT_FIELD = runs_pb2.RunTraceEvent.DESCRIPTOR.fields_by_name["params_text"].number
_STATUS_ENUM = runs_pb2.RunStatus.DESCRIPTOR


_TRACE_EVENT_TAG = batch.varint(_TRACE_EVENT_FIELD << 3 | 2)
_PARAMS_TEXT_TAG = batch.varint(_PARAMS_TEXT_FIELD << 3 | 2)


def _text_event(params: str) -> bytes:
    """The serialized ServerFrame `runs_trace_event` of the event whose JSON params are
    `params`, for car-grpc's gateway (RunTraceEvent.params_text alone)."""
    # In one join, not two nested length_delimited (256 events a batch).
    body = params.encode()
    size = batch.varint(len(body))
    event_size = batch.varint(len(_PARAMS_TEXT_TAG) + len(size) + len(body))
    return b"".join((_TRACE_EVENT_TAG, event_size, _PARAMS_TEXT_TAG, size, body))


def _trace_event(head: bytes, record: runs_pb2.RunRecord, cursor: int) -> bytes:
    """The serialized ServerFrame `runs_trace_event` of `record` at `cursor`; `head` is the
    serialized RunTraceEvent of the run's id, agent and status.

    A turn is the hot path (a batch of 256 makes 256 events): its frame is put together
    from serialized parts rather than copied into a new message and walked by fill_out
    (a third less, bench/README.md). A turn has no typed twins, so fill_out would change
    nothing (test_runs_fanout checks). Any other record takes the ordinary way.
    """
    if record.record != TURN:
        message = runs_pb2.RunTraceEvent.FromString(head)
        message.record.CopyFrom(record)
        message.cursor = cursor
        return fill_out(session_pb2.ServerFrame(runs_trace_event=message)).SerializeToString()
    return _turn_event(head, record.SerializeToString(), cursor)


def _turn_event(head: bytes, record: bytes, cursor: int) -> bytes:
    """_trace_event of a turn's serialized record."""
    event = (
        head
        + batch.length_delimited(_RECORD_FIELD, record)
        + runs_pb2.RunTraceEvent(cursor=cursor).SerializeToString()
    )
    return batch.length_delimited(_TRACE_EVENT_FIELD, event)


class _SessionRuns:
    """What one session holds in the runs domain, released when it closes."""

    def __init__(self) -> None:
        self.subscriptions: dict[str, Subscription] = {}
        self.owned: set[str] = set()


class Runs:
    """The runs domain: live runs, their writes and their readers. `subscriber_queue`
    bounds each runs.subscribe queue; a run whose connection closed ends `incomplete`
    after `complete_grace` seconds."""

    def __init__(
        self,
        store: RunStore,
        metrics: Metrics,
        *,
        subscriber_queue: int,
        subscriptions_per_session: int,
        complete_grace: float,
        auth_enabled: bool,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.subscriber_queue = subscriber_queue
        self._subscriptions_per_session = subscriptions_per_session
        self._complete_grace = complete_grace
        self._auth_enabled = auth_enabled
        self.live: dict[str, LiveRun] = {}
        self._sessions: dict[str, _SessionRuns] = {}
        self._resuming = asyncio.Lock()
        #: Work that must finish although its request may be cancelled.
        self._background = Background(log)
        #: Pending `incomplete` timers of runs whose connection closed.
        self._graces: set[asyncio.Task[None]] = set()
        #: In a cluster: told the id of each run with new committed records (the other
        #: cores' readers then read them from the store). None for a core of its own.
        self.committed: Callable[[str], None] | None = None
        #: Runs in progress on another core of the cluster that readers here follow: their
        #: records are read from the store as that core says it has committed more
        #: (`appended_elsewhere`), under the run's lock, in order, and fanned out here.
        self.remote: dict[str, LiveRun] = {}

    # ------------------------------------------------------------ plumbing

    def may_read(self, session: ClientSession, agent_id: str) -> bool:
        """The run's agent or a host-role session; anyone when auth is off (no role can be
        proven then, and the dashboard must still see every run)."""
        return session.is_host or not self._auth_enabled or may_write(session, agent_id)

    async def recover(self) -> None:
        """End the runs a previous process left open (at start-up)."""
        abandoned = await self.store.abandon_open(ended_record(INCOMPLETE))
        if abandoned:
            log.info(
                "runs: %d run(s) left open by a previous process marked incomplete",
                len(abandoned),
            )

    def _told(self, run_id: str) -> None:
        if self.committed is not None:
            self.committed(run_id)

    # ------------------------------------------------------------ runs of other cores

    def _remote_run(self, row: RunRow) -> LiveRun:
        run = self.remote.get(row.run_id)
        if run is None:
            run = self.remote[row.run_id] = LiveRun(row, None)
        return run

    def _drop_if_idle(self, run: LiveRun) -> None:
        idle = not run.subscribers and not run.watchers
        if (idle or run.status != IN_PROGRESS) and self.remote.get(run.run_id) is run:
            del self.remote[run.run_id]

    def appended_elsewhere(self, run_id: str) -> None:
        """Another core committed records of `run_id` (or ended it): catch up here."""
        run = self.remote.get(run_id)
        if run is not None:
            self._background.spawn(self._catch_up(run))

    def lost_hold(self) -> None:
        """This core lost its lease and a peer released its runs (ended them in the store):
        they are followed from the store from now on, so their readers here get the
        `ended` the peer wrote, and writes to them are refused as to any ended run."""
        for run_id, run in list(self.live.items()):
            del self.live[run_id]
            self.remote[run_id] = run
            run.owner = None
            self._background.spawn(self._catch_up(run))

    def catch_up_all(self) -> None:
        """After messages may have been lost: catch up every followed run."""
        for run in list(self.remote.values()):
            self._background.spawn(self._catch_up(run))

    async def _catch_up(self, run: LiveRun) -> None:
        async with run.lock:
            await self._catch_up_locked(run)

    async def _catch_up_locked(self, run: LiveRun) -> None:
        """Read the records of a run held elsewhere past those seen, and fan them out."""
        while run.status == IN_PROGRESS:
            records = await self.store.records(run.run_id, run.record_count, _WATCH_PAGE)
            if not records:
                break
            for record in records:
                run.record_count += 1
                if record.record == TURN:
                    run.turn_count += 1
                elif record.record == ENDED:
                    run.status = record.ended.status
                run.publish([record], run.turn_count)
        if run.status != IN_PROGRESS:
            self._drop_if_idle(run)

    def _of(self, session: ClientSession) -> _SessionRuns:
        held = self._sessions.get(session.id)
        if held is None:
            held = self._sessions[session.id] = _SessionRuns()
            session.on_close(self._session_closed)
        return held

    async def _locked(self, run: LiveRun, fn: Callable[[], Awaitable[T]]) -> T:
        return await self._background.to_the_end(self._in_section(run, fn))

    @staticmethod
    async def _in_section(run: LiveRun, fn: Callable[[], Awaitable[T]]) -> T:
        async with run.lock:
            return await fn()

    def _own(self, run: LiveRun, session: ClientSession) -> None:
        if not session.streaming:
            return
        if run.owner is not None and run.owner is not session:
            held = self._sessions.get(run.owner.id)
            if held is not None:
                held.owned.discard(run.run_id)
        run.owner = session
        self._of(session).owned.add(run.run_id)

    # ------------------------------------------------------------ lifecycle

    @handles("runs_start")
    async def start(
        self, session: ClientSession, req: runs_pb2.StartRunRequest
    ) -> runs_pb2.StartRunResponse:
        intent = require(req.intent, "intent")
        agent_id = self._resolve_agent(session, req)
        reply = await self._background.to_the_end(self._open(session, agent_id, intent, req))
        session.current_run = reply.run_id
        return reply

    async def _open(
        self, session: ClientSession, agent_id: str, intent: str, req: runs_pb2.StartRunRequest
    ) -> runs_pb2.StartRunResponse:
        if not req.HasField("idempotency_key"):
            run_id = f"run-{uuid.uuid4().hex}"
            await self._create(session, run_id, agent_id, intent, req)
            return runs_pb2.StartRunResponse(run_id=run_id, agent_id=agent_id)
        run_id = req.idempotency_key
        async with self._resuming:  # one start per key at a time: no duplicate
            resumed = await self._resume(session, run_id)
            if resumed is not None:
                return resumed
            await self._create(session, run_id, agent_id, intent, req)
            return runs_pb2.StartRunResponse(run_id=run_id, agent_id=agent_id)

    def _resolve_agent(self, session: ClientSession, req: runs_pb2.StartRunRequest) -> str:
        attached = session.agent_id if session.role is Role.AGENT else None
        if req.agent_id:
            if attached is not None and req.agent_id != attached:
                raise invalid_params(
                    "invalid params: agent_id does not match the attached agent: agent_id"
                )
            return req.agent_id
        if attached:
            return attached
        if name := slug(req.agent_name):
            return f"name:{name}"
        raise field_error("agent_id", "no agent (give agent_id or agent_name, or attach)")

    async def _resume(
        self, session: ClientSession, run_id: str
    ) -> runs_pb2.StartRunResponse | None:
        """The existing run `run_id` (which becomes the session's if nobody live holds
        it), or None. Only the run's agent or the session that started it may resume."""
        run = self.live.get(run_id)
        if run is not None:
            if not may_complete(session, run):
                raise _may_not_resume()
            owner = run.owner
            if owner is None or owner.closed.is_set() or owner is session:
                self._own(run, session)  # e.g. the agent reconnected within the grace
            return runs_pb2.StartRunResponse(run_id=run_id, agent_id=run.agent_id)
        row = await self.store.get(run_id)
        if row is None:
            return None
        if not may_write(session, row.agent_id):
            raise _may_not_resume()
        return runs_pb2.StartRunResponse(run_id=run_id, agent_id=row.agent_id)

    async def _create(
        self,
        session: ClientSession,
        run_id: str,
        agent_id: str,
        intent: str,
        req: runs_pb2.StartRunRequest,
    ) -> None:
        description = req.outcome_description if req.HasField("outcome_description") else None
        row = RunRow(run_id, agent_id, intent, description, now_ms(), None, IN_PROGRESS, 0, 1)
        started = runs_pb2.RunRecord(
            record=STARTED,
            timestamp=row.started_at,
            started=runs_pb2.RunStarted(
                run_id=run_id,
                agent_id=agent_id,
                intent=intent,
                outcome_description=description,
            ),
        )
        await self.store.create(row, started)
        self._told(run_id)
        run = LiveRun(row, None)
        run.starter_id = session.id
        self.live[run_id] = run
        self._own(run, session)

    @handles("runs_complete")
    async def complete(
        self, session: ClientSession, req: runs_pb2.CompleteRunRequest
    ) -> runs_pb2.CompleteRunResponse:
        run_id = require(req.run_id, "run_id")
        if not req.HasField("outcome"):
            raise field_error("outcome")
        outcome = runs_pb2.RunOutcome()
        outcome.CopyFrom(req.outcome)
        if not outcome.HasField("timestamp"):
            outcome.timestamp = now_ms()
        run = self.live.get(run_id)
        if run is None:
            row = await self.store.get(run_id)
            if row is None or not may_write(session, row.agent_id):
                raise _not_found(run_id)
            raise _already_ended(run_id, row.status)

        async def end() -> None:
            if not may_complete(session, run):
                raise _not_found(run_id)
            if run.status != IN_PROGRESS:
                raise _already_ended(run_id, run.status)
            await self._end(run, ended_record(COMPLETED, outcome))

        await self._locked(run, end)
        return runs_pb2.CompleteRunResponse(run_id=run_id, ok=True)

    async def _end(self, run: LiveRun, ended: runs_pb2.RunRecord) -> None:
        """Append `ended` (under the run's lock) and retire the run."""
        await self.store.end(run.run_id, run.record_count, ended, ended.ended.status)
        self._told(run.run_id)
        run.record_count += 1
        run.status = ended.ended.status
        run.publish([ended], run.turn_count)
        self.live.pop(run.run_id, None)
        if run.owner is not None:
            held = self._sessions.get(run.owner.id)
            if held is not None:
                held.owned.discard(run.run_id)

    async def _session_closed(self, session: ClientSession) -> None:
        held = self._sessions.pop(session.id, None)
        if held is None:
            return
        for sub in held.subscriptions.values():
            self._unregister(sub)
        for run_id in held.owned:
            run = self.live.get(run_id)
            if run is not None:
                grace = self._background.spawn(self._expire(run, session))
                self._graces.add(grace)
                grace.add_done_callback(self._graces.discard)

    async def _expire(self, run: LiveRun, owner: ClientSession) -> None:
        """After the grace, end the run as incomplete unless it was completed or resumed."""
        await asyncio.sleep(self._complete_grace)

        async def end() -> None:
            if run.status == IN_PROGRESS and run.owner is owner:
                await self._end(run, ended_record(INCOMPLETE))

        await self._locked(run, end)

    async def shutdown(self) -> None:
        """Stopping: pending graces are moot, every open run ends incomplete now."""
        for grace in list(self._graces):
            grace.cancel()
        for run in list(self.live.values()):
            async with run.lock:
                if run.status == IN_PROGRESS:
                    try:
                        await self._end(run, ended_record(INCOMPLETE))
                    except (StoreConflict, StoreUnavailable) as e:
                        # Ended already (a cluster peer released it), or the store is
                        # away (the next core to start, or a peer, ends it).
                        log.warning("runs: run %s not ended at shutdown: %s", run.run_id, e)

    # ------------------------------------------------------------ turns

    @handles("runs_record_turns")
    async def record_turns(
        self, session: ClientSession, req: runs_pb2.RecordTurnsRequest
    ) -> runs_pb2.RecordTurnsResponse | Reply:
        if not req.run_id:
            raise _usage_error("run_id")
        if not 1 <= len(req.turns) <= MAX_TURNS_PER_BATCH:
            raise _usage_error("turns")
        run_id = req.run_id
        # Each turn's JSON as the gateway wrote it: trusted from car-grpc's gateway only.
        given = req.turn_texts if session.bridged and len(req.turn_texts) == len(req.turns) else ()
        texts: list[str | None] = []
        turns: list[bytes] = []  # each capped turn, serialized
        for i, turn in enumerate(req.turns):
            defaulted = bool(given) and not turn.HasField("verifier_verdict")
            outcome, data = capped(turn)
            if outcome == TOO_LARGE:
                return _dropped(run_id, runs_pb2.RUN_DROP_REASON_TURN_TOO_LARGE)
            turns.append(data)
            if given:
                texts.append(_turn_members(given[i], defaulted, turn) if outcome == KEPT else None)
        run = self.live.get(run_id)
        if run is None:
            row = await self.store.get(run_id)
            if row is None or not may_write(session, row.agent_id):
                return _dropped(run_id, runs_pb2.RUN_DROP_REASON_RUN_NOT_FOUND)
            return _dropped(run_id, runs_pb2.RUN_DROP_REASON_RUN_TERMINAL)

        async def append() -> runs_pb2.RecordTurnsResponse | Reply:
            if not may_write(session, run.agent_id):
                return _dropped(run_id, runs_pb2.RUN_DROP_REASON_RUN_NOT_FOUND)
            if run.status != IN_PROGRESS:
                return _dropped(run_id, runs_pb2.RUN_DROP_REASON_RUN_TERMINAL)
            base = run.turn_count
            if base + len(turns) > MAX_TURNS_PER_RUN:
                return _dropped(run_id, runs_pb2.RUN_DROP_REASON_RUN_TURN_LIMIT)
            stored = turn_records(turns, base, now_ms())
            await self.store.append(run_id, run.record_count, stored.records)
            self._told(run_id)
            run.turn_count += len(turns)
            run.record_count += len(turns)
            # The events go out once the answer is queued: the recorder's answer does not
            # wait for 256 events to be built and sent (bench/README.md, turns4).
            run.publish(stored, base + 1, texts, after_answer=True)
            answer = runs_pb2.RecordTurnsResponse(
                run_id=run_id, base_index=base, count=len(turns), ok=True
            )
            return Reply(answer, then=run.release, after_written=True)

        # A caller that gave up (its deadline, its stream's end) never queues the answer:
        # the events go out when the write is done, all the same.
        return await self._background.to_the_end(
            self._in_section(run, append), gave_up=_release_held
        )

    # ------------------------------------------------------------ readers

    @handles("runs_subscribe")
    async def subscribe(
        self, session: ClientSession, req: runs_pb2.SubscribeRunRequest
    ) -> runs_pb2.SubscribeRunResponse | Reply:
        run_id = require(req.run_id, "run_id")
        run = self.live.get(run_id)
        if run is None:
            row = await self.store.get(run_id)
            if row is None or not self.may_read(session, row.agent_id):
                raise _not_found(run_id)
            if row.status != IN_PROGRESS or self.committed is None:
                return await self._snapshot(row.run_id, row.agent_id, row.turn_count, row.status)
            run = self._remote_run(row)  # in progress on another core of the cluster
        if not self.may_read(session, run.agent_id):
            raise _not_found(run_id)
        async with run.lock:  # no append between the snapshot and the registration
            if self.remote.get(run_id) is run:
                await self._catch_up_locked(run)
            snapshot = await self._snapshot(run_id, run.agent_id, run.turn_count, run.status)
            if run.status != IN_PROGRESS:
                return snapshot
            held = self._of(session)
            old = held.subscriptions.get(run_id)
            if old is not None:
                self._unregister(old)
            elif len(held.subscriptions) >= (limit := self._subscriptions_per_session):
                raise invalid_params(
                    f"invalid params: too many run subscriptions: "
                    f"run_subscriptions_per_session ({limit})"
                )
            sub = Subscription(self, session, run_id)
            held.subscriptions[run_id] = sub
            run.subscribers[session.id] = sub
        return Reply(snapshot, then=sub.start)

    async def _snapshot(
        self, run_id: str, agent_id: str, turn_count: int, status: RunStatus
    ) -> runs_pb2.SubscribeRunResponse:
        records = await self.store.records(run_id, 1, turn_count) if turn_count else []
        return runs_pb2.SubscribeRunResponse(
            run_id=run_id,
            agent_id=agent_id,
            turns_so_far=[r.turn for r in records],
            cursor=turn_count,
            status=status,
        )

    def _unregister(self, sub: Subscription) -> None:
        sub.stop()
        run = self.live.get(sub.run_id) or self.remote.get(sub.run_id)
        if run is not None and run.subscribers.get(sub.session.id) is sub:
            del run.subscribers[sub.session.id]
        if run is not None and sub.run_id in self.remote:
            self._drop_if_idle(run)

    def forget(self, sub: Subscription) -> None:
        """A subscription delivered its run's `ended`: nothing more will come."""
        held = self._sessions.get(sub.session.id)
        if held is not None and held.subscriptions.get(sub.run_id) is sub:
            del held.subscriptions[sub.run_id]

    @handles("runs_unsubscribe")
    async def unsubscribe(
        self, session: ClientSession, req: runs_pb2.UnsubscribeRunRequest
    ) -> runs_pb2.UnsubscribeRunResponse:
        run_id = require(req.run_id, "run_id")
        held = self._sessions.get(session.id)
        sub = held.subscriptions.pop(run_id, None) if held is not None else None
        if sub is not None:
            self._unregister(sub)
        return runs_pb2.UnsubscribeRunResponse(run_id=run_id, removed=sub is not None)

    @handles("runs_list")
    async def list_runs(
        self, session: ClientSession, req: runs_pb2.ListRunsRequest
    ) -> runs_pb2.ListRunsResponse:
        agent_id = require(req.agent_id, "agent_id")
        reply = runs_pb2.ListRunsResponse(agent_id=agent_id)
        if self.may_read(session, agent_id):
            reply.runs.extend(row.summary() for row in await self.store.list_for_agent(agent_id))
        return reply

    @handles("runs_get_trace")
    async def get_trace(
        self, session: ClientSession, req: runs_pb2.GetTraceRequest
    ) -> runs_pb2.GetTraceResponse:
        run_id = require(req.run_id, "run_id")
        row = await self.store.get(run_id)
        if row is None or not self.may_read(session, row.agent_id):
            # The wire answers with a result; typed calls fail NOT_FOUND.
            raise _not_found(run_id, runs_pb2.GetTraceResponse(run_id=run_id, not_found=True))
        cursor = req.cursor
        limit = (
            min(req.limit, MAX_RECORDS_PER_RUN) if req.HasField("limit") else MAX_RECORDS_PER_RUN
        )
        records = await self.store.records(run_id, cursor, limit) if limit else []
        return runs_pb2.GetTraceResponse(
            run_id=run_id, agent_id=row.agent_id, records=records, cursor=cursor + len(records)
        )

    @streams("WatchRun")
    async def watch(
        self, session: ClientSession, req: runs_pb2.WatchRunRequest
    ) -> AsyncIterator[runs_pb2.WatchRunResponse]:
        """Every record from `req.cursor` on, then each new one, ending after `ended`."""
        run_id = require(req.run_id, "run_id")
        row = await self.store.get(run_id)
        if row is None or not self.may_read(session, row.agent_id):
            raise _not_found(run_id)
        if req.cursor > row.record_count:
            raise field_error("cursor", f"past the end of the run ({row.record_count} records)")
        cursor = req.cursor
        followed: LiveRun | None = None
        if run_id not in self.live and row.status == IN_PROGRESS and self.committed is not None:
            followed = self._remote_run(row)  # in progress on another core
            followed.watchers += 1
        try:
            async for response in self._watch_from(run_id, row.agent_id, cursor):
                yield response
        finally:
            if followed is not None:
                followed.watchers -= 1
                self._drop_if_idle(followed)

    async def _watch_from(
        self, run_id: str, agent_id: str, cursor: int
    ) -> AsyncIterator[runs_pb2.WatchRunResponse]:
        while True:
            run = self.live.get(run_id) or self.remote.get(run_id)
            appended = run.appended if run is not None else None  # taken before the read
            records = await self.store.records(run_id, cursor, _WATCH_PAGE)
            for record in records:
                cursor += 1
                ended = record.record == ENDED
                yield runs_pb2.WatchRunResponse(
                    run_id=run_id,
                    agent_id=agent_id,
                    record=record,
                    cursor=cursor,
                    status=record.ended.status if ended else IN_PROGRESS,
                )
                if ended:
                    return
            if records:
                continue
            if appended is None:
                return  # ended before this read, and everything has been read
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_WATCH_RECHECK):
                    await appended.wait()


_VERDICT_MEMBER = '"verifier_verdict":' + encode_basestring_ascii(DEFAULT_VERDICT)


def _turn_members(text: str, defaulted: bool, turn: runs_pb2.RunTurn) -> str | None:
    """The JSON members of a stored turn after its `index`, from the gateway's JSON object
    of the client's turn (`text`; "" when it wrote none) and the verdict the core added
    when the client gave none (`defaulted`); None when they cannot be had so."""
    if not text:
        return None
    members = text[1:-1]
    if not defaulted:
        return members
    if turn.HasField("policy_rejected"):
        return None  # the verdict's place is before it
    return f"{members},{_VERDICT_MEMBER}" if members else _VERDICT_MEMBER


def _release_held(outcome: runs_pb2.RecordTurnsResponse | Reply) -> None:
    """What a record_turns whose caller gave up had held for after its answer goes out."""
    if isinstance(outcome, Reply):
        outcome.then()


def _dropped(run_id: str, reason: DropReason) -> runs_pb2.RecordTurnsResponse:
    return runs_pb2.RecordTurnsResponse(
        run_id=run_id, base_index=0, count=0, ok=False, dropped=reason
    )


def _already_ended(run_id: str, status: RunStatus) -> CarError:
    name = enum_to_json(runs_pb2.RunStatus.DESCRIPTOR, status)
    return failed_precondition(INTERNAL, f"run {run_id!r} has already ended ({name})")


def _may_not_resume() -> CarError:
    return permission_denied(
        "invalid params: idempotency_key names a run this session may not resume", INVALID_PARAMS
    )
