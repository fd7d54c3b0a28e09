"""Voice sessions end to end: a real core and gateway on loopback, a small speech engine on
the generated VoiceService stub (tests/voice_helpers.EchoEngine) and WebSocket clients.

Covers providers from registered engines, events reaching only the owning connection,
binary audio frames both ways, malformed binary frames, an engine that disconnects or
stalls mid-session, a client that stops reading, PublishVoiceEvent and typed calls."""

from __future__ import annotations

import asyncio
import base64
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from car_grpc.gateway.audio_frames import decode
from car_grpc.v1 import session_pb2, voice_pb2, voice_pb2_grpc
from car_grpc.wire import codec
from car_grpc.wire.errors import INTERNAL, INVALID_PARAMS, INVALID_REQUEST
from tests.bounded import bounded
from tests.conftest import make_config
from tests.session_client import SessionClient, connect
from tests.voice_helpers import (
    EchoEngine,
    VoiceRpc,
    echo_engine,
    final_event,
    partial_event,
    voice_rpc,
)
from tests.ws_helpers import daemon_token, running, running_core


@pytest.fixture
def config(tmp_path: Any) -> Config:
    return make_config(tmp_path, voice_ack_timeout=2.0, voice_stall_timeout=2.0)


@pytest.fixture
async def served(config: Config) -> AsyncIterator[tuple[Core, Gateway]]:
    async with running(config) as pair:
        yield pair


@pytest.fixture
async def engine(served: tuple[Core, Gateway]) -> AsyncIterator[EchoEngine]:
    core, _ = served
    async with echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)) as e:
        yield e


async def client(served: tuple[Core, Gateway]) -> AsyncIterator[VoiceRpc]:
    core, gateway = served
    async with voice_rpc(gateway.url) as c:
        await c.login(daemon_token(core))
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pcm_frame(session_id: str, seq: int, payload: bytes) -> bytes:
    return b"\x01" + uuid.UUID(session_id).bytes + struct.pack("<Q", seq) + b"\x00" + payload


async def push(c: VoiceRpc, session_id: str, data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = await c.result(
        "voice.transcribe_stream.push", {"session_id": session_id, "pcm_b64": b64(data)}
    )
    return result


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert "error" in answer, answer
    error: dict[str, Any] = answer["error"]
    return error


# ------------------------------------------------------------------ providers and starting


async def test_providers_come_from_the_registered_engines(served: tuple[Core, Gateway]) -> None:
    core, _ = served
    token = daemon_token(core)
    async for c in client(served):
        assert await c.result("voice.providers.list") == {"providers": []}
        assert error_of(await c.call("voice.transcribe_stream.start", {})) == {
            "code": INTERNAL,
            "message": "no voice engine is connected",
        }
        async with echo_engine(core.grpc_address, ["whisper", "echo"], token=token):
            assert await c.result("voice.providers.list") == {
                "providers": [
                    {"name": "echo", "engine": "echo", "sessions": 0},
                    {"name": "whisper", "engine": "echo", "sessions": 0},
                ]
            }
            missing = await c.call("voice.transcribe_stream.start", {"provider": "deepgram"})
            assert error_of(missing) == {
                "code": INTERNAL,
                "message": "no voice engine serves provider 'deepgram'",
            }
            several = error_of(await c.call("voice.transcribe_stream.start", {}))
            assert several["code"] == INVALID_PARAMS
            assert several["message"].endswith(": provider")
            started = await c.start(provider="whisper")
            assert started["provider"] == "whisper" and started["audio_source"] == "client"
            providers = (await c.result("voice.providers.list"))["providers"]
            assert [p["sessions"] for p in providers] == [0, 1]
        # The engine left: its session ended, and its providers went with it.
        gone = await c.next_event()
        assert gone["session_id"] == started["session_id"]
        assert gone["event"]["message"] == "voice engine 'echo' disconnected"
        assert await c.result("voice.providers.list") == {"providers": []}


async def test_a_provider_has_one_engine_and_register_comes_first(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    core, _ = served
    token = daemon_token(core)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        rival = EchoEngine(channel, ["echo"], name="rival", token=token)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rival.start()
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert e.value.details() == "provider 'echo' is served by voice engine 'echo'"

        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        call = stub.ServeVoice(metadata=(("authorization", f"Bearer {token}"),))
        end = voice_pb2.EndVoiceSession(session_id="x")
        await call.write(voice_pb2.ServeVoiceRequest(end=end))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "the first message must be `register`"

        greedy = EchoEngine(channel, [f"p{n}" for n in range(65)], name="greedy", token=token)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await greedy.start()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "an engine serves at most 64 providers"

        anonymous = stub.ServeVoice()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await anonymous.read()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_engine_that_refuses_a_session_fails_the_start(
    served: tuple[Core, Gateway],
) -> None:
    core, _ = served
    address, token = core.grpc_address, daemon_token(core)
    async with echo_engine(address, ["picky"], token=token, refuse="no such model"):
        async for c in client(served):
            answer = await c.call("voice.transcribe_stream.start", {"provider": "picky"})
            assert error_of(answer) == {
                "code": INTERNAL,
                "message": "voice engine 'echo' refused the session: no such model",
            }
            assert await c.result("voice.sessions.list") == {"sessions": []}


# ------------------------------------------------------------------ routing


async def test_events_reach_only_the_owning_connection(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    async for a in client(served):
        async for b in client(served):
            a_id = (await a.start(session_id=str(uuid.uuid4()).upper()))["session_id"]
            b_id = (await b.start())["session_id"]
            assert len(a_id) == 32 and a_id == a_id.lower()
            for seq in range(3):
                assert await push(a, a_id, b"\x00\x01" * (seq + 1)) == {
                    "session_id": a_id,
                    "seq": seq,
                }
            await b.ws.send(pcm_frame(b_id, 99, b"\x05\x00"))

            # Neither may touch the other's session: the same answer as for an unknown one.
            for method, params in (
                ("voice.transcribe_stream.push", {"session_id": a_id, "pcm_b64": b64(b"ab")}),
                ("voice.transcribe_stream.stop", {"session_id": a_id}),
            ):
                error = error_of(await b.call(method, params))
                assert error == {
                    "code": INVALID_PARAMS,
                    "message": f"invalid params: unknown voice session '{a_id}'",
                }
            assert [
                s["session_id"] for s in (await b.result("voice.sessions.list"))["sessions"]
            ] == [b_id]

            # The stop answers once every event is delivered, so what each client has read
            # by then is everything that was routed to it.
            a_stop = await a.result("voice.transcribe_stream.stop", {"session_id": a_id})
            b_stop = await b.result("voice.transcribe_stream.stop", {"session_id": b_id})
            assert a_stop == {"session_id": a_id, "stopped": True}
            assert b_stop == {"session_id": b_id, "stopped": True}
            a_events = [f["params"] for f in a.other]
            b_events = [f["params"] for f in b.other]
            assert {e["session_id"] for e in a_events} == {a_id}
            assert {e["session_id"] for e in b_events} == {b_id}
            assert [e["event"] for e in a_events] == [
                partial_event(0),
                final_event(0, 2),
                partial_event(1),
                final_event(1, 4),
                partial_event(2),
                final_event(2, 6),
                {"type": "ended", "reason": "stopped", "terminal": True},
            ]
            assert [e["event"] for e in b_events] == [
                partial_event(0),
                final_event(0, 2),
                {"type": "ended", "reason": "stopped", "terminal": True},
            ]
            assert await a.result("voice.sessions.list") == {"sessions": []}


async def test_binary_frames_in_and_speech_out_round_trip(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    async for c in client(served):
        session_id = (await c.start(options={"tts": True}))["session_id"]
        opened = await bounded(engine.opened.get())
        assert opened.session_id == session_id and opened.audio_source == "client"
        assert opened.voice_session_id == session_id  # its typed name
        payloads = [b"\x01\x00\x02\x00", b"\x03\x00", b"\x04\x00\x05\x00\x06\x00"]
        # A binary frame, a JSON push and a binary frame again, sent back to back: they
        # reach the engine in the order sent, numbered 0, 1, 2.
        await c.ws.send(pcm_frame(session_id, 500, payloads[0]))
        await c.send(
            {
                "jsonrpc": "2.0",
                "id": "p",
                "method": "voice.transcribe_stream.push",
                "params": {"session_id": session_id, "pcm_b64": b64(payloads[1])},
            }
        )
        await c.ws.send(pcm_frame(session_id, 501, payloads[2]))
        speech = [decode(await c.next_binary()) for _ in payloads]
        received = engine.audio[session_id]
        assert [(a.seq, a.data) for a in received] == list(enumerate(payloads))
        assert all(a.type == voice_pb2.AUDIO_FRAME_TYPE_PCM for a in received)
        for seq, (frame, payload) in enumerate(zip(speech, payloads, strict=True)):
            assert frame.type == voice_pb2.AUDIO_FRAME_TYPE_TTS_CHUNK
            assert frame.session_id == session_id
            assert frame.seq == seq
            assert frame.format == voice_pb2.AUDIO_FORMAT_MP3
            assert frame.data == payload
        await c.result("voice.transcribe_stream.stop", {"session_id": session_id})
        final = decode(await c.next_binary())
        assert final.type == voice_pb2.AUDIO_FRAME_TYPE_TTS_FINAL
        assert final.session_id == session_id and final.data == b""


async def test_malformed_binary_frames_get_a_clear_error(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    async for c in client(served):
        session_id = (await c.start())["session_id"]
        head = uuid.UUID(session_id).bytes + struct.pack("<Q", 0) + b"\x00"
        for data, message in (
            (b"\x01\x02\x03", "3 bytes is shorter than the 26-byte audio frame header"),
            (b"\x07" + head + b"ab", "unknown frame type 0x07"),
            (
                b"\x02" + head + b"ab",
                "type 0x02 (TTS chunk) goes from the server to the client; clients send 0x01"
                " (PCM in)",
            ),
            (b"\x01" + head + b"abc", "PCM16LE payload of odd length (3 bytes)"),
        ):
            await c.ws.send(data)
            reply = await c.recv()
            assert reply == {
                "jsonrpc": "2.0",
                "id": None,
                "error": {"code": INVALID_REQUEST, "message": f"invalid binary frame: {message}"},
            }
        # A well-formed frame for a session that is not this connection's: an error event
        # for that id, not terminal (nothing of this connection ended).
        stranger = uuid.uuid4().hex
        await c.ws.send(pcm_frame(stranger, 0, b"\x01\x00"))
        assert await c.next_event() == {
            "session_id": stranger,
            "event": {
                "type": "error",
                "message": f"invalid params: unknown voice session '{stranger}'",
            },
        }
        # JSON in a binary frame still works, and so does the session.
        await c.ws.send(b'{"jsonrpc":"2.0","id":"j","method":"voice.sessions.list"}')
        assert len((await c.recv())["result"]["sessions"]) == 1
        await c.ws.send(pcm_frame(session_id, 1, b"\x07\x00"))
        assert (await c.next_event())["event"] == partial_event(0)
        assert (await c.next_event())["event"] == final_event(0, 2)


# ------------------------------------------------------------------ endings and stalls


async def test_an_engine_that_disconnects_ends_its_sessions_with_an_error_event(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    async for c in client(served):
        session_id = (await c.start())["session_id"]
        await push(c, session_id, b"\x01\x00")
        assert (await c.next_event())["event"] == partial_event(0)
        assert (await c.next_event())["event"] == final_event(0, 2)
        await engine.close()
        assert await c.next_event() == {
            "session_id": session_id,
            "event": {
                "type": "error",
                "message": "voice engine 'echo' disconnected",
                "terminal": True,
            },
        }
        assert await c.result("voice.sessions.list") == {"sessions": []}
        assert await c.result("voice.providers.list") == {"providers": []}
        late = await c.call(
            "voice.transcribe_stream.push", {"session_id": session_id, "pcm_b64": b64(b"ab")}
        )
        assert error_of(late)["code"] == INVALID_PARAMS


async def test_an_engine_that_ends_a_session_itself(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    async for c in client(served):
        first = (await c.start())["session_id"]
        second = (await c.start())["session_id"]
        await engine.send(
            voice_pb2.ServeVoiceRequest(end=voice_pb2.EndVoiceSession(session_id=first))
        )
        failed = voice_pb2.EndVoiceSession(session_id=second, error="model crashed")
        await engine.send(voice_pb2.ServeVoiceRequest(end=failed))
        assert await c.next_event() == {
            "session_id": first,
            "event": {"type": "ended", "reason": "engine", "terminal": True},
        }
        assert await c.next_event() == {
            "session_id": second,
            "event": {"type": "error", "message": "model crashed", "terminal": True},
        }
        assert await c.result("voice.sessions.list") == {"sessions": []}


async def test_a_stop_the_engine_never_confirms_ends_the_session_in_bounded_time(
    tmp_path: Any,
) -> None:
    config = make_config(tmp_path, voice_ack_timeout=0.2, voice_stall_timeout=0.2)
    async with running(config) as served:
        core, _ = served
        async with echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)) as engine:
            async for c in client(served):
                session_id = (await c.start(options={"ignore_stop": True}))["session_id"]
                stop = await c.result("voice.transcribe_stream.stop", {"session_id": session_id})
                assert stop == {"session_id": session_id, "stopped": False}
                message = "voice engine 'echo' did not end the session in time"
                assert await c.next_event() == {
                    "session_id": session_id,
                    "event": {"type": "error", "message": message, "terminal": True},
                }
                closed = await bounded(engine.closed.get())
                assert (closed.session_id, closed.reason) == (session_id, message)


async def test_an_engine_that_sends_what_it_must_not_ends_that_session_only(
    tmp_path: Any,
) -> None:
    config = make_config(tmp_path, voice_max_chunk_bytes=1024)
    async with running(config) as served:
        core, _ = served
        async with echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)) as engine:
            async for c in client(served):
                big, wrong, fine = [(await c.start())["session_id"] for _ in range(3)]
                await engine.event(big, {"type": "transcript", "text": "x" * 2000})
                pcm_back = voice_pb2.VoiceAudio(
                    session_id=wrong, type=voice_pb2.AUDIO_FRAME_TYPE_PCM, data=b"ab"
                )
                await engine.send(voice_pb2.ServeVoiceRequest(audio=pcm_back))
                assert await c.next_event() == {
                    "session_id": big,
                    "event": {
                        "type": "error",
                        "message": "voice event of 2040 bytes is over 1024",
                        "terminal": True,
                    },
                }
                bad_audio = await c.next_event()
                assert bad_audio["session_id"] == wrong
                assert bad_audio["event"]["message"] == (
                    "voice engine 'echo' sent invalid audio: audio from an engine must be "
                    "TTS_CHUNK, TTS_FINAL or TTS_ERROR"
                )
                # The engine was told, and serves the other session as before.
                told = {(await bounded(engine.closed.get())).session_id for _ in range(2)}
                assert told == {big, wrong}
                await push(c, fine, b"\x01\x00")
                assert await c.next_event() == {"session_id": fine, "event": partial_event(0)}


async def test_a_client_that_stops_reading_loses_its_session_and_nobody_else_waits(
    tmp_path: Any,
) -> None:
    config = make_config(tmp_path, voice_event_queue=4, session_outbound_queue=8)
    async with running_core(config.core) as core:
        token = daemon_token(core)
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            engine = EchoEngine(channel, ["echo"], token=token)
            await engine.start()
            slow = await connect(channel, token=token)
            fast = await connect(channel, token=token)
            start = voice_pb2.StartTranscribeStreamRequest()
            slow_id = (await slow.request("voice_transcribe_stream_start", start)).session_id
            fast_id = (await fast.request("voice_transcribe_stream_start", start)).session_id
            slow.pause_reading()
            # The engine keeps talking to the slow client until the server gives up on it.
            sent = 0
            while engine.closed.empty():
                await engine.event(slow_id, {"type": "transcript", "final": False, "n": sent})
                sent += 1
                assert sent < 100_000, "the session never ended"
            closed = await bounded(engine.closed.get())
            assert closed.session_id == slow_id
            assert closed.reason == "client not reading: 4 voice events queued"
            # The engine and the other client go on.
            push = voice_pb2.PushTranscribeAudioRequest(session_id=fast_id, pcm_b64=b64(b"ab"))
            await fast.request("voice_transcribe_stream_push", push)
            first = await fast.next_notification()
            assert codec.value_to_json(first.voice_event.event) == partial_event(0)
            # Once it reads again, the slow client finds its session ended with an error.
            slow.resume_reading()
            while True:
                frame = await slow.next_notification()
                event = codec.value_to_json(frame.voice_event.event)
                if event.get("terminal"):
                    break
            assert event == {
                "type": "error",
                "message": "client not reading: 4 voice events queued",
                "terminal": True,
            }
            for c in (slow, fast):
                await c.close()
            await engine.close()


async def test_an_engine_that_stops_reading_is_dropped_with_a_clear_error(
    tmp_path: Any,
) -> None:
    config = make_config(tmp_path, voice_stall_timeout=0.3, voice_audio_queue=2)
    async with running(config) as served:
        core, _ = served
        async with echo_engine(core.grpc_address, ["echo"], token=daemon_token(core)) as engine:
            async for c in client(served):
                session_id = (await c.start())["session_id"]
                engine.pause_reading()
                chunk = b64(b"\x00" * (256 * 1024))
                for n in range(64):  # far more than the transport buffers, not awaited
                    params = {"session_id": session_id, "pcm_b64": chunk}
                    await c.send(
                        {"jsonrpc": "2.0", "id": f"p{n}", "method": "voice.transcribe_stream.push"}
                        | {"params": params}
                    )
                answers: dict[str, dict[str, Any]] = {}
                terminal: dict[str, Any] = {}
                try:
                    while len(answers) < 64 or not terminal:
                        frame = await c.recv()
                        if frame.get("method") != "voice.event":
                            answers[frame["id"]] = frame
                        elif frame["params"]["event"].get("terminal"):
                            terminal = frame["params"]
                finally:
                    engine.resume_reading()  # else a failure here hangs the teardown instead
                # The write to the engine blocked and the audio queue stopped moving: the
                # session ended with whichever of the two the server saw first.
                message = terminal["event"]["message"]
                assert message in (
                    "voice engine 'echo' not reading: a message waited 0.3s",
                    "voice engine 'echo' took no audio for 0.3s",
                )
                assert terminal == {
                    "session_id": session_id,
                    "event": {"type": "error", "message": message, "terminal": True},
                }
                # Pushes before the stall were taken in order; those waiting failed with
                # the session's end, and any the core read only after it ended (the
                # gateway paces a session's frames to the core) found no session.
                results = [answers[f"p{n}"] for n in range(64)]
                taken = [r["result"]["seq"] for r in results if "result" in r]
                assert taken == list(range(len(taken)))
                failed = [r["error"] for r in results if "error" in r]
                ended = {
                    "code": INTERNAL,
                    "message": f"voice session '{session_id}' ended: {message}",
                }
                gone = {
                    "code": INVALID_PARAMS,
                    "message": f"invalid params: unknown voice session '{session_id}'",
                }
                assert failed and failed[0] == ended
                kinds = ["ended" if e == ended else "gone" if e == gone else "?" for e in failed]
                assert "?" not in kinds, failed
                assert kinds == sorted(kinds)  # every "ended" before any "gone"
                await asyncio.wait_for(engine.ended.wait(), 5)
                assert engine.end_code not in (None, grpc.StatusCode.OK)
                assert await c.result("voice.providers.list") == {"providers": []}


# ------------------------------------------------------------------ gRPC producers and typed calls


async def test_publish_voice_event_reaches_the_owner(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    core, _ = served
    async for c in client(served):
        session_id = (await c.start())["session_id"]
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            stub = voice_pb2_grpc.VoiceServiceStub(channel)
            metadata = (("authorization", f"Bearer {daemon_token(core)}"),)
            request = voice_pb2.PublishVoiceEventRequest(
                session_id=str(uuid.UUID(session_id)), event=codec.to_value({"type": "note"})
            )
            assert (await stub.PublishVoiceEvent(request, metadata=metadata)).delivered
            assert await c.next_event() == {"session_id": session_id, "event": {"type": "note"}}
            request.session_id = uuid.uuid4().hex
            assert not (await stub.PublishVoiceEvent(request, metadata=metadata)).delivered
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.PublishVoiceEvent(request)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_typed_calls_bound_to_a_session_stream(
    served: tuple[Core, Gateway], engine: EchoEngine
) -> None:
    core, _ = served
    token = daemon_token(core)
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        session = SessionClient(channel)
        auth = session_pb2.AuthenticateRequest(token=token)
        auth = await session.request("session_auth", auth)
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        bound = (("authorization", f"Bearer {token}"), ("car-session-id", auth.session_id))
        started = await stub.StartTranscribeStream(
            voice_pb2.StartTranscribeStreamRequest(), metadata=bound
        )
        push = voice_pb2.PushTranscribeAudioRequest(
            session_id=started.session_id, pcm_b64=b64(b"\x01\x00")
        )
        assert (await stub.PushTranscribeAudio(push, metadata=bound)).seq == 0
        frame = await session.next_notification()
        assert frame.voice_event.session_id == started.session_id
        assert codec.value_to_json(frame.voice_event.event) == partial_event(0)
        # Unbound, the call has no stream to deliver events on.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.StartTranscribeStream(
                voice_pb2.StartTranscribeStreamRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        assert (e.value.details() or "").startswith("voice sessions need a session stream")
        await session.close()
