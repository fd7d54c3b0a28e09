"""End-to-end byte bound of a voice session's events towards its owner
(`voice_event_queue_bytes`): an owner that lets more bytes pile up than it allows loses
the session, as past the item bound, though the item bound is far away."""

from __future__ import annotations

from pathlib import Path

import grpc

from car_grpc.v1 import voice_pb2
from car_grpc.wire import codec
from tests.bounded import bounded
from tests.conftest import make_config
from tests.session_client import connect
from tests.voice_helpers import EchoEngine
from tests.ws_helpers import daemon_token, running_core

QUEUE_BYTES = 64 * 1024


async def test_an_owner_that_lets_large_events_pile_up_past_the_byte_bound_loses_its_session(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        voice_event_queue=10_000,
        voice_event_queue_bytes=QUEUE_BYTES,
        session_outbound_queue=8,
    )
    async with running_core(config.core) as core:
        token = daemon_token(core)
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            engine = EchoEngine(channel, ["echo"], token=token)
            await engine.start()
            slow = await connect(channel, token=token)
            start = voice_pb2.StartTranscribeStreamRequest()
            slow_id = (await slow.request("voice_transcribe_stream_start", start)).session_id
            slow.pause_reading()
            text = "x" * 8192
            sent = 0
            while engine.closed.empty():
                await engine.event(slow_id, {"type": "transcript", "final": False, "text": text})
                sent += 1
                assert sent < 10_000, "the session never ended"
            closed = await bounded(engine.closed.get())
            assert closed.session_id == slow_id
            prefix = "client not reading: "
            suffix = f" bytes of voice events queued (at most {QUEUE_BYTES})"
            assert closed.reason.startswith(prefix) and closed.reason.endswith(suffix)
            queued = int(closed.reason.removeprefix(prefix).removesuffix(suffix))
            assert QUEUE_BYTES - 2 * len(text) < queued <= QUEUE_BYTES
            # Once it reads again, the owner finds its session ended with that error.
            slow.resume_reading()
            while True:
                frame = await slow.next_notification()
                event = codec.value_to_json(frame.voice_event.event)
                if event.get("terminal"):
                    break
            assert event == {"type": "error", "message": closed.reason, "terminal": True}
            await slow.close()
            await engine.close()
