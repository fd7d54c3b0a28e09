"""The reference speech engine end to end: `car-grpc voice-engine` in its own process,
serving a real core and gateway, and WebSocket clients.

espeak-ng speaks known phrases; the client streams them in real-time-sized chunks (100 ms
of audio each, sent as fast as flow control lets them through, not in real time) and gets
exactly those phrases back. Exactly, because the session names the phrases it may hear (a
grammar, `options.phrases`): the small model's open vocabulary is fuzzy on synthetic
speech. The same through a meeting, whose transcript survives a restart (the engine
reconnecting by itself); the engine's own speech (the `espeak` provider) transcribed back
to its text; refusals naming the option; and, with `SpeechEngine` embedded in the test's
process as a program of one's own would run it, the session limit and failing providers."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.gateway.audio_frames import decode, encode
from car_grpc.v1 import voice_pb2
from car_grpc.voice_engine.engine import Session, SpeechEngine, Stream, transcribe
from car_grpc.wire.errors import INTERNAL
from tests.bounded import bounded, stopped
from tests.conftest import make_config
from tests.voice_helpers import (
    VoiceRpc,
    chunks,
    registration,
    say,
    silence,
    voice_engine_process,
    voice_rpc,
)
from tests.ws_helpers import daemon_token, running

#: What the sessions may hear. Of these, the test says the ones the small model gets
#: right from espeak-ng's voice ("turn off the lights" comes back as "turn off the").
PHRASES = [
    "open the pod bay doors please",
    "close the pod bay doors",
    "turn on the lights",
    "turn off the lights",
    "stop the music",
    "play some music",
]
ENGINE = "car-grpc-voice"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def served(config: Config) -> AsyncIterator[tuple[Core, Gateway]]:
    async with (
        running(config) as (core, gateway),
        voice_engine_process(core.grpc_address, config.core.state_root),
    ):
        yield core, gateway


@pytest.fixture
async def client(served: tuple[Core, Gateway]) -> AsyncIterator[VoiceRpc]:
    core, gateway = served
    async with voice_rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        yield c


def frame(session_id: str, seq: int, pcm: bytes) -> bytes:
    """A CAR binary frame of PCM audio."""
    audio = voice_pb2.VoiceAudio(
        session_id=session_id, seq=seq, type=voice_pb2.AUDIO_FRAME_TYPE_PCM, data=pcm
    )
    return encode(audio)


async def stream(c: VoiceRpc, session_id: str, pcm: bytes, rate: int, first_seq: int = 0) -> int:
    """Sends `pcm` as binary frames of 100 ms, back to back; the next seq."""
    parts = chunks(pcm, rate)
    for seq, part in enumerate(parts, first_seq):
        await c.ws.send(frame(session_id, seq, part))
    return first_seq + len(parts)


async def transcript_until_final(c: VoiceRpc) -> tuple[list[str], dict[str, Any]]:
    """The texts of the partial segments, then the final segment that follows them."""
    partials: list[str] = []
    while True:
        event = (await c.next_event(timeout=20))["event"]
        assert event["type"] == "transcript", event
        if event["final"]:
            return partials, event
        partials.append(event["text"])


async def test_speech_streamed_in_chunks_comes_back_as_the_phrases_said(
    client: VoiceRpc,
) -> None:
    assert await client.result("voice.providers.list") == {
        "providers": [
            {"name": "espeak", "engine": ENGINE, "sessions": 0},
            {"name": "sphinx", "engine": ENGINE, "sessions": 0},
        ]
    }
    first, rate = say("open the pod bay doors please")
    second, second_rate = say("stop the music")
    assert rate == second_rate == 22050  # resampled to 16 kHz by the engine
    started = await client.start(
        provider="sphinx", options={"sample_rate": rate, "phrases": PHRASES}
    )
    session_id = started["session_id"]
    # The first phrase and a pause: its final segment comes while the stream goes on.
    seq = await stream(client, session_id, first + silence(1, rate), rate)
    partials, final = await transcript_until_final(client)
    assert final["text"] == "open the pod bay doors please"
    assert partials and partials[-1] == "open the pod bay doors please", partials
    assert all(p in final["text"] for p in partials[:1]), partials  # the first guess grows
    first_seconds = len(first) / 2 / rate
    assert 0 <= final["start_ms"] < final["end_ms"] <= first_seconds * 1000 + 500
    # The second phrase, then stop without a pause: the stop brings its final segment.
    await stream(client, session_id, second, rate, seq)
    stopped = await client.result("voice.transcribe_stream.stop", {"session_id": session_id})
    assert stopped == {"session_id": session_id, "stopped": True}
    _, last = await transcript_until_final(client)
    assert last["text"] == "stop the music"
    assert last["start_ms"] >= (first_seconds + 1) * 1000 - 500
    assert (await client.next_event())["event"] == {
        "type": "ended",
        "reason": "stopped",
        "terminal": True,
    }


async def test_the_engines_own_speech_transcribes_back_to_its_text(client: VoiceRpc) -> None:
    spoken = await client.start(
        provider="espeak", options={"text": "turn on the lights", "sample_rate": 16000}
    )
    speech = b""
    while True:
        audio = decode(await client.next_binary(timeout=20))
        assert audio.session_id == spoken["session_id"]
        if audio.type == voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL:
            break
        assert audio.type == voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK
        assert audio.format == voice_pb2.AUDIO_FORMAT_PCM16LE
        assert audio.seq == len(speech) // 16000  # 500 ms at 16 kHz each, the last less
        assert 0 < len(audio.data) <= 16000
        speech += audio.data
    assert audio.seq == -(-len(speech) // 16000) > 1  # the final counts the chunks
    assert (await client.next_event())["event"] == {
        "type": "ended",
        "reason": "engine",
        "terminal": True,
    }
    # Pushed as JSON this time, at 16 kHz (the model's own rate).
    session_id = (
        await client.start(provider="sphinx", options={"sample_rate": 16000, "phrases": PHRASES})
    )["session_id"]
    for part in chunks(speech, 16000):
        await client.result(
            "voice.transcribe_stream.push",
            {"session_id": session_id, "pcm_b64": base64.b64encode(part).decode()},
        )
    await client.result("voice.transcribe_stream.stop", {"session_id": session_id})
    _, final = await transcript_until_final(client)
    assert final["text"] == "turn on the lights"


async def test_sessions_the_engine_cannot_serve_are_refused_naming_the_option(
    client: VoiceRpc,
) -> None:
    for provider, options, message in (
        (
            "sphinx",
            {"sample_rate": 12345},
            "option sample_rate must be one of 8000, 11025, 16000, 22050, 24000, 32000, "
            "44100, 48000 (Hz), got 12345",
        ),
        (
            "sphinx",
            {"phrases": ["open the xyzzy"]},
            "option phrases: 'xyzzy' is not in the model's pronunciation dictionary",
        ),
        (
            "sphinx",
            {"phrase": ["typo"]},
            "unknown option 'phrase' (this provider takes: phrases, sample_rate)",
        ),
        ("espeak", {}, "option text must be a non-empty string"),
    ):
        answer = await client.call(
            "voice.transcribe_stream.start", {"provider": provider, "options": options}
        )
        assert answer["error"] == {
            "code": INTERNAL,
            "message": f"voice engine '{ENGINE}' refused the session: {message}",
        }, options
    assert await client.result("voice.sessions.list") == {"sessions": []}


async def fails_at_once(stream: Stream, session: Session) -> None:
    raise RuntimeError("no model")


async def fails_on_audio(stream: Stream, session: Session) -> None:
    await stream.answer(session.id)
    await bounded(session.inbox.get())
    raise RuntimeError("lost the model")


async def test_an_embedded_engine_keeps_its_session_limit_and_survives_its_providers(
    config: Config,
) -> None:
    # The engine in this process this time, as a Python program of one's own runs it.
    providers = {"sphinx": transcribe, "at-once": fails_at_once, "on-audio": fails_on_audio}
    async with running(config) as (core, gateway), voice_rpc(gateway.url) as c:
        engine = SpeechEngine(
            core.grpc_address,
            providers,
            name="small",
            token=lambda: daemon_token(core),
            max_sessions=1,
        )
        await engine.start()
        try:
            await c.login(daemon_token(core))
            await asyncio.wait_for(engine.registered.wait(), 10)
            first = await c.start(provider="sphinx", options={"phrases": PHRASES})
            answer = await c.call("voice.transcribe_stream.start", {"provider": "sphinx"})
            assert answer["error"]["message"] == (
                "voice engine 'small' refused the session: the engine is busy: it serves at "
                "most 1 sessions at once"
            )
            # It takes its audio (`taken`) as it decodes it: all of it by its end.
            assert core.parts is not None
            vs = core.parts.voice.sessions[first["session_id"]]
            assert vs.engine.acknowledges_audio
            sent = await stream(c, first["session_id"], silence(1, 16000), 16000)
            await c.result("voice.transcribe_stream.stop", first)
            assert (await c.next_event())["event"]["type"] == "ended"
            assert vs.chunks_taken == vs.chunks_sent == sent == 10
            # A place again. A provider that fails refuses its session, or ends it.
            answer = await c.call("voice.transcribe_stream.start", {"provider": "at-once"})
            assert answer["error"]["message"] == (
                "voice engine 'small' refused the session: engine error: no model"
            )
            failing = (await c.start(provider="on-audio"))["session_id"]
            await c.ws.send(frame(failing, 0, b"\x00\x00"))
            assert await c.next_event() == {
                "session_id": failing,
                "event": {
                    "type": "error",
                    "message": "engine error: lost the model",
                    "terminal": True,
                },
            }
            await c.start(provider="sphinx", options={"phrases": PHRASES})  # the engine goes on
        finally:
            await stopped(engine.stop())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_meetings_spoken_transcript_survives_a_restart_and_so_does_the_engine(
    tmp_path: Path,
) -> None:
    # The core on a fixed port, so that the engine finds it again after the restart.
    config = make_config(tmp_path, grpc_port=free_port())
    address, home = f"127.0.0.1:{config.core.grpc_port}", config.core.state_root
    meeting_options = {"sample_rate": 22050, "phrases": PHRASES}
    first, rate = say("close the pod bay doors")
    second, _ = say("play some music")
    third, _ = say("turn on the lights")
    async with voice_engine_process(address, home, registered=False) as engine:
        async with running(config) as (core, gateway), voice_rpc(gateway.url) as c:
            # Logged in first: the engine may take longer than ws_auth_timeout to start.
            await c.login(daemon_token(core))
            await registration(engine)
            started = await c.result(
                "meeting.start", {"id": "standup", "provider": "sphinx", "options": meeting_options}
            )
            await stream(c, started["session_id"], first + silence(1, rate) + second, rate)
            stopped = await c.result("meeting.stop", {"meeting_id": "standup"})
            assert stopped["stopped"] is True
            meeting = await c.result("meeting.get", {"meeting_id": "standup"})
        assert [s["text"] for s in meeting["segments"]] == [
            "close the pod bay doors",
            "play some music",
        ]
        assert meeting["meeting"]["status"] == "ended"
        assert meeting["meeting"]["provider"] == "sphinx"
        assert all(s["session_id"] == started["session_id"] for s in meeting["segments"])
        assert meeting["segments"][0]["end_ms"] < meeting["segments"][1]["start_ms"]

        # A new core on the same state root has the transcript. The engine connects
        # again by itself (with the new core's daemon token), and the meeting goes on.
        async with running(config) as (core, gateway), voice_rpc(gateway.url) as c:
            await c.login(daemon_token(core))
            assert await c.result("meeting.get", {"meeting_id": "standup"}) == meeting
            await registration(engine)
            again = await c.result(
                "meeting.start", {"id": "standup", "provider": "sphinx", "options": meeting_options}
            )
            await stream(c, again["session_id"], third, rate)
            await c.result("meeting.stop", {"meeting_id": "standup"})
            continued = await c.result("meeting.get", {"meeting_id": "standup"})
    assert [s["text"] for s in continued["segments"]] == [
        "close the pod bay doors",
        "play some music",
        "turn on the lights",
    ]
