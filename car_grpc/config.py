"""Configuration of car-grpc: one frozen dataclass per component, built once.

`CoreConfig`, `GatewayConfig` and `DashboardConfig` hold what each component needs and
nothing else; `Config` groups them for `car-grpc serve`. Each field is declared once, with
its default; `Config.from_env()` reads the environment variables of docs/protocol.md
(CAR_HOME, CAR_STORE, CAR_NO_AUTH, CAR_NO_APPROVALS, CAR_TOOL_TIMEOUT, ...) and the CLI
applies its flags with `with_overrides`, which refuses a name no section has. Nothing
mutates a config once built: a component keeps the one it was given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

#: Methods the approval gate parks by default (docs/protocol.md §6).
DEFAULT_GATED_METHODS = frozenset(
    {
        "automation.run_applescript",
        "automation.run_powershell",
        "automation.shortcuts.run",
        "messages.send",
        "mail.send",
        "vision.ocr",
        "calendar.create_event",
        "calendar.update_event",
        "calendar.delete_event",
    }
)

#: The car-server release whose wire protocol this server speaks, reported by
#: server.handshake (car-runtime warns about version skew on any other value).
SERVER_VERSION = "0.58.0"
PROTOCOL_VERSIONS = frozenset({2, 3})
#: Capabilities the server negotiates in server.handshake.
CAPABILITIES = frozenset(
    {
        "approvals",
        "chats",
        "goals",
        "host_events",
        "proposals",
        "runs",
        "state",
        "tools",
        "voice_events",
    }
)


#: The gateway processes of `car-grpc serve` when neither --gateway-processes nor
#: CAR_GATEWAY_PROCESSES says (GatewayConfig's default, for an embedding program, is 0).
SERVE_GATEWAY_PROCESSES: GatewayProcesses = "auto"
#: Most gateway processes `car-grpc serve` starts.
MAX_GATEWAY_PROCESSES = 64
#: How many gateway processes `car-grpc serve` runs beside the core's: a number, or "auto"
#: (`serve_gateway_processes` decides).
GatewayProcesses = int | Literal["auto"]


def gateway_processes(raw: str) -> GatewayProcesses:
    """The setting `raw` spells: "auto", or a number of gateway processes from 0 to
    MAX_GATEWAY_PROCESSES (ValueError else)."""
    if raw == "auto":
        return "auto"
    try:
        count = int(raw)
    except ValueError:
        count = -1
    if not 0 <= count <= MAX_GATEWAY_PROCESSES:
        raise ValueError(f"must be a number from 0 to {MAX_GATEWAY_PROCESSES} or auto, got {raw!r}")
    return count


#: Where cgroup v2 keeps this process's CPU quota ("QUOTA PERIOD", or "max PERIOD": none).
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity where the system keeps one (Linux),
    else every CPU of the machine; no more than whole CPUs of its cgroup's quota (a
    container started with `--cpus=1` has one, whatever the machine's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or no quota ("max")
        pass
    return cpus


def serve_gateway_processes(setting: GatewayProcesses, cpus: int | None = None) -> tuple[int, str]:
    """The gateway processes `car-grpc serve` runs for `setting`, and how that was decided
    (its log says both). "auto" is 1 where the server may run on 2 CPUs or more (`cpus`,
    else `usable_cpus()`): the gateway then has a CPU of its own, which serves many
    clients at once faster (bench/README.md, Throughput) for a little more latency of one
    client; on one CPU it is 0, the gateway in the core's process. Gateway processes
    listen on every address of the WebSocket host, as the core's own gateway would
    (gateway/server.py `listen`), so the host does not matter."""
    if isinstance(setting, int):
        return setting, "as set"
    if setting != "auto":
        raise ValueError(f"gateway_processes: a number or 'auto', got {setting!r}")
    if cpus is None:
        cpus = usable_cpus()
    return (1 if cpus >= 2 else 0), f"auto, {cpus} CPU{'' if cpus == 1 else 's'}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_seconds(name: str) -> float | None:
    """A positive number of seconds from the environment; None when unset."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError as e:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from e
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _positive_int(name: str, raw: str) -> int:
    """A whole number of at least 1, or ValueError naming `name`."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1: {raw}")
    return value


def _env_methods(name: str) -> frozenset[str]:
    """A comma-separated list of JSON-RPC method names."""
    return frozenset(m.strip() for m in os.environ.get(name, "").split(",") if m.strip())


def default_state_root() -> Path:
    """`$CAR_HOME`, else `~/.car`: where the store and other state live."""
    home = os.environ.get("CAR_HOME")
    return Path(home) if home else Path.home() / ".car"


def default_token_dir() -> Path:
    """The directory of the auth-token and host-token files (docs/protocol.md §2).

    `$CAR_HOME/ai.parslee.car`, else `$XDG_RUNTIME_DIR/ai.parslee.car`, else
    `~/.config/ai.parslee.car`: the path car-runtime reads.
    """
    if home := os.environ.get("CAR_HOME"):
        return Path(home) / "ai.parslee.car"
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "ai.parslee.car"
    return Path.home() / ".config" / "ai.parslee.car"


def default_unix_socket() -> Path | None:
    """`$CAR_HOME/run/car-server.sock`, else `$XDG_RUNTIME_DIR/ai.parslee.car/car-server.sock`."""
    if home := os.environ.get("CAR_HOME"):
        return Path(home) / "run" / "car-server.sock"
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "ai.parslee.car" / "car-server.sock"
    return None


@dataclass(frozen=True)
class CoreConfig:
    """What the core needs (`car-grpc core`, `Core`). Defaults are the embedded,
    loopback-only ones."""

    #: Where the embedded store lives (`$CAR_HOME`, default `~/.car`).
    state_root: Path = field(default_factory=default_state_root)
    #: The store (--store, CAR_STORE): None for the embedded SQLite file under state_root,
    #: `sqlite:PATH` for another SQLite file, or a PostgreSQL connection URL,
    #: `postgresql://USER:PASSWORD@HOST:PORT/DATABASE`. It may hold a password: left out of
    #: the config's repr, and shown everywhere else through car_grpc.store.redact.
    store: str | None = field(default=None, repr=False)
    #: Connections the PostgreSQL store holds at most (its pool's bound).
    store_pool_size: int = 10
    #: Seconds one call to the PostgreSQL store may take, waiting for a connection
    #: included; then it fails and the request is answered -32603 (UNAVAILABLE).
    store_timeout: float = 10.0
    #: Where the daemon and host token files are written.
    token_dir: Path = field(default_factory=default_token_dir)
    #: In a cluster (a PostgreSQL store shared by several cores): this core's id
    #: (--core-id, CAR_CORE_ID); None: the machine's name and a digest of state_root.
    core_id: str | None = None
    #: host:port the other cores dial for this one (--advertise); None: its gRPC listener.
    advertise: str | None = None
    #: The secret the cores of a cluster prove to each other (--cluster-secret,
    #: CAR_CLUSTER_SECRET); None: the file `cluster-secret` in token_dir, created when
    #: missing (cores sharing a token directory share it; copy it to other machines).
    cluster_secret: str | None = field(default=None, repr=False)
    #: Seconds a core's lease lasts; it renews it every third of that. A core that stops
    #: renewing is released by a surviving core (its runs end `incomplete`) within about
    #: lease + lease / 3.
    cluster_lease: float = 10.0
    #: Require session.auth (off with --no-auth / CAR_NO_AUTH=1).
    auth: bool = True
    #: Park gated methods for a person's approval (off with --no-approvals / CAR_NO_APPROVALS=1).
    approvals: bool = True
    #: Methods the approval gate wraps.
    gated_methods: frozenset[str] = DEFAULT_GATED_METHODS
    #: How long a gated call waits for host.resolve_approval, in seconds.
    approval_timeout: float = 60.0
    #: Host events kept for snapshots and for WatchHostEvents to resume from.
    host_event_history: int = 1024
    #: Host events queued per subscriber; a subscriber that falls further behind misses
    #: events (a visible gap in `sequence`) instead of slowing anyone else.
    host_event_queue: int = 256
    #: Backstop wait for a tool callback without its own timeout_ms (CAR_TOOL_TIMEOUT).
    tool_timeout: float = 300.0
    #: Extra wait beyond an action's timeout_ms before the server gives up on the callback.
    callback_grace: float = 5.0
    #: Deadline of one request handler (CAR_HANDLER_TIMEOUT).
    handler_timeout: float = 1800.0
    #: Grace before a run whose connection closed becomes `incomplete`.
    run_complete_grace: float = 0.25
    #: Trace events queued per (session, run) subscription; beyond it the oldest are
    #: dropped and the subscriber sees a cursor gap.
    run_subscriber_queue: int = 256
    #: Live runs.subscribe subscriptions one session may hold at a time; one more fails
    #: with -32602 naming this limit (re-subscribing to the same run replaces its own).
    run_subscriptions_per_session: int = 256
    #: How long agents.chat waits for the agent's ack (and agents.chat.approve for the
    #: agent's answer).
    chat_ack_timeout: float = 5.0
    #: Chat events buffered between an agent and its host; beyond it the agent is slowed
    #: down (its events wait in order) rather than any being dropped.
    chat_buffer: int = 256
    #: The same in bytes (serialized ChatEventNotice); one larger event passes alone.
    chat_buffer_bytes: int = 8 * 1024 * 1024
    #: How long an agent's chat events may wait for a host that stopped reading before
    #: the chat ends with an `error` event (and is cancelled at the agent).
    chat_stall_timeout: float = 30.0
    #: PCM chunks queued per voice session towards its speech engine; pushes beyond it
    #: wait, in order.
    voice_audio_queue: int = 64
    #: The same in bytes (serialized message to the engine).
    voice_audio_queue_bytes: int = 4 * 1024 * 1024
    #: Voice events and speech frames queued per voice session towards its owner; an owner
    #: that lets more pile up (it stopped reading) loses the session, with an error event.
    voice_event_queue: int = 256
    #: The same in bytes (serialized frames); past it the owner loses the session too.
    voice_event_queue_bytes: int = 8 * 1024 * 1024
    #: How long a speech engine may take nothing (queued audio waits, a write to its stream
    #: blocks) before it counts as stalled: the waiting push fails, the engine is dropped.
    voice_stall_timeout: float = 10.0
    #: How long a speech engine may take to register, to answer a new voice session, and
    #: to end one after a stop.
    voice_ack_timeout: float = 5.0
    #: Largest audio chunk in bytes (PCM from a client, speech from an engine).
    voice_max_chunk_bytes: int = 1024 * 1024
    #: Voice sessions one connection may have open at a time.
    voice_sessions_per_client: int = 16
    #: Tool hosts (ToolService.ServeTools streams) on the core at a time; one more is
    #: refused with RESOURCE_EXHAUSTED.
    tool_hosts_max: int = 256
    #: Tools one tool host may register.
    tool_host_max_tools: int = 256
    #: Calls sent to one tool host and not answered yet; one more fails at once (its
    #: action fails).
    tool_host_max_pending: int = 1024
    #: The same in bytes (serialized ToolCall); one larger call passes when none is pending.
    tool_host_max_pending_bytes: int = 16 * 1024 * 1024
    #: How long a tool host may take no message from its stream while one waits before it
    #: counts as stalled and is disconnected (its calls fail at once).
    tool_host_stall_timeout: float = 10.0
    #: How long a tool host may take to send its registration after opening the stream.
    tool_host_register_timeout: float = 5.0
    #: Final segments one meeting transcript keeps; later ones are left out and the
    #: meeting is marked truncated.
    meeting_max_segments: int = 20_000
    #: A2UI surfaces (docs/protocol.md §7a): components one surface may have, bytes its
    #: JSON may take, surfaces one owner (an A2A endpoint, an agent, the local sessions)
    #: and the core may keep, seconds a surface lives after its last change, seconds
    #: between two automatic reaps of the expired ones.
    a2ui_max_components: int = 1000
    a2ui_max_surface_bytes: int = 512 * 1024
    a2ui_max_surfaces_per_owner: int = 64
    a2ui_max_surfaces: int = 1024
    a2ui_surface_ttl: float = 24 * 3600.0
    a2ui_reap_interval: float = 60.0
    #: Outbound A2A calls (a2a.send, actions on surfaces an A2A task owns): seconds one may
    #: take, bytes its answer may have; remote peers the registry keeps.
    a2a_send_timeout: float = 10.0
    a2a_send_max_bytes: int = 1024 * 1024
    a2a_max_peers: int = 256
    #: gRPC core listener.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 9102
    #: TLS of the gRPC port: certificate chain and private key, PEM (both or neither).
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    #: How long a session stream of its own (Connect, ConnectBatched) may stay
    #: unauthenticated; then it ends UNAUTHENTICATED ("auth timeout"). A request being
    #: answered then (session.auth) is not cut short. Not with auth off; a multiplexed
    #: session's gateway keeps its own (GatewayConfig.ws_auth_timeout).
    auth_timeout: float = 10.0
    #: Most requests one session may have in flight; reading pauses beyond it.
    max_inflight_per_session: int = 256
    #: Sessions the core holds at once over all its session streams (Connect,
    #: ConnectBatched, and each session of a ConnectMultiplexed stream; not the one-call
    #: sessions of typed RPCs), counted with its long-lived typed streams (Chat, WatchRun,
    #: WatchHostEvents, ServeTools, ServeVoice[Batched], A2A's gRPC streams, and each
    #: request the A2A HTTP listener serves, its SSE stream with it): one more is refused
    #: with RESOURCE_EXHAUSTED naming this limit (an A2A HTTP request: 503 and Retry-After)
    #: (--max-sessions, CAR_MAX_SESSIONS).
    #: At ~43 KiB an idle session (more when busy: bench/README.md) the default is some
    #: 2.7 GiB idle, the most a core on a machine of a few GiB should be asked to hold; it
    #: equals four gateway processes at their ws_max_connections each.
    max_sessions: int = 65_536
    #: grpc.health.v1.Health/Watch streams, and server reflection streams (v1 and v1alpha
    #: together), the core holds at once: open to anyone without credentials (load
    #: balancers, grpcurl), so capped for the whole core; one more is refused with
    #: RESOURCE_EXHAUSTED naming the limit (--max-health-watches, CAR_MAX_HEALTH_WATCHES;
    #: --max-reflection-streams, CAR_MAX_REFLECTION_STREAMS). Health.Check is not counted.
    max_health_watches: int = 64
    max_reflection_streams: int = 64
    #: Bytes one ConnectMultiplexed stream (a gateway's) may leave unacknowledged across
    #: all its sessions, beside each session's own credits (wire/multiplex.py); a batch
    #: past it ends the stream (INVALID_ARGUMENT). --multiplex-stream-bytes,
    #: CAR_MULTIPLEX_STREAM_BYTES.
    multiplex_stream_bytes: int = 64 * 1024 * 1024
    #: How long a ConnectMultiplexed stream may wait for its gateway to read the records
    #: held for it (past multiplex_stream_bytes, reading pauses) before the stream ends
    #: (RESOURCE_EXHAUSTED): a gateway's reader never stops reading, so one that does is
    #: stuck.
    multiplex_stall_timeout: float = 30.0
    #: Frames queued towards one session before senders wait (or fan-out drops).
    session_outbound_queue: int = 1024
    #: The same in bytes (serialized frames); one larger frame passes when none is queued.
    session_outbound_queue_bytes: int = 8 * 1024 * 1024
    #: Server-initiated calls (tools.execute, agent.chat, ...) one session may have
    #: waiting for the client's answer; one more fails with -32602 naming this limit.
    max_pending_calls_per_session: int = 1024
    #: Largest state value (state.set, a proposal's state_write), in bytes: the
    #: serialized size of its google.protobuf.Value.
    state_value_max_bytes: int = 1024 * 1024
    #: A session's state in bytes (each key's UTF-8 bytes plus its value's size).
    state_max_bytes: int = 16 * 1024 * 1024
    #: Keys in a session's state.
    state_max_keys: int = 10_000
    #: Serve the attached agents to A2A peers: the A2A HTTP listener and
    #: lf.a2a.v1.A2AService on the gRPC port (off with --no-a2a).
    a2a: bool = True
    #: The A2A HTTP listener (agent cards, JSON-RPC + SSE).
    a2a_host: str = "127.0.0.1"
    #: Its port: None means the WebSocket port + 3 under `serve`, the gRPC port + 1 for
    #: `core` (both 9103 by default; ephemeral when that port is); 0 picks a free one.
    a2a_port: int | None = None
    #: TLS of the A2A HTTP listener: certificate chain and private key, PEM (both or neither).
    a2a_tls_cert: Path | None = None
    a2a_tls_key: Path | None = None
    #: Largest A2A request body, in bytes; a larger one is refused (413).
    a2a_max_body_bytes: int = 4 * 1024 * 1024
    #: How long a request on the A2A HTTP listener may take, from its head, to send its
    #: whole body; then it is answered 408 and its connection closed (a body trickled a
    #: byte at a time would hold the connection for good).
    a2a_body_timeout: float = 30.0
    #: TCP connections one peer, an IPv4 address or an IPv6 /64 (every loopback client is
    #: one peer), may hold on the A2A HTTP listener at once, of the listener's 256; one
    #: more is answered 503 with Retry-After and closed, before any token is read
    #: (--a2a-max-connections-per-peer, CAR_A2A_MAX_CONNECTIONS_PER_PEER).
    a2a_max_connections_per_peer: int = 64
    #: How long one A2A task (its chat) may run before it fails.
    a2a_task_timeout: float = 1800.0
    #: Largest reply one A2A task streams, in bytes (its tokens); past it the task fails.
    a2a_reply_max_bytes: int = 4 * 1024 * 1024
    #: A2A tasks one caller may have running at once; one more is refused.
    a2a_tasks_per_caller: int = 16
    #: Finished A2A tasks kept per caller (the oldest beyond it are deleted).
    a2a_stored_tasks_per_caller: int = 1000

    @property
    def a2a_listen_port(self) -> int:
        """The A2A port to bind: `a2a_port`, else the gRPC port + 1 (0: ephemeral)."""
        if self.a2a_port is not None:
            return self.a2a_port
        return self.grpc_port + 1 if 0 < self.grpc_port < 65535 else 0


@dataclass(frozen=True)
class GatewayConfig:
    """What a WebSocket gateway needs (`car-grpc gateway`, `Gateway`)."""

    #: WebSocket gateway listener.
    ws_host: str = "127.0.0.1"
    ws_port: int = 9100
    #: TLS of the WebSocket port (wss://): certificate chain and private key, PEM.
    ws_tls_cert: Path | None = None
    ws_tls_key: Path | None = None
    #: Unix socket of the gateway (None: none).
    unix_socket: Path | None = field(default_factory=default_unix_socket)
    #: CA certificates (PEM) a gateway or the dashboard trusts for the core: set, they dial
    #: it with TLS. Unset in one process with a TLS core: its own certificate is trusted.
    core_ca: Path | None = None
    #: Seconds between the gateway's WebSocket pings.
    ws_ping_interval: float = 30.0
    #: Close a WebSocket peer that sent nothing (no frame, no pong) for this many seconds.
    ws_idle_timeout: float = 90.0
    #: Largest WebSocket message accepted; a bigger one closes the connection (1009).
    ws_max_message_bytes: int = 64 * 1024 * 1024
    #: Largest message accepted until the core has answered a request (i.e. the session is
    #: authenticated): an unauthenticated client cannot make the gateway parse megabytes.
    ws_max_message_bytes_before_auth: int = 1024 * 1024
    #: Frames queued towards one WebSocket client. While the queue is full the gateway
    #: stops reading that client's core stream: the backpressure reaches the core, whose
    #: fan-out drops (a visible gap) while responses wait.
    ws_outbound_queue: int = 1024
    #: The same queue's bound in bytes (a frame larger than it still goes, alone).
    ws_outbound_queue_bytes: int = 8 * 1024 * 1024
    #: How long a full queue may wait for the client to take a frame before the gateway
    #: gives up on the client (1008) instead of holding its core session any longer.
    ws_stall_timeout: float = 30.0
    #: WebSocket connections one gateway (each gateway process counts its own) holds at
    #: once, over its TCP and Unix listeners; one more is refused at the handshake with
    #: HTTP 503 and Retry-After, before any core stream is opened (--ws-max-connections,
    #: CAR_WS_MAX_CONNECTIONS). ~43 KiB an idle session: some 700 MiB at the default.
    #: This and the next bound, apart, the TCP connections whose request has not come
    #: yet (handshakes under way); past them a new one is closed at once, unanswered.
    ws_max_connections: int = 16_384
    #: The same for one peer, an IPv4 address or an IPv6 /64 (every loopback client is
    #: one peer, every client of the Unix socket another); never more than
    #: ws_max_connections (--ws-max-connections-per-peer, CAR_WS_MAX_CONNECTIONS_PER_PEER).
    ws_max_connections_per_peer: int = 4_096
    #: How long a connection may take to complete session.auth once the core has taken its
    #: stream in; then it is closed (1008). No deadline when the core runs with auth off.
    ws_auth_timeout: float = 10.0
    #: Connect streams one gateway may have opened that the core has not taken in yet;
    #: further connections wait their turn (a burst queues here, not in gRPC's queue of
    #: calls the core has not picked up, which refuses calls past its limit).
    ws_pending_streams: int = 256
    #: When a client leaves, how long the core may take to read what the client sent last
    #: and end the session (the gateway half-closes the stream) before it is cancelled.
    ws_half_close_timeout: float = 5.0
    #: Worker processes of a gateway that decode large frames off its event loop (JSON
    #: parsing and conversion to protobuf hold the GIL); started when first needed.
    ws_decode_workers: int = 2
    #: High-water mark in bytes of one WebSocket's write buffer (websockets' write_limit).
    ws_write_limit: int = 64 * 1024
    #: How long closing a WebSocket may take before the TCP connection is dropped.
    ws_close_timeout: float = 10.0
    #: Gateway processes a `Server` runs beside the core's (--gateway-processes,
    #: CAR_GATEWAY_PROCESSES), sharing the WebSocket port; 0: the gateway runs in the
    #: core's process (`server.gateway`), what an embedding program gets unless it asks;
    #: "auto": 1 where the server may run on 2 CPUs or more, else 0
    #: (`serve_gateway_processes`), what `car-grpc serve` runs unless told
    #: (SERVE_GATEWAY_PROCESSES).
    #: See README (Processes and throughput).
    gateway_processes: GatewayProcesses = 0
    #: ConnectMultiplexed streams a gateway that holds the daemon token (the one `car-grpc
    #: serve` runs) carries all its connections over, instead of a ConnectBatched stream
    #: each; 0: a stream each (as a gateway without the token always does).
    ws_multiplex_streams: int = 1
    #: How long a gateway that multiplexes waits at start for the core to take its first
    #: stream in (which checks the gateway's token) before it gives up (and does not start).
    core_check_timeout: float = 10.0


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard needs (`Dashboard`, served by `car-grpc serve`)."""

    #: Serve the dashboard beside the WebSocket listener (off with --no-dashboard).
    dashboard: bool = True
    #: Dashboard HTTP listener (loopback by default).
    dashboard_host: str = "127.0.0.1"
    #: Its port: None means the WebSocket port + 1 (ephemeral when that one is); 0 picks a
    #: free one.
    dashboard_port: int | None = None
    #: Connections the dashboard serves at once. A new one beyond it closes the connection
    #: that has waited longest for a request; if every one is busy (a request being
    #: served, a live stream) the new one is answered 503.
    dashboard_max_connections: int = 64
    #: Connections one peer (an IPv4 address, an IPv6 /64) may hold at once; beyond it the
    #: peer's own connection that has waited longest for a request is closed (503 if none
    #: is waiting). On loopback every client is the same peer.
    dashboard_max_connections_per_peer: int = 32
    #: Seconds a dashboard connection has to send a whole request head (from its opening,
    #: or from the first byte of a later request on a kept-alive connection), and again
    #: for the body after it; later it is answered 408 and closed.
    dashboard_header_timeout: float = 5.0
    #: CA certificates (PEM) the dashboard trusts for the core: set, it dials it with TLS.
    core_ca: Path | None = None


_SECTIONS = ("core", "gateway", "dashboard")


@dataclass(frozen=True)
class Config:
    """Everything `car-grpc serve` starts, one frozen section per component. Build it once
    (`from_env`, then `with_overrides` for flags) and hand each component its section."""

    core: CoreConfig = field(default_factory=CoreConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    @classmethod
    def from_env(cls, *, gateway_processes_default: GatewayProcesses | None = None) -> Config:
        """The defaults, with what the environment sets (docs/protocol.md: CAR_NO_AUTH,
        CAR_NO_APPROVALS, CAR_TOOL_TIMEOUT, CAR_HANDLER_TIMEOUT, CAR_APPROVAL_TIMEOUT,
        CAR_GATED_METHODS, CAR_STORE, CAR_MULTIPLEX_STREAM_BYTES, CAR_GATEWAY_PROCESSES,
        CAR_MAX_SESSIONS, CAR_WS_MAX_CONNECTIONS, CAR_WS_MAX_CONNECTIONS_PER_PEER;
        CAR_HOME through the path defaults). `gateway_processes_default` stands in for
        GatewayConfig's when CAR_GATEWAY_PROCESSES is unset (`car-grpc serve` passes
        SERVE_GATEWAY_PROCESSES)."""
        defaults = CoreConfig()
        overrides: dict[str, object] = {
            "gated_methods": defaults.gated_methods | _env_methods("CAR_GATED_METHODS")
        }
        if gateway_processes_default is not None:
            overrides["gateway_processes"] = gateway_processes_default
        if _env_flag("CAR_NO_AUTH"):
            overrides["auth"] = False
        if _env_flag("CAR_NO_APPROVALS"):
            overrides["approvals"] = False
        if store := os.environ.get("CAR_STORE", "").strip():
            overrides["store"] = store
        if processes := os.environ.get("CAR_GATEWAY_PROCESSES", "").strip():
            try:
                overrides["gateway_processes"] = gateway_processes(processes)
            except ValueError as e:
                raise ValueError(f"CAR_GATEWAY_PROCESSES {e}") from None
        if core_id := os.environ.get("CAR_CORE_ID", "").strip():
            overrides["core_id"] = core_id
        if secret := os.environ.get("CAR_CLUSTER_SECRET", "").strip():
            overrides["cluster_secret"] = secret
        if stream_bytes := os.environ.get("CAR_MULTIPLEX_STREAM_BYTES", "").strip():
            overrides["multiplex_stream_bytes"] = _positive_int(
                "CAR_MULTIPLEX_STREAM_BYTES", stream_bytes
            )
        for name, variable in (
            ("max_sessions", "CAR_MAX_SESSIONS"),
            ("max_health_watches", "CAR_MAX_HEALTH_WATCHES"),
            ("max_reflection_streams", "CAR_MAX_REFLECTION_STREAMS"),
            ("ws_max_connections", "CAR_WS_MAX_CONNECTIONS"),
            ("ws_max_connections_per_peer", "CAR_WS_MAX_CONNECTIONS_PER_PEER"),
            ("a2a_max_connections_per_peer", "CAR_A2A_MAX_CONNECTIONS_PER_PEER"),
        ):
            if raw := os.environ.get(variable, "").strip():
                overrides[name] = _positive_int(variable, raw)
        for name, variable in (
            ("tool_timeout", "CAR_TOOL_TIMEOUT"),
            ("handler_timeout", "CAR_HANDLER_TIMEOUT"),
            ("approval_timeout", "CAR_APPROVAL_TIMEOUT"),
            ("cluster_lease", "CAR_CLUSTER_LEASE"),
        ):
            if (seconds := _env_seconds(variable)) is not None:
                overrides[name] = seconds
        return cls().with_overrides(**overrides)

    def with_overrides(self, **fields: object) -> Config:
        """A copy with these fields changed, each in the section that has it (`core_ca`
        in both the gateway's and the dashboard's). An unknown name is a TypeError: a
        typo never passes silently."""
        changes: dict[str, dict[str, object]] = {name: {} for name in _SECTIONS}
        for key, value in fields.items():
            homes = [n for n in _SECTIONS if key in _field_names(getattr(self, n))]
            if not homes:
                raise TypeError(f"Config has no field {key!r}")
            for home in homes:
                changes[home][key] = value
        return replace(
            self, **{n: replace(getattr(self, n), **changes[n]) for n in _SECTIONS if changes[n]}
        )

    def for_serve(self) -> Config:
        """The sections as `car-grpc serve` runs them side by side: the gateway and the
        dashboard trust the core's own certificate unless a CA is named, and the
        dashboard's port and the A2A port are resolved (the WebSocket port + 1 and + 3
        unless given)."""
        trust = self.gateway.core_ca or self.core.grpc_tls_cert
        port = self.dashboard.dashboard_port
        ws_port = self.gateway.ws_port
        if port is None:
            port = ws_port + 1 if 0 < ws_port < 65535 else 0
        a2a_port = self.core.a2a_port
        if a2a_port is None:
            a2a_port = ws_port + 3 if 0 < ws_port < 65533 else 0
        return replace(
            self,
            core=replace(self.core, a2a_port=a2a_port),
            gateway=replace(self.gateway, core_ca=trust),
            dashboard=replace(
                self.dashboard, core_ca=self.dashboard.core_ca or trust, dashboard_port=port
            ),
        )


def _field_names(section: object) -> frozenset[str]:
    return frozenset(f.name for f in fields(section))  # type: ignore[arg-type]
