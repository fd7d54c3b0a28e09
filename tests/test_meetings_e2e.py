"""Meetings end to end: a real core and gateway, the echo speech engine, WebSocket clients,
and restarts on the same state root. A meeting's transcript is in the store as soon as
its owner has seen a final segment, and stays there after the owner leaves and the
server restarts."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from car_grpc.config import Config
from car_grpc.store import open_store
from car_grpc.store.location import store_location
from car_grpc.v1 import voice_pb2
from car_grpc.wire.errors import INVALID_PARAMS
from tests.bounded import bounded
from tests.conftest import make_config
from tests.voice_helpers import FAREWELL, VoiceRpc, echo_engine, final_event, voice_rpc
from tests.ws_helpers import daemon_token, running


def config_for(tmp_path: Path, **overrides: Any) -> Config:
    return make_config(tmp_path, voice_ack_timeout=2.0, voice_stall_timeout=2.0, **overrides)


async def speak(c: VoiceRpc, session_id: str, chunks: int) -> list[dict[str, Any]]:
    """Push `chunks` chunks of PCM; the final transcript events the owner then receives."""
    for n in range(chunks):
        await c.result(
            "voice.transcribe_stream.push",
            {"session_id": session_id, "pcm_b64": base64.b64encode(b"\x00\x00" * (n + 1)).decode()},
        )
    finals: list[dict[str, Any]] = []
    while len(finals) < chunks:
        event = (await c.next_event())["event"]
        if event["final"]:
            finals.append(event)
    return finals


def texts(meeting: dict[str, Any]) -> list[str]:
    return [s["text"] for s in meeting["segments"]]


async def test_a_meetings_transcript_survives_the_client_leaving_and_a_restart(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path)
    async with running(config) as (core, gateway):
        async with echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)) as engine:
            async with voice_rpc(gateway.url) as owner:
                await owner.login(daemon_token(core))
                started = await owner.result("meeting.start", {"id": "standup", "title": "Daily"})
                first_session = started["session_id"]
                assert started["meeting"]["status"] == "live"
                assert started["meeting"]["session_id"] == first_session
                # The owner gets every event untouched; each final is in the store by then.
                assert await speak(owner, first_session, 3) == [
                    final_event(0, 2),
                    final_event(1, 4),
                    final_event(2, 6),
                ]
            # The owner is gone without stopping: the engine is told, the meeting interrupted.
            closed = await bounded(engine.closed.get())
            assert (closed.session_id, closed.reason) == (first_session, "client disconnected")
            async with voice_rpc(gateway.url) as other:
                await other.login(daemon_token(core))
                meeting = await other.result("meeting.get", {"meeting_id": "standup"})
        assert meeting["meeting"]["status"] == "interrupted"
        assert meeting["meeting"]["end_reason"] == "client disconnected"
        assert meeting["meeting"]["segment_count"] == 3
        assert texts(meeting) == ["chunk 0: 2 bytes", "chunk 1: 4 bytes", "chunk 2: 6 bytes"]
        assert [s["index"] for s in meeting["segments"]] == [0, 1, 2]
        assert {s["session_id"] for s in meeting["segments"]} == {first_session}
        assert meeting["segments"][1] | {"received_at": 0} == {
            "index": 1,
            "text": "chunk 1: 4 bytes",
            "speaker": "echo",
            "start_ms": 100,
            "end_ms": 200,
            "received_at": 0,
            "session_id": first_session,
        }

    # A new process on the same state root has the whole transcript, and continues it.
    async with running(config) as (core, gateway), voice_rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        assert await c.result("meeting.get", {"meeting_id": "standup"}) == meeting
        listed = await c.result("meeting.list")
        assert listed == {"meetings": [meeting["meeting"]]}
        async with echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)):
            again = await c.result(
                "meeting.start", {"id": "standup", "options": {"farewell": True}}
            )
            second_session = again["session_id"]
            assert second_session != first_session
            assert again["meeting"]["title"] == "Daily"  # kept
            assert again["meeting"]["status"] == "live"
            assert "end_reason" not in again["meeting"]
            await speak(c, second_session, 1)
            stopped = await c.result("meeting.stop", {"meeting_id": "standup"})
            assert stopped["stopped"] is True
            assert stopped["meeting"]["status"] == "ended"
            assert "end_reason" not in stopped["meeting"]
            # The stop answered after the engine's last segment (sent on stop) was in.
            assert stopped["meeting"]["segment_count"] == 5
            assert (await c.next_event())["event"] == FAREWELL
            assert (await c.next_event())["event"]["type"] == "ended"
        final = await c.result("meeting.get", {"meeting_id": "standup"})
        stop_again = await c.result("meeting.stop", {"meeting_id": "standup"})
    assert texts(final) == [*texts(meeting), "chunk 0: 2 bytes", "goodbye"]
    sessions = [s["session_id"] for s in final["segments"]]
    assert sessions == [first_session] * 3 + [second_session] * 2
    assert stop_again == {"meeting": final["meeting"], "stopped": False}


async def test_a_meeting_left_live_by_a_crashed_process_is_interrupted(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    store = await open_store(config.core.state_root, config.core.store)
    live = voice_pb2.Meeting(
        meeting_id="crashed", status=voice_pb2.MEETING_STATUS_LIVE, started_at=1, session_id="s"
    )
    await store.meetings.put(live)
    await store.close()
    async with running(config) as (core, gateway), voice_rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        got = await c.result("meeting.get", {"meeting_id": "crashed"})
    assert got["meeting"]["status"] == "interrupted"
    assert got["meeting"]["end_reason"] == "server restarted"
    assert got["segments"] == []


async def test_meeting_errors_name_what_is_wrong(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    async with (
        running(config) as (core, gateway),
        echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)),
        voice_rpc(gateway.url) as a,
        voice_rpc(gateway.url) as b,
    ):
        for c in (a, b):
            await c.login(daemon_token(core))
        started = await a.result("meeting.start", {})
        meeting_id = started["meeting"]["meeting_id"]
        assert meeting_id.startswith("meeting-")
        for method, params, message in (
            ("meeting.start", {"id": meeting_id}, f"meeting '{meeting_id}' is already running"),
            (
                "meeting.stop",
                {"meeting_id": meeting_id},
                f"meeting '{meeting_id}' is running on another connection",
            ),
            ("meeting.get", {"meeting_id": "nope"}, "unknown meeting 'nope'"),
            ("meeting.stop", {}, "missing field: meeting_id"),
            ("meeting.list", {"limit": 0}, "must be 1..1000: limit"),
        ):
            answer = await b.call(method, params)
            assert answer["error"] == {
                "code": INVALID_PARAMS,
                "message": f"invalid params: {message}",
            }, (method, answer)
        # A failed start leaves no meeting behind.
        await a.call("meeting.start", {"id": "ghost", "provider": "nope"})
        missing = await a.call("meeting.get", {"meeting_id": "ghost"})
        assert missing["error"]["message"] == "invalid params: unknown meeting 'ghost'"
        stopped = await a.result("meeting.stop", {"meeting_id": meeting_id})
        assert stopped["meeting"]["status"] == "ended"


async def test_a_full_transcript_keeps_its_first_segments_and_says_so(tmp_path: Path) -> None:
    config = config_for(tmp_path, meeting_max_segments=2)
    async with (
        running(config) as (core, gateway),
        echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)),
        voice_rpc(gateway.url) as c,
    ):
        await c.login(daemon_token(core))
        started = await c.result("meeting.start", {"id": "long"})
        # The owner still gets every event; the transcript keeps the first two.
        assert len(await speak(c, started["session_id"], 3)) == 3
        got = await c.result("meeting.get", {"meeting_id": "long"})
    assert texts(got) == ["chunk 0: 2 bytes", "chunk 1: 4 bytes"]
    assert got["meeting"]["truncated"] is True
    assert got["meeting"]["segment_count"] == 2


async def test_a_meetings_end_is_stored_before_the_engine_or_the_owner_hears_of_it(
    tmp_path: Path,
) -> None:
    """The engine's close notice and the owner's terminal event go only once the store has
    the meeting's end: whoever learns of it from them and reads the meeting finds it ended.
    Another connection holds the database's write lock while the meetings end, so the
    store's writes wait; each notice, the moment it arrives, reads the meeting from the
    file beside the server."""
    config = config_for(tmp_path)
    path = store_location(None, config.core.state_root).path
    assert path is not None
    async with running(config) as (core, gateway):
        reader = await open_store(config.core.state_root)
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            async with (
                echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)) as engine,
                voice_rpc(gateway.url) as stays,
            ):

                async def status_once(notice: Awaitable[object], meeting_id: str) -> str:
                    await notice
                    meeting = await reader.meetings.get(meeting_id)
                    assert meeting is not None
                    return voice_pb2.MeetingStatus.Name(meeting.status)

                await stays.login(daemon_token(core))
                ended_by_engine = await stays.result("meeting.start", {"id": "engine-ends"})
                async with voice_rpc(gateway.url) as leaves:
                    await leaves.login(daemon_token(core))
                    await leaves.result("meeting.start", {"id": "owner-leaves"})
                    lock.execute("BEGIN IMMEDIATE")
                closed = asyncio.create_task(status_once(engine.closed.get(), "owner-leaves"))
                end = voice_pb2.EndVoiceSession(session_id=ended_by_engine["session_id"])
                await engine.send(voice_pb2.ServeVoiceRequest(end=end))
                terminal = asyncio.create_task(status_once(stays.next_event(10), "engine-ends"))
                # Neither notice may come while the end cannot be stored: give them the time
                # they would need (bounded) before the lock goes.
                await asyncio.wait((closed, terminal), timeout=0.5)
                lock.execute("ROLLBACK")
                assert await closed == "MEETING_STATUS_INTERRUPTED"
                assert await terminal == "MEETING_STATUS_INTERRUPTED"
        finally:
            lock.close()
            await reader.close()
