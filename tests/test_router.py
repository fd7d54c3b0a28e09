"""The router: built from domain objects, it serves every request member once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from car_grpc.core.router import Router, handles, handles_notification, streams
from car_grpc.core.session import ClientSession
from car_grpc.v1 import chats_pb2, runs_pb2, tools_pb2, voice_pb2
from tests.conftest import make_config
from tests.ws_helpers import running_core


class _Lists:
    @handles("tools_list", inline=True)
    async def tools_list(
        self, session: ClientSession, req: tools_pb2.ListToolsRequest
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse()


class _Watches:
    @streams("WatchRun")
    async def watch(
        self, session: ClientSession, req: runs_pb2.WatchRunRequest
    ) -> AsyncIterator[runs_pb2.WatchRunResponse]:
        yield runs_pb2.WatchRunResponse()


def test_marked_methods_are_served_bound_to_their_object() -> None:
    lists, watches = _Lists(), _Watches()
    router = Router([lists, watches])
    served: object = router.requests["tools_list"]
    assert served == lists.tools_list  # the method, bound to that object
    assert router.inline == {"tools_list"}
    streamed: object = router.streams["WatchRun"]
    assert streamed == watches.watch
    assert "tools_list" not in router.unserved() and "runs_start" in router.unserved()


def test_a_member_served_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="two handlers for 'tools_list'"):
        Router([_Lists(), _Lists()])


def test_marking_an_unknown_member_fails_at_once() -> None:
    with pytest.raises(ValueError, match="not a request member"):
        handles("tools_lists")
    with pytest.raises(ValueError, match="not a server-streaming typed RPC"):
        streams("WatchRuns")


async def test_the_wired_core_serves_every_request(tmp_path: Path) -> None:
    async with running_core(make_config(tmp_path).core) as core:
        assert core.parts is not None
        assert core.parts.router.unserved() == []
        assert set(core.parts.router.streams) == {"WatchRun", "WatchHostEvents", "Chat"}
        assert set(core.parts.router.grpc_only) == {
            "car.v1.VoiceService.ServeVoice",
            "car.v1.VoiceService.ServeVoiceBatched",
            "car.v1.VoiceService.PublishVoiceEvent",
            "car.v1.ToolService.ServeTools",
        }


class _Notices:
    @handles_notification("agent_chat_event")
    def at_once(self, session: ClientSession, notice: chats_pb2.AgentChatEventNotice) -> None:
        return None


class _AsyncNotice:
    @handles_notification("voice_audio")
    async def in_a_task(self, session: ClientSession, audio: voice_pb2.VoiceAudio) -> None:
        return None


def test_notification_handlers_are_plain_functions_run_at_once() -> None:
    notices = _Notices()
    router = Router([notices])
    assert router.at_once == {"agent_chat_event": notices.at_once}
    # What a handler has to wait for it returns as an awaitable: a coroutine function,
    # a second way to say the same, is refused.
    with pytest.raises(ValueError, match="'voice_audio' is a coroutine function"):
        Router([_AsyncNotice()])
