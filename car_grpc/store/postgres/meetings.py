"""MeetingStore on PostgreSQL (schema: migration 5 of database.py).

A meeting row is one car.v1.Meeting, serialized whole in `meeting` (its status and start
are copied out for queries); a transcript is the meeting's rows in `meeting_segments`,
one serialized car.v1.TranscriptSegment each, numbered from 0. The functions below take
a cursor inside a transaction; each method of PostgresMeetingStore is one transaction. A
method that rewrites a meeting reads it `FOR UPDATE`, so that two rewrites of the same
meeting (two segments appended at once) take turns instead of losing one, and reads a
transcript `FOR SHARE`, so that the meeting and its segments agree.
"""

from __future__ import annotations

from car_grpc.store.postgres.database import Cursor, PostgresDatabase
from car_grpc.store.rows import meeting_status_name
from car_grpc.v1 import voice_pb2

Meeting = voice_pb2.Meeting
TranscriptSegment = voice_pb2.TranscriptSegment


async def _get(cur: Cursor, meeting_id: str, lock: str = "") -> Meeting | None:
    """The meeting; `lock` " FOR UPDATE" to rewrite it, " FOR SHARE" to read its
    transcript with it (no segment is appended meanwhile)."""
    await cur.execute(
        f"SELECT meeting FROM meetings WHERE meeting_id = %s{lock}",
        (meeting_id,),
    )
    row = await cur.fetchone()
    return None if row is None else Meeting.FromString(row[0])


async def _put(cur: Cursor, meeting: Meeting) -> None:
    """Insert or replace the meeting's row (its transcript is untouched; a replaced row
    keeps its first start and its place in insertion order)."""
    await cur.execute(
        "INSERT INTO meetings (meeting_id, status, started_at, meeting) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (meeting_id) DO UPDATE SET status = excluded.status,"
        " meeting = excluded.meeting",
        (
            meeting.meeting_id,
            meeting_status_name(meeting.status),
            meeting.started_at,
            meeting.SerializeToString(),
        ),
    )


async def _delete(cur: Cursor, meeting_id: str) -> None:
    """Remove a meeting and its transcript (a start that failed)."""
    await cur.execute("DELETE FROM meeting_segments WHERE meeting_id = %s", (meeting_id,))
    await cur.execute("DELETE FROM meetings WHERE meeting_id = %s", (meeting_id,))


async def _append_segment(
    cur: Cursor, meeting_id: str, segment: TranscriptSegment, limit: int
) -> int | None:
    """Add `segment` at the end of the transcript; its index, or None when the meeting is
    unknown or its transcript is full (the meeting is then marked truncated)."""
    meeting = await _get(cur, meeting_id, lock=" FOR UPDATE")
    if meeting is None:
        return None
    if meeting.segment_count >= limit:
        if not meeting.truncated:
            meeting.truncated = True
            await _put(cur, meeting)
        return None
    index = meeting.segment_count
    stored = TranscriptSegment()
    stored.CopyFrom(segment)
    stored.index = index
    await cur.execute(
        "INSERT INTO meeting_segments (meeting_id, seq, segment) VALUES (%s, %s, %s)",
        (meeting_id, index, stored.SerializeToString()),
    )
    meeting.segment_count = index + 1
    await _put(cur, meeting)
    return index


async def _segments(cur: Cursor, meeting_id: str) -> list[TranscriptSegment]:
    await cur.execute(
        "SELECT segment FROM meeting_segments WHERE meeting_id = %s ORDER BY seq", (meeting_id,)
    )
    return [TranscriptSegment.FromString(r[0]) for r in await cur.fetchall()]


async def _recent(cur: Cursor, limit: int) -> list[Meeting]:
    """The newest meetings first (by first start; ties: the later stored first)."""
    await cur.execute(
        "SELECT meeting FROM meetings ORDER BY started_at DESC, ord DESC LIMIT %s", (limit,)
    )
    return [Meeting.FromString(r[0]) for r in await cur.fetchall()]


async def _finish(
    cur: Cursor,
    meeting_id: str,
    status: voice_pb2.MeetingStatus.ValueType,
    at: int,
    reason: str | None,
) -> Meeting | None:
    """Mark a meeting no longer live: ended (stopped) or interrupted (with `reason`)."""
    meeting = await _get(cur, meeting_id, lock=" FOR UPDATE")
    if meeting is None:
        return None
    meeting.status = status
    meeting.ended_at = at
    if reason is None:
        meeting.ClearField("end_reason")
    else:
        meeting.end_reason = reason
    await _put(cur, meeting)
    return meeting


async def _interrupt_live(cur: Cursor, at: int, reason: str, core_id: str | None = None) -> int:
    """Mark every meeting still live (left so by a previous process) interrupted: those of
    `core_id`, or (None) this core's own and those of no core (a cluster's other cores
    hold theirs)."""
    if core_id is None:
        await cur.execute(
            "SELECT meeting FROM meetings WHERE status = 'live'"
            " AND core_id IN ('', COALESCE(current_setting('car.core_id', true), ''))"
            " ORDER BY ord FOR UPDATE"
        )
    else:
        await cur.execute(
            "SELECT meeting FROM meetings WHERE status = 'live' AND core_id = %s"
            " ORDER BY ord FOR UPDATE",
            (core_id,),
        )
    rows = await cur.fetchall()
    for (blob,) in rows:
        meeting = Meeting.FromString(blob)
        meeting.status = voice_pb2.MEETING_STATUS_INTERRUPTED
        meeting.ended_at = at
        meeting.end_reason = reason
        await _put(cur, meeting)
    return len(rows)


class PostgresMeetingStore:
    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def get(self, meeting_id: str) -> Meeting | None:
        return await self._db.run(lambda cur: _get(cur, meeting_id))

    async def put(self, meeting: Meeting) -> None:
        await self._db.run(lambda cur: _put(cur, meeting))

    async def delete(self, meeting_id: str) -> None:
        await self._db.run(lambda cur: _delete(cur, meeting_id))

    async def append_segment(
        self, meeting_id: str, segment: TranscriptSegment, limit: int
    ) -> int | None:
        return await self._db.run(lambda cur: _append_segment(cur, meeting_id, segment, limit))

    async def transcript(self, meeting_id: str) -> tuple[Meeting, list[TranscriptSegment]] | None:
        async def read(cur: Cursor) -> tuple[Meeting, list[TranscriptSegment]] | None:
            meeting = await _get(cur, meeting_id, lock=" FOR SHARE")
            return None if meeting is None else (meeting, await _segments(cur, meeting_id))

        return await self._db.run(read)

    async def recent(self, limit: int) -> list[Meeting]:
        return await self._db.run(lambda cur: _recent(cur, limit))

    async def finish(
        self,
        meeting_id: str,
        status: voice_pb2.MeetingStatus.ValueType,
        at: int,
        reason: str | None,
    ) -> Meeting | None:
        return await self._db.run(lambda cur: _finish(cur, meeting_id, status, at, reason))

    async def interrupt_live(self, at: int, reason: str) -> int:
        return await self._db.run(lambda cur: _interrupt_live(cur, at, reason))
