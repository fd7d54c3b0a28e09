"""A request's answer is serialized from its parts (session.answer_bytes): the bytes of
the ServerFrame that copies the reply in, for a typed session its twins derived, for a
bridged one (car-grpc's own gateway, which reads none) without them."""

from __future__ import annotations

from google.protobuf.message import Message

from car_grpc.core.session import answer_bytes
from car_grpc.v1 import chats_pb2, session_pb2, tools_pb2
from car_grpc.wire.twins import fill_out


def _copied(request_id: str, member: str, reply: Message) -> bytes:
    frame = session_pb2.ServerFrame(id=request_id)
    getattr(frame, member).CopyFrom(reply)
    return fill_out(frame).SerializeToString()


def test_the_answer_is_the_frame_the_reply_is_copied_into() -> None:
    replies: list[tuple[str, Message]] = [
        ("tools_unregister", tools_pb2.UnregisterToolResponse()),  # empty: still set
        ("tools_unregister", tools_pb2.UnregisterToolResponse(unregistered="t", removed=1)),
        ("agents_chat", chats_pb2.ChatAccepted(accepted=True, session_id="s" * 200)),
    ]
    for request_id in ("7", "a-much-longer-request-id-" * 8):
        for member, reply in replies:
            expected = _copied(request_id, member, reply)
            assert answer_bytes(request_id, member, reply, twins=True) == expected
            assert session_pb2.ServerFrame.FromString(expected).WhichOneof("body") == member


def test_a_bridged_session_gets_no_twins() -> None:
    reply = chats_pb2.ChatAccepted(accepted=True, session_id="chat-1")
    bare = answer_bytes("3", "agents_chat", reply, twins=False)
    frame = session_pb2.ServerFrame.FromString(bare)
    assert frame.agents_chat.session_id == "chat-1" and not frame.agents_chat.chat_id
    typed = session_pb2.ServerFrame.FromString(answer_bytes("3", "agents_chat", reply, twins=True))
    assert typed.agents_chat.chat_id == "chat-1"  # the twin, derived
