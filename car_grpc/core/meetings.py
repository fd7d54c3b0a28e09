"""Meetings: a voice session whose final transcript segments are kept (voice.proto).

A meeting is a row in the store and, while it is live, one voice session owned by the
connection that started it. The meeting is that session's sink (car_grpc.core.voice):
every final transcript event of the session is appended to the meeting's transcript in
the store before the voice layer forwards the event, untouched, to the owner. So the
transcript is whole after the client has gone and after a restart; a meeting whose voice
session ended other than by a stop is `interrupted`, and `meeting.start` with its id
continues it with a new voice session.
"""

from __future__ import annotations

import uuid

from google.protobuf import struct_pb2

from car_grpc.clock import now_ms
from car_grpc.core.router import Reply, handles
from car_grpc.core.session import ClientSession
from car_grpc.core.voice import DEFAULT_AUDIO_SOURCE, Voice, VoiceSession
from car_grpc.store.repositories import MeetingStore
from car_grpc.v1 import voice_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import field_error, invalid_params, require

Meeting = voice_pb2.Meeting

#: A segment's text is cut here (bytes of UTF-8), with a marker.
MAX_SEGMENT_TEXT = 16 * 1024
TRUNCATED = "…[truncated]"
MAX_MEETING_ID = 256
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


def transcript_segment(event: struct_pb2.Value) -> voice_pb2.TranscriptSegment | None:
    """The segment a final transcript event carries (see VoiceEventNotice), else None.

    `{"type": "transcript", "final": true, "text": str, "speaker"?: str, "start_ms"?: n,
    "end_ms"?: n}`; other keys are ignored, and so are fields of the wrong type.
    """
    data = codec.value_to_json(event)
    if not isinstance(data, dict) or data.get("type") != "transcript":
        return None
    text = data.get("text")
    if data.get("final") is not True or not isinstance(text, str):
        return None
    raw = text.encode()
    if len(raw) > MAX_SEGMENT_TEXT:
        text = raw[: MAX_SEGMENT_TEXT - len(TRUNCATED.encode())].decode(errors="ignore")
        text += TRUNCATED
    segment = voice_pb2.TranscriptSegment(text=text)
    if isinstance(speaker := data.get("speaker"), str):
        segment.speaker = speaker
    for name in ("start_ms", "end_ms"):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if -(2**63) <= value < 2**63:
            setattr(segment, name, int(value))
    return segment


class Meetings:
    """Live meetings (meeting id -> its voice session) over the meetings in the store."""

    def __init__(self, store: MeetingStore, voice: Voice, *, max_segments: int) -> None:
        self.store = store
        self.voice = voice
        self._max_segments = max_segments
        #: meeting id -> its voice session; None while the meeting is starting.
        self.live: dict[str, VoiceSession | None] = {}

    async def recover(self) -> int:
        """Meetings a previous process left live are interrupted."""
        at = now_ms()
        return await self.store.interrupt_live(at, "server restarted")

    async def start(
        self, owner: ClientSession, req: voice_pb2.StartMeetingRequest
    ) -> tuple[Meeting, VoiceSession]:
        meeting_id = req.id.strip() or f"meeting-{uuid.uuid4().hex}"
        if len(meeting_id) > MAX_MEETING_ID:
            raise field_error("id", f"longer than {MAX_MEETING_ID} characters")
        if meeting_id in self.live:
            raise invalid_params(f"invalid params: meeting '{meeting_id}' is already running")
        self.live[meeting_id] = None  # taken while it starts
        try:
            meeting, vs = await self._start(owner, meeting_id, req)
        except BaseException:
            self.live.pop(meeting_id, None)
            raise
        self.live[meeting_id] = vs
        return meeting, vs

    async def _start(
        self, owner: ClientSession, meeting_id: str, req: voice_pb2.StartMeetingRequest
    ) -> tuple[Meeting, VoiceSession]:
        session_id = self.voice.new_session_id(req.session_id or None)
        provider, _ = self.voice.provider_for(req.provider or None)
        before = await self.store.get(meeting_id)
        meeting = Meeting(meeting_id=meeting_id, started_at=now_ms())
        if before is not None:
            meeting.CopyFrom(before)
            meeting.ClearField("ended_at")
            meeting.ClearField("end_reason")
        if req.HasField("title"):
            meeting.title = req.title
        meeting.status = voice_pb2.MEETING_STATUS_LIVE
        meeting.session_id, meeting.provider = session_id, provider
        # The row is live before the engine can send a segment for it.
        await self.store.put(meeting)
        try:
            vs = await self.voice.open(
                owner,
                session_id=session_id,
                provider=provider,
                audio_source=req.audio_source or DEFAULT_AUDIO_SOURCE,
                options=req.options,
                meeting_id=meeting_id,
                sink=self,
            )
        except BaseException:
            if before is None:
                await self.store.delete(meeting_id)
            else:
                await self.store.put(before)
            raise
        return meeting, vs

    async def stop(self, session: ClientSession, meeting_id: str) -> voice_pb2.StopMeetingResponse:
        vs = self.live.get(meeting_id)
        if vs is None:
            return voice_pb2.StopMeetingResponse(meeting=await self.get(meeting_id))
        if vs.owner is not session and not session.is_host:
            raise invalid_params(
                f"invalid params: meeting '{meeting_id}' is running on another connection"
            )
        await self.voice.stop(vs)  # returns once the sink has finished
        return voice_pb2.StopMeetingResponse(meeting=await self.get(meeting_id), stopped=True)

    async def get(self, meeting_id: str) -> Meeting:
        meeting = await self.store.get(meeting_id)
        if meeting is None:
            raise invalid_params(f"invalid params: unknown meeting '{meeting_id}'")
        return meeting

    async def transcript(self, meeting_id: str) -> voice_pb2.GetMeetingResponse:
        found = await self.store.transcript(meeting_id)
        if found is None:
            raise invalid_params(f"invalid params: unknown meeting '{meeting_id}'")
        meeting, segments = found
        return voice_pb2.GetMeetingResponse(meeting=meeting, segments=segments)

    async def recent(self, limit: int) -> list[Meeting]:
        return await self.store.recent(limit)

    # -------------------------------------------------------------- the voice sink

    async def ingest(self, session: VoiceSession, event: struct_pb2.Value) -> None:
        segment = transcript_segment(event)
        if segment is None or session.meeting_id is None:
            return
        segment.session_id, segment.received_at = session.id, now_ms()
        meeting_id, limit = session.meeting_id, self._max_segments
        await self.store.append_segment(meeting_id, segment, limit)

    async def finish(self, session: VoiceSession, stopped: bool, reason: str) -> None:
        meeting_id = session.meeting_id
        if meeting_id is None:
            return
        if self.live.get(meeting_id) is session:
            del self.live[meeting_id]
        status = voice_pb2.MEETING_STATUS_ENDED if stopped else voice_pb2.MEETING_STATUS_INTERRUPTED
        at, why = now_ms(), None if stopped else reason
        await self.store.finish(meeting_id, status, at, why)

    # ------------------------------------------------------------ handlers

    @handles("meeting_start")
    async def meeting_start(
        self, session: ClientSession, req: voice_pb2.StartMeetingRequest
    ) -> Reply:
        meeting, vs = await self.start(session, req)
        answer = voice_pb2.StartMeetingResponse(meeting=meeting, session_id=vs.id)
        return Reply(answer, lambda: self.voice.run(vs))

    @handles("meeting_stop")
    async def meeting_stop(
        self, session: ClientSession, req: voice_pb2.StopMeetingRequest
    ) -> voice_pb2.StopMeetingResponse:
        return await self.stop(session, require(req.meeting_id, "meeting_id"))

    @handles("meeting_list")
    async def meeting_list(
        self, session: ClientSession, req: voice_pb2.ListMeetingsRequest
    ) -> voice_pb2.ListMeetingsResponse:
        limit = req.limit if req.HasField("limit") else DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise field_error("limit", f"must be 1..{MAX_LIST_LIMIT}")
        return voice_pb2.ListMeetingsResponse(meetings=await self.recent(limit))

    @handles("meeting_get")
    async def meeting_get(
        self, session: ClientSession, req: voice_pb2.GetMeetingRequest
    ) -> voice_pb2.GetMeetingResponse:
        return await self.transcript(require(req.meeting_id, "meeting_id"))
