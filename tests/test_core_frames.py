"""A batch from the core read from its bytes (gateway/core_frames.py): every frame becomes
the client's text Bridge.from_core writes for the frame parsed, whatever its shape, and
in order; a notification that is params_text alone is read without protobuf."""

from __future__ import annotations

from car_grpc.core.runs import _text_event
from car_grpc.gateway import core_frames
from car_grpc.gateway.jsonrpc import Bridge
from car_grpc.v1 import runs_pb2, session_pb2
from car_grpc.wire import batch


def _frames() -> list[session_pb2.ServerFrame]:
    run_event = '{"run_id":"r","cursor":%d,"record":{"record":"turn","prompt":"%s"}}'
    frames = [
        session_pb2.ServerFrame.FromString(_text_event(run_event % (i, "p" * i)))
        for i in (0, 1, 200, 20000)  # lengths of one, two and three bytes of varint
    ]
    chat = session_pb2.ServerFrame()
    chat.agents_chat_event.params_text = '{"session_id":"s","kind":"token","delta":"x"}'
    frames.append(chat)
    frames.append(session_pb2.ServerFrame(runs_trace_event=runs_pb2.RunTraceEvent(
        run_id="r", cursor=3, params_text=""  # no text: the event's fields
    )))  # fmt: skip
    not_ascii = session_pb2.ServerFrame()
    not_ascii.runs_trace_event.params_text = '{"run_id":"r\u00e9"}'
    frames.append(not_ascii)
    with_id = session_pb2.ServerFrame(id="7")  # not a notification's shape
    with_id.runs_trace_event.params_text = '{"run_id":"r"}'
    frames.append(with_id)
    both = session_pb2.ServerFrame()  # params_text and another field
    both.runs_trace_event.params_text = '{"run_id":"r"}'
    both.runs_trace_event.cursor = 9
    frames.append(both)
    done = session_pb2.ServerFrame()  # a chat event written from its fields
    done.agents_chat_event.session_id = "s"
    done.agents_chat_event.event.kind = "done"
    frames.append(done)
    return frames


def test_every_frame_is_the_text_of_the_frame_parsed() -> None:
    frames = _frames()
    data = batch.encode([frame.SerializeToString() for frame in frames])
    expected = [Bridge().from_core(frame) for frame in frames]
    read = list(core_frames.frames(data))
    assert [Bridge().from_core(f) if not isinstance(f, str) else f for f in read] == expected
    # The texts of the first five (params_text alone, ASCII) came without protobuf.
    assert [isinstance(f, str) for f in read] == [True] * 5 + [False] * 5
    # From any frame on, what is left of the batch is a batch.
    at, rest = 0, []
    while at < len(data):
        _, at = core_frames.read(data, at)
        rest.append(list(core_frames.frames(data[at:])))
    assert [len(r) for r in rest] == list(range(len(frames) - 1, -1, -1))


def test_bytes_not_written_as_batch_encode_writes_them_are_read_by_protobuf() -> None:
    frames = _frames()[:2]
    # The same batch, with an unknown field first: protobuf skips it.
    data = b"\x10\x01" + batch.encode([frame.SerializeToString() for frame in frames])
    assert core_frames.read(data, 0) == (None, 0)
    read = list(core_frames.frames(data))
    assert read == frames  # parsed, not read from the bytes
