"""The JSON-RPC method table built from the descriptors covers the CAR session protocol,
and docs/protocol.md documents exactly the methods it serves."""

from __future__ import annotations

import re
from pathlib import Path

from car_grpc.config import DEFAULT_GATED_METHODS
from car_grpc.v1 import session_pb2
from car_grpc.wire import api

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"

# Every method of the protocol (docs/protocol.md §2-§7), by direction. Server-initiated
# requests and notifications are the ones the server sends.
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
    "a2ui.capabilities", "a2ui.apply", "a2ui.ingest", "a2ui.surfaces", "a2ui.get", "a2ui.reap",
    "a2ui.action", "a2ui/subscribe", "a2ui/unsubscribe", "a2ui/replay",
    "a2a.send", "a2a.peers.add", "a2a.peers.list", "a2a.peers.remove",
}  # fmt: skip
SERVER_REQUESTS = {"tools.execute", "agent.chat", "agent.chat.approve"}
SERVER_NOTIFICATIONS = {
    "tools.cancel", "agents.chat.event", "agent.chat.cancel", "runs.trace.event",
    "host.event", "voice.event", "a2ui.event",
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


# ------------------------------------------------------------------ docs/protocol.md
#
# The doc's convention (also in a comment at its top): outside fenced code blocks, a code
# span whose first word is a dotted lowercase name (`runs.start`, `runs.start {intent}`)
# names a method this server serves. Values that merely look like one are written as
# JSON strings (`"agent.registered"`, `"ws.method:<method>"`), file names as links.
# The one exception: the approval gate's default list, car-server methods this server
# does not serve (config.DEFAULT_GATED_METHODS), which the doc names as methods.

#: `a2ui/subscribe`: A2UI's own method names use "/".
_DOTTED = re.compile(r"[a-z_][a-z0-9_]*(?:[./][a-z_][a-z0-9_]*)+")
_FILE_SUFFIXES = (".md", ".proto", ".py", ".js", ".json", ".sock")


def _served() -> set[str]:
    return (
        set(api.CLIENT_REQUESTS) | set(api.SERVER_REQUESTS) | set(api.SERVER_NOTIFICATIONS)
        | set(api.CLIENT_NOTIFICATIONS)
    )  # fmt: skip


def _prose_blocks(text: str) -> list[str]:
    """The doc's paragraphs, table rows and list items, without comments or fenced code."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        elif not fenced:
            lines.append(line)
    assert not fenced, "docs/protocol.md: a fenced code block is not closed"
    return [block for block in re.split(r"\n\s*\n", "\n".join(lines)) if block.strip()]


def _method_names(text: str) -> set[str]:
    """Every name the doc writes as a method (see the convention above)."""
    names: set[str] = set()
    for block in _prose_blocks(text):
        # An unpaired backtick would shift every later span: catch it where it is.
        assert block.count("`") % 2 == 0, f"unpaired backtick in: {block.strip()[:120]!r}"
        for span in re.findall(r"`([^`]+)`", block):
            word = re.split(r"[\s{(]", span.strip(), maxsplit=1)[0]
            if _DOTTED.fullmatch(word) and not word.endswith(_FILE_SUFFIXES):
                names.add(word)
    return names


def test_method_names_are_read_from_code_spans_only() -> None:
    text = """Call `runs.start {intent}` or `host.agents`, not runs.list.

```
{"method": "runs.get_trace"}
```

Kinds: `"agent.registered"`, `"ws.method:<method>"`, [voice.proto](x); `state.get`,
`goal.set`."""
    assert _method_names(text) == {"runs.start", "host.agents", "state.get", "goal.set"}


def test_protocol_doc_names_only_methods_the_server_serves() -> None:
    named = _method_names(PROTOCOL_DOC.read_text())
    unknown = named - _served() - DEFAULT_GATED_METHODS
    assert not unknown, (
        f"docs/protocol.md names methods this server does not serve: {sorted(unknown)} "
        '(write a value that is not a method as a JSON string: `"agent.registered"`)'
    )
    # The gate's default list is spelled out in §6: it must be the one the server uses.
    assert named >= DEFAULT_GATED_METHODS, sorted(DEFAULT_GATED_METHODS - named)


def test_protocol_doc_documents_every_method_the_server_serves() -> None:
    text = PROTOCOL_DOC.read_text()
    named = _method_names(text)
    # A2A's method names (`SendMessage`, `agent/getAuthenticatedExtendedCard`) are not
    # lower-case dotted: such a name counts as documented in a code span of its own.
    undocumented = {m for m in _served() - named if f"`{m}`" not in text}
    assert not undocumented, f"methods missing from docs/protocol.md: {sorted(undocumented)}"
    assert _served() >= CLIENT_REQUESTS | SERVER_REQUESTS | SERVER_NOTIFICATIONS


def test_protocol_doc_sections_cited_by_the_code_exist() -> None:
    """Comments cite `docs/protocol.md §N`: every such section is a heading `## N.`."""
    headings = set(re.findall(r"^## (\d+[a-z]?)\. ", PROTOCOL_DOC.read_text(), re.MULTILINE))
    assert {str(n) for n in range(1, 10)} <= headings
    sources = [ROOT / "README.md", *(ROOT / "car_grpc").rglob("*.py")]
    cited: dict[str, set[str]] = {}
    for path in sources:
        for section in re.findall(r"protocol\.md §(\d+[a-z]?)", path.read_text()):
            cited.setdefault(section, set()).add(str(path.relative_to(ROOT)))
    missing = {
        section: sorted(files) for section, files in cited.items() if section not in headings
    }
    assert not missing, f"sections cited but not in docs/protocol.md: {missing}"


def test_protocol_doc_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", PROTOCOL_DOC.read_text()):
        assert (PROTOCOL_DOC.parent / target).exists(), f"docs/protocol.md links to {target}"


def test_typed_rpcs_map_to_session_members() -> None:
    for rpc in api.TYPED_RPCS:
        assert rpc.method in api.CLIENT_REQUESTS, rpc
        if not rpc.server_streaming:
            assert api.request_member_for(rpc.request) is not None, rpc
