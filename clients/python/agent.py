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


# guide:agent
class Agent:
    """Serves the chats that the server sends to one session stream."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cancelled: set[str] = set()  # the chats a host cancelled
        session.on_request = self.on_request
        session.on_notification = self.on_notification

    async def attach(self) -> str:
        """session_auth with {token, agent_id} first: this session is now the agent (a newer
        attach of the same agent replaces it); then server_handshake. Returns its id."""
        auth = session_pb2.AuthenticateRequest(token=TOKEN, agent_id=AGENT_ID)
        authed = await self.session.request(ClientFrame(session_auth=auth))
        handshake = session_pb2.HandshakeRequest(
            protocol_version_number=3, client_version="car-grpc-python-examples"
        )
        await self.session.request(ClientFrame(server_handshake=handshake))
        return authed.session_auth.session_id

    async def on_request(self, frame: ServerFrame) -> None:
        """Requests from the server (ids `cb-N`): answer each exactly once."""
        body = frame.WhichOneof("body")
        if body == "agent_chat":
            await self.serve_chat(frame.id, frame.agent_chat)
        elif body == "agent_chat_approve":
            resolved = chats_pb2.AgentChatApproveResponse(resolved=True)
            await self.session.send(ClientFrame(id=frame.id, agent_chat_approve=resolved))
        else:
            error = errors_pb2.Error(code=-32601, message=f"unknown method: {body}")
            await self.session.send(ClientFrame(id=frame.id, error=error))

    async def on_notification(self, frame: ServerFrame) -> None:
        """Notifications: the host cancelled a chat."""
        if frame.WhichOneof("body") == "agent_chat_cancel":
            self.cancelled.add(frame.agent_chat_cancel.chat_id)

    async def serve_chat(self, request_id: str, chat: chats_pb2.AgentChatRequest) -> None:
        # Ack first: the host's agents.chat returns only once the agent accepted (within 5 s).
        accept = chats_pb2.AgentChatResponse(accepted=True)
        await self.session.send(ClientFrame(id=request_id, agent_chat=accept))
        # chat_id is the chat's id (`session_id` on the JSON wire).
        log("chat", session_id=chat.chat_id, prompt=chat.prompt)
        for word in re.split(r"(?<= )", reply(chat.prompt)):
            if chat.chat_id in self.cancelled:
                return
            await self.event(chat.chat_id, chats_pb2.CHAT_EVENT_KIND_TOKEN, word)
        await self.event(chat.chat_id, chats_pb2.CHAT_EVENT_KIND_DONE)  # terminal: it is over

    async def event(
        self, chat_id: str, kind: chats_pb2.ChatEventKind.ValueType, delta: str | None = None
    ) -> None:
        # chat_id and kind_enum alone: the server fills `session_id` and `kind` from them.
        event = chats_pb2.ChatEvent(kind_enum=kind, delta=delta)
        notice = chats_pb2.AgentChatEventNotice(chat_id=chat_id, event=event)
        await self.session.send(ClientFrame(agent_chat_event=notice))


# guide:end


async def main() -> int:
    async with channel() as ch:
        session = Session(ch)
        agent = Agent(session)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, session.close)
        try:
            log("ready", agent_id=AGENT_ID, session_id=await agent.attach())
        except CarError as e:
            fail(e)
        ended = await session.ended
        log("ended", error=ended.message if ended else None)
        return 1 if ended else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
