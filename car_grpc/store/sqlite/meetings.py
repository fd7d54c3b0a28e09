"""MeetingStore on the embedded database (schema: migration 5 of database.py).

A meeting row is one car.v1.Meeting, serialized whole in `meeting` (its status and start
are copied out for queries); a transcript is the meeting's rows in `meeting_segments`,
one serialized car.v1.TranscriptSegment each, numbered from 0. The functions below take
a connection inside a transaction; each method of SqliteMeetingStore is atomic (a
transaction, or a savepoint in a group commit).
"""

from __future__ import annotations

import sqlite3

from car_grpc.store.rows import meeting_status_name
from car_grpc.store.sqlite.database import SqliteDatabase
from car_grpc.v1 import voice_pb2

Meeting = voice_pb2.Meeting
TranscriptSegment = voice_pb2.TranscriptSegment


def _get(conn: sqlite3.Connection, meeting_id: str) -> Meeting | None:
    row = conn.execute(
        "SELECT meeting FROM meetings WHERE meeting_id = ?", (meeting_id,)
    ).fetchone()
    return None if row is None else Meeting.FromString(row[0])


def _values(meeting: Meeting) -> tuple[str, str, int, bytes]:
    return (
        meeting.meeting_id,
        meeting_status_name(meeting.status),
        meeting.started_at,
        meeting.SerializeToString(),
    )


def _put(conn: sqlite3.Connection, meeting: Meeting) -> None:
    _put_values(conn, _values(meeting))


def _put_values(conn: sqlite3.Connection, values: tuple[str, str, int, bytes]) -> None:
    """Insert or replace the meeting's row (its transcript is untouched)."""
    conn.execute(
        "INSERT INTO meetings (meeting_id, status, started_at, meeting) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (meeting_id) DO UPDATE SET status = excluded.status,"
        " meeting = excluded.meeting",
        values,
    )


#: What a row costs beside its serialized message, in bytes (for the store's queue bound).
_ROW_OVERHEAD = 64


def _delete(conn: sqlite3.Connection, meeting_id: str) -> None:
    """Remove a meeting that never got a segment (a start that failed)."""
    conn.execute("DELETE FROM meeting_segments WHERE meeting_id = ?", (meeting_id,))
    conn.execute("DELETE FROM meetings WHERE meeting_id = ?", (meeting_id,))


def _append_segment(
    conn: sqlite3.Connection, meeting_id: str, segment: TranscriptSegment, limit: int
) -> int | None:
    """Add `segment` at the end of the transcript; its index, or None when the meeting is
    unknown or its transcript is full (the meeting is then marked truncated)."""
    meeting = _get(conn, meeting_id)
    if meeting is None:
        return None
    if meeting.segment_count >= limit:
        if not meeting.truncated:
            meeting.truncated = True
            _put(conn, meeting)
        return None
    index = meeting.segment_count
    stored = TranscriptSegment()
    stored.CopyFrom(segment)
    stored.index = index
    conn.execute(
        "INSERT INTO meeting_segments (meeting_id, seq, segment) VALUES (?, ?, ?)",
        (meeting_id, index, stored.SerializeToString()),
    )
    meeting.segment_count = index + 1
    _put(conn, meeting)
    return index


def _segments(conn: sqlite3.Connection, meeting_id: str) -> list[TranscriptSegment]:
    rows = conn.execute(
        "SELECT segment FROM meeting_segments WHERE meeting_id = ? ORDER BY seq", (meeting_id,)
    )
    return [TranscriptSegment.FromString(r[0]) for r in rows]


def _recent(conn: sqlite3.Connection, limit: int) -> list[Meeting]:
    """The newest meetings first (by first start)."""
    rows = conn.execute(
        "SELECT meeting FROM meetings ORDER BY started_at DESC, rowid DESC LIMIT ?", (limit,)
    )
    return [Meeting.FromString(r[0]) for r in rows]


def _finish(
    conn: sqlite3.Connection,
    meeting_id: str,
    status: voice_pb2.MeetingStatus.ValueType,
    at: int,
    reason: str | None,
) -> Meeting | None:
    """Mark a meeting no longer live: ended (stopped) or interrupted (with `reason`)."""
    meeting = _get(conn, meeting_id)
    if meeting is None:
        return None
    meeting.status = status
    meeting.ended_at = at
    if reason is None:
        meeting.ClearField("end_reason")
    else:
        meeting.end_reason = reason
    _put(conn, meeting)
    return meeting


def _interrupt_live(conn: sqlite3.Connection, at: int, reason: str) -> int:
    """Mark every meeting still live (left so by a previous process) interrupted."""
    rows = conn.execute("SELECT meeting FROM meetings WHERE status = 'live'").fetchall()
    for (blob,) in rows:
        meeting = Meeting.FromString(blob)
        meeting.status = voice_pb2.MEETING_STATUS_INTERRUPTED
        meeting.ended_at = at
        meeting.end_reason = reason
        _put(conn, meeting)
    return len(rows)


class SqliteMeetingStore:
    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def get(self, meeting_id: str) -> Meeting | None:
        return await self._db.read(lambda conn: _get(conn, meeting_id), ("meeting", meeting_id))

    async def put(self, meeting: Meeting) -> None:
        values = _values(meeting)
        size = len(values[3]) + _ROW_OVERHEAD
        key = ("meeting", meeting.meeting_id)
        await self._db.write(lambda conn: _put_values(conn, values), size, key)

    async def delete(self, meeting_id: str) -> None:
        await self._db.write(lambda conn: _delete(conn, meeting_id), key=("meeting", meeting_id))

    async def append_segment(
        self, meeting_id: str, segment: TranscriptSegment, limit: int
    ) -> int | None:
        size = segment.ByteSize() + _ROW_OVERHEAD
        return await self._db.write(
            lambda conn: _append_segment(conn, meeting_id, segment, limit),
            size,
            ("meeting", meeting_id),
        )

    async def transcript(self, meeting_id: str) -> tuple[Meeting, list[TranscriptSegment]] | None:
        def read(conn: sqlite3.Connection) -> tuple[Meeting, list[TranscriptSegment]] | None:
            meeting = _get(conn, meeting_id)
            return None if meeting is None else (meeting, _segments(conn, meeting_id))

        return await self._db.read(read, ("meeting", meeting_id))

    async def recent(self, limit: int) -> list[Meeting]:
        return await self._db.read(lambda conn: _recent(conn, limit))

    async def finish(
        self,
        meeting_id: str,
        status: voice_pb2.MeetingStatus.ValueType,
        at: int,
        reason: str | None,
    ) -> Meeting | None:
        return await self._db.write(
            lambda conn: _finish(conn, meeting_id, status, at, reason), key=("meeting", meeting_id)
        )

    async def interrupt_live(self, at: int, reason: str) -> int:
        return await self._db.write(lambda conn: _interrupt_live(conn, at, reason))
