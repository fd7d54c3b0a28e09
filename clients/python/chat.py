"""A host in Python: opens a chat with an attached agent through ChatService.Chat and
prints the reply as it streams, until the chat's terminal event.

    python chat.py <agent_id> <prompt>      # authenticates with the daemon token
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from car import channel, daemon_token, fail, log, metadata

from car_grpc.v1 import chats_pb2, chats_pb2_grpc

TERMINAL = {
    chats_pb2.CHAT_EVENT_KIND_DONE,
    chats_pb2.CHAT_EVENT_KIND_ERROR,
    chats_pb2.CHAT_EVENT_KIND_AUTH_REQUIRED,
}


async def main(agent_id: str, prompt: str) -> None:
    text = ""
    async with channel() as ch:
        chats = chats_pb2_grpc.ChatServiceStub(ch)
        # guide:chat
        request = chats_pb2.ChatRequest(agent_id=agent_id, prompt=prompt)
        # Cancelling the call (its timeout, or call.cancel()) cancels the chat at the agent.
        call = chats.Chat(request, metadata=metadata(daemon_token()), timeout=60)
        try:
            async for item in call:
                if item.WhichOneof("item") == "accepted":
                    log("accepted", session_id=item.accepted.chat_id)  # the chat's id
                elif item.WhichOneof("item") == "event":
                    # ChatEventNotice{session_id, agent_id, event}; kind_enum is kind as an
                    # enum (UNSPECIFIED for a kind outside it).
                    event = item.event.event
                    if event.kind_enum == chats_pb2.CHAT_EVENT_KIND_TOKEN:
                        text += event.delta
                    delta = event.delta if event.HasField("delta") else None
                    log("event", kind=event.kind, delta=delta)
                    if event.kind_enum in TERMINAL:
                        log("reply", text=text)
        except grpc.aio.AioRpcError as e:
            fail(e)
        log("end")  # the stream ended with OK after the terminal event
        # guide:end


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Chats with an attached agent.")
    parser.add_argument("agent_id")
    parser.add_argument("prompt")
    args = parser.parse_args()
    asyncio.run(main(args.agent_id, args.prompt))
