"""The JSON-RPC method table built from the descriptors covers PROTOCOL.md §2-§7."""

from __future__ import annotations

import re
from pathlib import Path

from car_grpc import api
from car_grpc.v1 import session_pb2

SHARED = Path(__file__).resolve().parents[2] / "shared" / "PROTOCOL.md"

# Every method of PROTOCOL.md §2-§7, by direction. Server-initiated requests and
# notifications are the ones the server sends.
CLIENT_REQUESTS = {
    "session.auth", "server.handshake", "session.init", "session.clear_halt",
    "tools.register", "tools.list", "tools.unregister", "proposal.submit",
    "policy.register", "policy.unregister", "policy.list",
    "state.get", "state.set", "state.exists", "state.keys", "state.snapshot",
    "runs.start", "runs.complete", "runs.record_turns", "runs.subscribe", "runs.unsubscribe",
    "runs.list", "runs.get_trace",
    "agents.chat", "agents.chat.cancel", "agents.chat.approve",
    "goal.set", "goal.status", "goal.clear",
    "host.subscribe", "host.register_agent", "host.unregister_agent", "host.set_status",
    "host.request_approval", "host.approvals", "host.resolve_approval",
    "voice.transcribe_stream.start", "voice.transcribe_stream.push",
    "voice.transcribe_stream.stop", "voice.sessions.list", "voice.providers.list",
    "meeting.start", "meeting.stop", "meeting.list", "meeting.get",
}  # fmt: skip
SERVER_REQUESTS = {"tools.execute", "agent.chat", "agent.chat.approve"}
SERVER_NOTIFICATIONS = {
    "tools.cancel", "agents.chat.event", "agent.chat.cancel", "runs.trace.event",
    "host.event", "voice.event",
}  # fmt: skip
CLIENT_NOTIFICATIONS = {"agent.chat.event"}


def test_every_client_request_has_a_typed_request_and_response() -> None:
    assert set(api.CLIENT_REQUESTS) >= CLIENT_REQUESTS
    for method in api.CLIENT_REQUESTS:
        response = api.SERVER_RESPONSES[method]
        assert response.field == api.CLIENT_REQUESTS[method].field


def test_server_initiated_requests_have_typed_answers() -> None:
    assert set(api.SERVER_REQUESTS) == SERVER_REQUESTS
    for method in SERVER_REQUESTS:
        assert api.CLIENT_RESPONSES[method].field == api.SERVER_REQUESTS[method].field


def test_notifications_both_ways() -> None:
    assert set(api.SERVER_NOTIFICATIONS) == SERVER_NOTIFICATIONS
    assert set(api.CLIENT_NOTIFICATIONS) == CLIENT_NOTIFICATIONS


def test_audio_travels_as_binary_frames_both_ways() -> None:
    assert set(api.CLIENT_BINARY) == set(api.SERVER_BINARY) == {"voice_audio"}
    for member in [*api.CLIENT_BINARY.values(), *api.SERVER_BINARY.values()]:
        assert member.method == "" and member.message.name == "VoiceAudio"


def test_bare_params_and_results_are_declared() -> None:
    assert api.CLIENT_REQUESTS["tools.register"].bare_field == "tools"
    assert api.SERVER_RESPONSES["tools.register"].bare_field == "count"
    for member in [*api.CLIENT_MEMBERS.values(), *api.SERVER_MEMBERS.values()]:
        if member.bare_field:
            assert member.bare_field in member.message.fields_by_name, member


def test_every_frame_member_but_error_is_bound() -> None:
    for frame, members in (
        (session_pb2.ClientFrame, api.CLIENT_MEMBERS),
        (session_pb2.ServerFrame, api.SERVER_MEMBERS),
    ):
        names = {f.name for f in frame.DESCRIPTOR.oneofs_by_name["body"].fields}
        assert names - set(members) == {"error"}


def test_protocol_md_methods_are_all_in_the_table() -> None:
    """Every backticked dotted method name in PROTOCOL.md §2-§7 is in the table."""
    if not SHARED.exists():  # the spec lives beside the checkout (../shared)
        raise AssertionError(f"PROTOCOL.md not found at {SHARED}")
    text = SHARED.read_text()
    body = text[text.index("## 2.") : text.index("## 8.")]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)", body))
    known = (
        set(api.CLIENT_REQUESTS) | set(api.SERVER_REQUESTS) | set(api.SERVER_NOTIFICATIONS)
        | set(api.CLIENT_NOTIFICATIONS)
    )  # fmt: skip
    # Names in backticks that are not methods: gated examples, host event kinds, the
    # approval action prefix.
    not_methods = {
        "automation.run_applescript", "automation.run_powershell", "automation.shortcuts.run",
        "messages.send", "mail.send", "vision.ocr", "calendar.create_event",
        "calendar.update_event", "calendar.delete_event", "agent.registered",
        "agent.unregistered", "agent.status_changed", "approval.requested",
        "approval.resolved", "host.notification", "ws.method", "data.terminal",
        "goal.max_iterations",
    }  # fmt: skip
    missing = named - known - not_methods
    assert not missing, f"methods of PROTOCOL.md without a typed binding: {sorted(missing)}"
    assert known >= CLIENT_REQUESTS | SERVER_REQUESTS | SERVER_NOTIFICATIONS


def test_typed_rpcs_map_to_session_members() -> None:
    for rpc in api.TYPED_RPCS:
        assert rpc.method in api.CLIENT_REQUESTS, rpc
        if not rpc.server_streaming:
            assert api.request_member_for(rpc.request) is not None, rpc
