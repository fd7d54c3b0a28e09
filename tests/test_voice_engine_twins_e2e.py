"""A speech engine that names its sessions by the typed twin alone (`voice_session_id`,
wire/twins.py) on ServeVoiceBatched, end to end: a real core, the engine on the generated
stub, a client on a session stream. The core takes the engine's messages apart without
the generic twin walk (core/voice.py `_from_engine`), so this checks that each kind still
finds its session and that the speech passed on carries both ids."""

from __future__ import annotations

from typing import Any

import grpc

from car_grpc.v1 import session_pb2, voice_pb2
from car_grpc.wire import codec
from tests.conftest import make_config
from tests.session_client import connect
from tests.test_voice_batched_e2e import BatchedEngine, Request
from tests.voice_helpers import partial_event
from tests.ws_helpers import daemon_token, running_core


class TwinEngine(BatchedEngine):
    """BatchedEngine, every answer's session id moved to the twin."""

    def _answer(self, message: voice_pb2.ServeVoiceResponse) -> list[Request]:
        out = super()._answer(message)
        for request in out:
            part = getattr(request, request.WhichOneof("body") or "")
            part.voice_session_id, part.session_id = part.session_id, ""
        return out


async def test_an_engine_that_sets_only_the_twin_is_understood(tmp_path: Any) -> None:
    async with (
        running_core(make_config(tmp_path).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        engine = TwinEngine(channel, daemon_token(core))
        await engine.start()
        c = await connect(channel, token=daemon_token(core))
        start = voice_pb2.StartTranscribeStreamRequest()
        session_id = (await c.request("voice_transcribe_stream_start", start)).session_id
        payload = b"\x01\x00" * 160
        for seq in range(3):
            audio = voice_pb2.VoiceAudio(session_id=session_id, seq=seq, data=payload)
            await c.send(session_pb2.ClientFrame(voice_audio=audio))
        frames = [await c.next_notification(timeout=10) for _ in range(6)]
        speech = [f.voice_audio for f in frames if f.HasField("voice_audio")]
        assert [(s.seq, s.data) for s in speech] == [(n, payload) for n in range(3)]
        assert all(s.session_id == s.voice_session_id == session_id for s in speech)
        assert all(s.format == voice_pb2.AUDIO_FORMAT_PCM16LE for s in speech)
        notices = [f.voice_event for f in frames if f.HasField("voice_event")]
        assert [n.session_id for n in notices] == [session_id] * 3
        assert [codec.value_to_json(n.event) for n in notices] == [
            partial_event(n) for n in range(3)
        ]
        # The engine's `end` (the answer to stop), by the twin too: confirmed.
        stop = voice_pb2.StopTranscribeStreamRequest(session_id=session_id)
        assert (await c.request("voice_transcribe_stream_stop", stop)).stopped
        await c.close()
        await engine.close()
