"""An agent in Python. It attaches over SessionService.Connect with its agent token and
serves every chat a host opens with it: ack the `agent.chat` request, stream the reply as
`token` events, end with `done`.

    car-grpc agents add my-agent                      # prints the agent token, once
    CAR_AGENT_ID=my-agent CAR_AGENT_TOKEN=<token> python agent.py
"""

from __future__ import annotations

import asyncio
import os
import re
import signal

from car import CarError, Session, channel, fail, log

from car_grpc.v1 import chats_pb2, errors_pb2, session_pb2
from car_grpc.v1.session_pb2 import ClientFrame, ServerFrame

AGENT_ID = os.environ.get("CAR_AGENT_ID", "")
TOKEN = os.environ.get("CAR_AGENT_TOKEN", "")


def reply(prompt: str) -> str:
    """The agent's brain. A real agent would call a model here and stream what it says."""
    return f"Python agent {AGENT_ID} heard: {prompt}"


async def main() -> int:
    async with channel() as ch:
        # guide:agent
        session = Session(ch)
        cancelled: set[str] = set()

        async def serve_chat(request_id: str, chat: chats_pb2.AgentChatRequest) -> None:
            # Ack first: the host's agents.chat returns only once the agent accepted (5 s).
            accept = chats_pb2.AgentChatResponse(accepted=True)
            await session.send(ClientFrame(id=request_id, agent_chat=accept))
            # chat_id is the chat's id (`session_id` on the JSON wire).
            log("chat", session_id=chat.chat_id, prompt=chat.prompt)

            async def event(kind: chats_pb2.ChatEventKind.ValueType, delta: str | None) -> None:
                # chat_id and kind_enum alone: the server fills `session_id` and `kind`.
                notice = chats_pb2.AgentChatEventNotice(
                    chat_id=chat.chat_id, event=chats_pb2.ChatEvent(kind_enum=kind, delta=delta)
                )
                await session.send(ClientFrame(agent_chat_event=notice))

            for word in re.split(r"(?<= )", reply(chat.prompt)):
                if chat.chat_id in cancelled:
                    return
                await event(chats_pb2.CHAT_EVENT_KIND_TOKEN, word)
            await event(chats_pb2.CHAT_EVENT_KIND_DONE, None)  # terminal: the chat is over

        # Requests from the server (ids `cb-N`): answer each exactly once.
        async def on_request(frame: ServerFrame) -> None:
            body = frame.WhichOneof("body")
            if body == "agent_chat":
                await serve_chat(frame.id, frame.agent_chat)
            elif body == "agent_chat_approve":
                resolved = chats_pb2.AgentChatApproveResponse(resolved=True)
                await session.send(ClientFrame(id=frame.id, agent_chat_approve=resolved))
            else:
                error = errors_pb2.Error(code=-32601, message=f"unknown method: {body}")
                await session.send(ClientFrame(id=frame.id, error=error))

        # Notifications: the host cancelled a chat.
        async def on_notification(frame: ServerFrame) -> None:
            if frame.WhichOneof("body") == "agent_chat_cancel":
                cancelled.add(frame.agent_chat_cancel.chat_id)

        session.on_request, session.on_notification = on_request, on_notification
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, session.close)

        try:
            # session_auth with {token, agent_id} first: this session is now the agent (a
            # newer attach of the same agent replaces it); then server_handshake.
            auth = session_pb2.AuthenticateRequest(token=TOKEN, agent_id=AGENT_ID)
            authed = (await session.request(ClientFrame(session_auth=auth))).session_auth
            handshake = session_pb2.HandshakeRequest(
                protocol_version_number=3, client_version="car-grpc-python-examples"
            )
            await session.request(ClientFrame(server_handshake=handshake))
            log("ready", agent_id=AGENT_ID, session_id=authed.session_id)
        except CarError as e:
            fail(e)
        # guide:end
        ended = await session.ended
        log("ended", error=ended.message if ended else None)
        return 1 if ended else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
