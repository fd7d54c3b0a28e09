"""`car-grpc`: the command line, a thin layer over Config and the embedding API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from car_grpc.a2a.callers import A2aCallers
from car_grpc.config import (
    SERVE_GATEWAY_PROCESSES,
    Config,
    CoreConfig,
    GatewayProcesses,
    gateway_processes,
)
from car_grpc.core.tokens import AgentTokens
from car_grpc.heap import freeze_startup_heap, keep_large_buffers
from car_grpc.store import (
    Store,
    StoreLocation,
    StoreUnavailable,
    StoreUrlError,
    open_store,
    store_location,
)

log = logging.getLogger("car_grpc")


def configure_logging() -> None:
    """The log, the same in every process of the server (gateway processes too)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)  # we log our own listeners


STORE_HELP = (
    "the store: sqlite:PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE (default: the "
    "SQLite file under $CAR_HOME; or CAR_STORE). A password may also come from libpq's "
    "PGPASSWORD or ~/.pgpass instead of the URL"
)


def _add_store_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="URL", help=STORE_HELP)


def _add_core_flags(p: argparse.ArgumentParser) -> None:
    _add_store_flag(p)
    p.add_argument("--grpc-host", help="gRPC listen address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 9102; 0 picks a free one)")
    p.add_argument("--no-auth", action="store_true", help="disable auth (or CAR_NO_AUTH=1)")
    p.add_argument(
        "--no-approvals",
        action="store_true",
        help="disable the approval gate (or CAR_NO_APPROVALS=1)",
    )
    p.add_argument(
        "--gate-method",
        action="append",
        default=[],
        metavar="METHOD",
        help="also park METHOD for approval (repeatable; or CAR_GATED_METHODS=a,b)",
    )
    p.add_argument(
        "--approval-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long a gated call waits for approval (default 60; or CAR_APPROVAL_TIMEOUT)",
    )
    p.add_argument(
        "--grpc-tls-cert",
        type=Path,
        metavar="PEM",
        help="serve the gRPC port over TLS with this certificate chain (with --grpc-tls-key)",
    )
    p.add_argument(
        "--grpc-tls-key", type=Path, metavar="PEM", help="the private key of --grpc-tls-cert"
    )
    p.add_argument(
        "--a2a-port",
        type=int,
        metavar="PORT",
        help="A2A HTTP port: agent cards and JSON-RPC + SSE at /a2a/<agent_id> (default: the "
        "WebSocket port + 3 under serve, the gRPC port + 1 for core; 0 picks a free one)",
    )
    p.add_argument("--a2a-host", help="A2A HTTP listen address (default 127.0.0.1)")
    p.add_argument(
        "--no-a2a",
        action="store_true",
        help="do not serve the attached agents over A2A (no A2A port, no lf.a2a.v1.A2AService)",
    )
    p.add_argument(
        "--a2a-tls-cert",
        type=Path,
        metavar="PEM",
        help="serve the A2A port over https with this certificate chain (with --a2a-tls-key)",
    )
    p.add_argument(
        "--a2a-tls-key", type=Path, metavar="PEM", help="the private key of --a2a-tls-cert"
    )
    p.add_argument(
        "--a2a-max-connections-per-peer",
        type=_count,
        metavar="N",
        help="connections one peer (an IPv4 address, an IPv6 /64) may hold on the A2A port "
        "at once; one more is answered 503 with Retry-After (default 64; or "
        "CAR_A2A_MAX_CONNECTIONS_PER_PEER)",
    )
    p.add_argument(
        "--core-id",
        help="this core's id in a cluster (a PostgreSQL --store; or CAR_CORE_ID; "
        "default: the machine's name and a digest of CAR_HOME)",
    )
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the gRPC address the other cores of a cluster dial (default: the gRPC listener)",
    )
    p.add_argument(
        "--cluster-secret",
        help="the secret the cores of a cluster share (or CAR_CLUSTER_SECRET; default: the "
        "file cluster-secret beside the token files, created when missing)",
    )
    p.add_argument(
        "--cluster-lease",
        type=_seconds,
        metavar="SECONDS",
        help="a core's lease in a cluster (default 10; or CAR_CLUSTER_LEASE)",
    )
    p.add_argument(
        "--multiplex-stream-bytes",
        type=_count,
        metavar="BYTES",
        help="bytes a gateway's multiplexed stream may leave unacknowledged across its "
        "sessions (default 67108864, 64 MiB; or CAR_MULTIPLEX_STREAM_BYTES)",
    )
    p.add_argument(
        "--max-sessions",
        type=_count,
        metavar="N",
        help="sessions the core holds at once over all its session streams, with its "
        "long-lived typed streams; one more is refused with RESOURCE_EXHAUSTED "
        "(default 65536; or CAR_MAX_SESSIONS)",
    )
    p.add_argument(
        "--max-health-watches",
        type=_count,
        metavar="N",
        help="grpc.health.v1 Watch streams the core holds at once (open to anyone); one "
        "more is refused with RESOURCE_EXHAUSTED (default 64; or CAR_MAX_HEALTH_WATCHES)",
    )
    p.add_argument(
        "--max-reflection-streams",
        type=_count,
        metavar="N",
        help="server reflection streams the core holds at once (open to anyone); one "
        "more is refused with RESOURCE_EXHAUSTED (default 64; or CAR_MAX_REFLECTION_STREAMS)",
    )


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {raw}")
    return value


def _processes(raw: str) -> GatewayProcesses:
    try:
        return gateway_processes(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {raw}")
    return value


def _given(**flags: object) -> dict[str, object]:
    """The flags the command line set (None: not given, the config's value stands)."""
    return {name: value for name, value in flags.items() if value is not None}


def config_from(args: argparse.Namespace) -> Config:
    """The one config of a command: the environment's, then the flags it was given (a
    command has only its own flags; the others read as not given)."""
    flag = vars(args).get
    # `serve` runs "auto" unless told; an embedded Server, the gateway in its process.
    serves = "gateway_processes" in vars(args)
    config = Config.from_env(gateway_processes_default=SERVE_GATEWAY_PROCESSES if serves else None)
    config = config.with_overrides(
        **_given(
            store=flag("store") or None,
            grpc_host=flag("grpc_host") or None,
            grpc_port=flag("grpc_port"),
            auth=False if flag("no_auth") else None,
            approvals=False if flag("no_approvals") else None,
            approval_timeout=flag("approval_timeout"),
            grpc_tls_cert=flag("grpc_tls_cert"),
            grpc_tls_key=flag("grpc_tls_key"),
            a2a=False if flag("no_a2a") else None,
            a2a_host=flag("a2a_host") or None,
            a2a_port=flag("a2a_port"),
            a2a_tls_cert=flag("a2a_tls_cert"),
            a2a_tls_key=flag("a2a_tls_key"),
            a2a_max_connections_per_peer=flag("a2a_max_connections_per_peer"),
            core_id=flag("core_id") or None,
            advertise=flag("advertise") or None,
            cluster_secret=flag("cluster_secret") or None,
            cluster_lease=flag("cluster_lease"),
            multiplex_stream_bytes=flag("multiplex_stream_bytes"),
            max_sessions=flag("max_sessions"),
            max_health_watches=flag("max_health_watches"),
            max_reflection_streams=flag("max_reflection_streams"),
            ws_max_connections=flag("ws_max_connections"),
            ws_max_connections_per_peer=flag("ws_max_connections_per_peer"),
            ws_host=flag("host"),  # "" is every interface
            ws_port=flag("port"),
            unix_socket=flag("unix_socket"),
            ws_tls_cert=flag("tls_cert"),
            ws_tls_key=flag("tls_key"),
            core_ca=flag("core_ca"),
            dashboard=False if flag("no_dashboard") else None,
            dashboard_port=flag("dashboard_port"),
            gateway_processes=flag("gateway_processes"),
        ),
        gated_methods=config.core.gated_methods | frozenset(flag("gate_method") or ()),
    )
    if flag("no_unix_socket"):
        config = config.with_overrides(unix_socket=None)
    return config


def _add_ws_flags(p: argparse.ArgumentParser, unix_default: str, core_ca_default: str) -> None:
    p.add_argument(
        "--host",
        help="WebSocket listen address: an IP address, a name (each of its addresses) or '' "
        "(every interface) (default 127.0.0.1)",
    )
    p.add_argument("--port", type=int, help="WebSocket port (default 9100; 0 picks a free one)")
    p.add_argument(
        "--unix-socket",
        metavar="PATH",
        type=Path,
        help=f"also serve WebSocket JSON-RPC on this Unix socket (default: {unix_default})",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve the WebSocket port as wss:// with this certificate chain (with --tls-key)",
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--core-ca",
        type=Path,
        metavar="PEM",
        help=f"dial the core over TLS, trusting these CA certificates ({core_ca_default})",
    )
    p.add_argument(
        "--ws-max-connections",
        type=_count,
        metavar="N",
        help="WebSocket connections a gateway (each gateway process) holds at once; one more "
        "is refused with HTTP 503; as many whose request has not come are held apart "
        "(default 16384; or CAR_WS_MAX_CONNECTIONS)",
    )
    p.add_argument(
        "--ws-max-connections-per-peer",
        type=_count,
        metavar="N",
        help="the same for one peer, an IPv4 address or an IPv6 /64; all of loopback is one "
        "(default 4096; or CAR_WS_MAX_CONNECTIONS_PER_PEER)",
    )


class _Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def _run_until_signalled(service: _Service) -> None:
    """Start, log one line per listener, and stop cleanly on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    freeze_startup_heap()
    keep_large_buffers()
    try:
        await stop.wait()
    finally:
        await service.stop()
        log.info("stopped")


def _run(service: _Service) -> int:
    try:
        asyncio.run(_run_until_signalled(service))
    except (OSError, StoreUnavailable, StoreUrlError) as e:  # a port in use, a store down
        print(f"car-grpc: {e}", file=sys.stderr)
        return 1
    return 0


# The servers are imported by the commands that run them: loading the core (its A2UI
# catalogs above all) costs over a second of CPU, which `agents`, `a2a-clients` and
# --help need not pay.


def _cmd_core(args: argparse.Namespace) -> int:
    from car_grpc.core.server import Core

    return _run(Core(config_from(args).core))


def _cmd_serve(args: argparse.Namespace) -> int:
    from car_grpc.serve import Server

    return _run(Server(config_from(args)))


def _cmd_gateway(args: argparse.Namespace) -> int:
    from car_grpc.gateway import Gateway

    config = config_from(args)
    if args.unix_socket is None:  # several gateways may run side by side: none by default
        config = config.with_overrides(unix_socket=None)
    token: TokenFile | None = None
    if args.core_token_file is not None:
        token = TokenFile(args.core_token_file)
        try:
            token.read()
        except OSError as e:
            print(f"car-grpc: gateway: cannot read --core-token-file: {e}", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"car-grpc: gateway: {e}", file=sys.stderr)
            return 1
    return _run(Gateway(config.gateway, args.core, core_token=token))


class TokenFile:
    """The core's daemon token in a file (--core-token-file), read again each time the
    gateway opens a multiplexed stream: a core that restarted wrote its new token there.
    While the file is missing or empty (the core is between runs) the last one stands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = ""

    def read(self) -> str:
        """The token in the file now (OSError: unreadable; ValueError: empty)."""
        token = self.path.read_text().strip()
        if not token:
            raise ValueError(f"{self.path} holds no token")
        self._last = token
        return token

    def __call__(self) -> str:
        try:
            return self.read()
        except (OSError, ValueError):
            return self._last


def _cmd_voice_engine(args: argparse.Namespace) -> int:
    try:  # the voice extra's packages: loaded only by this command
        from car_grpc.voice_engine.engine import SpeechEngine, default_providers
    except ImportError as e:
        print(
            "car-grpc: the voice engine needs the voice extra "
            f"(pip install 'car-grpc[voice]'): {e}",
            file=sys.stderr,
        )
        return 1
    engine = SpeechEngine(
        args.core,
        default_providers(),
        name=args.name,
        core_ca=args.core_ca,
        max_sessions=args.max_sessions,
    )
    return _run(engine)


def _store_note(config: CoreConfig, location: StoreLocation, new: bool, what: str) -> str:
    """Which store a token command used (`what`: its tokens, e.g. "agent tokens"): a server
    honours the tokens of its own store only (a token minted elsewhere fails `token
    mismatch`). Never the store's password."""
    if config.store:
        note = f"car-grpc: {what} of the store {location} (--store or CAR_STORE)"
    else:
        home = os.environ.get("CAR_HOME")
        where = f"CAR_HOME={home}" if home else f"CAR_HOME unset, so {config.state_root}"
        note = f"car-grpc: {what} of the store {location.path} ({where})"
    if new:
        own = "its own store (its --store)" if config.store else "the store under its own CAR_HOME"
        note += (
            f"\ncar-grpc: that store did not exist before: a server honours only the {what} "
            f"of {own}"
        )
    return note


def _cmd_agents(args: argparse.Namespace) -> int:
    # The repositories are async (as a PostgreSQL driver is); a one-shot command simply
    # runs them on an event loop of its own rather than keeping a blocking twin of each.
    return asyncio.run(_with_store(args, "agent tokens", _agents))


def _cmd_a2a_clients(args: argparse.Namespace) -> int:
    return asyncio.run(_with_store(args, "A2A caller tokens", _a2a_clients))


async def _with_store(
    args: argparse.Namespace,
    what: str,
    command: Callable[[argparse.Namespace, Store], Awaitable[int]],
) -> int:
    """Run a token command on the store the server uses, saying on stderr which store that
    is (stdout stays the token alone, or the listing); 1 when the store fails."""
    config = config_from(args).core
    location = store_location(config.store, config.state_root)
    new = location.path is not None and not location.path.exists()
    try:
        store = await open_store(
            config.state_root, config.store, pool_size=1, timeout=config.store_timeout
        )
    except (StoreUnavailable, StoreUrlError) as e:
        print(f"car-grpc: {e}", file=sys.stderr)
        return 1
    print(_store_note(config, location, new, what), file=sys.stderr)
    try:
        return await command(args, store)
    except StoreUnavailable as e:
        print(f"car-grpc: {e}", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _agents(args: argparse.Namespace, store: Store) -> int:
    tokens = AgentTokens(store.agent_tokens)
    if args.agents_cmd == "add":
        print(await tokens.add(args.agent_id))
    elif args.agents_cmd == "remove":
        if not await tokens.remove(args.agent_id):
            print(f"no agent token for {args.agent_id!r}", file=sys.stderr)
            return 1
    else:
        for row in await tokens.list():
            print(f"{row.agent_id}\t{row.created_at}")
    return 0


async def _a2a_clients(args: argparse.Namespace, store: Store) -> int:
    """Like `agents`: the tokens of A2A callers, in the store the server uses."""
    callers = A2aCallers(store.a2a_clients)
    if args.a2a_cmd == "add":
        print(await callers.add(args.name))
    elif args.a2a_cmd == "remove":
        if not await callers.remove(args.name):
            print(f"no A2A caller {args.name!r}", file=sys.stderr)
            return 1
    else:
        for row in await callers.list():
            print(f"{row.name}\t{row.created_at}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="car-grpc",
        description="A gRPC-bridged session server for AI-agent runtimes. State lives under "
        "$CAR_HOME (default ~/.car).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the server: the gRPC core and the WebSocket gateway in one process",
        description="Run the gRPC core and the WebSocket JSON-RPC gateway in one process, "
        "with its store (the SQLite file under $CAR_HOME unless --store names another) and "
        "its token files (in $CAR_HOME/ai.parslee.car when CAR_HOME is set, else "
        "$XDG_RUNTIME_DIR/ai.parslee.car, else ~/.config/ai.parslee.car). Logs one line per "
        "listener; SIGINT/SIGTERM stop it cleanly (token files removed, store closed).",
    )
    _add_ws_flags(
        serve,
        "$CAR_HOME/run/car-server.sock, else $XDG_RUNTIME_DIR/ai.parslee.car/car-server.sock, "
        "else none",
        "default: the core's own --grpc-tls-cert, right for a self-signed one",
    )
    serve.add_argument(
        "--no-unix-socket", action="store_true", help="serve no Unix socket, TCP only"
    )
    serve.add_argument(
        "--dashboard-port",
        type=int,
        metavar="PORT",
        help="dashboard HTTP port (default: the WebSocket port + 1; 0 picks a free one); "
        "the log prints a one-time login link",
    )
    serve.add_argument("--no-dashboard", action="store_true", help="serve no dashboard")
    serve.add_argument(
        "--gateway-processes",
        type=_processes,
        metavar="N|auto",
        help="run the WebSocket gateway in N processes of its own beside the core's, sharing "
        "the port; 0: in the core's process (or CAR_GATEWAY_PROCESSES; default auto: 1 where "
        "the server may run on 2 CPUs or more, else 0; the log says which ran)",
    )
    _add_core_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    core = sub.add_parser("core", help="run the gRPC core alone")
    _add_core_flags(core)
    core.set_defaults(func=_cmd_core)

    gateway = sub.add_parser(
        "gateway",
        help="run a WebSocket gateway alone, in front of a running core",
        description="Run a WebSocket JSON-RPC gateway in front of the core at --core. "
        "Gateways keep no state of their own: run several on one core, each on its own "
        "--port.",
    )
    gateway.add_argument(
        "--core", required=True, metavar="ADDR", help="the core's gRPC address, e.g. 127.0.0.1:9102"
    )
    gateway.add_argument(
        "--core-token-file",
        type=Path,
        metavar="PATH",
        help="the core's daemon token, read from PATH (its auth-token file): the gateway then "
        "carries its connections over shared multiplexed streams, and does not start if the "
        "core refuses the token; PATH is read again whenever the gateway reconnects (a core "
        "that restarted writes its new token there)",
    )
    _add_ws_flags(gateway, "none", "default: plaintext")
    gateway.set_defaults(func=_cmd_gateway)

    voice = sub.add_parser(
        "voice-engine",
        help="run the reference speech engine (PocketSphinx, eSpeak NG) for a running core",
        description="Serve voice providers to the core at --core over VoiceService.ServeVoice, "
        "as any speech engine would: 'sphinx' (speech to text; options sample_rate, phrases) "
        "and, when espeak-ng is installed, 'espeak' (text to speech; options text, voice, "
        "words_per_minute, sample_rate). Authenticates with CAR_AUTH_TOKEN or the daemon "
        "token file where serve writes it ($CAR_HOME/ai.parslee.car, else "
        "$XDG_RUNTIME_DIR/ai.parslee.car, else ~/.config/ai.parslee.car); connects again "
        "whenever the core goes away. Needs the voice extra: pip install 'car-grpc[voice]'.",
    )
    voice.add_argument(
        "--core",
        default="127.0.0.1:9102",
        metavar="ADDR",
        help="the core's gRPC address (default 127.0.0.1:9102)",
    )
    voice.add_argument(
        "--core-ca",
        type=Path,
        metavar="PEM",
        help="dial the core over TLS, trusting these CA certificates (default: plaintext)",
    )
    voice.add_argument(
        "--name", default="car-grpc-voice", help="the engine's name in listings and logs"
    )
    voice.add_argument(
        "--max-sessions",
        type=_count,
        default=8,
        metavar="N",
        help="voice sessions served at once, more are refused (default 8; a speech-to-text "
        "session with the general language model holds about 100 MB)",
    )
    voice.set_defaults(func=_cmd_voice_engine)

    agents = sub.add_parser(
        "agents",
        help="manage per-agent tokens",
        description="Manage per-agent tokens in the store under $CAR_HOME (default ~/.car), "
        "or the one --store / CAR_STORE names: run with the store of the server that is to "
        "honour them. Each command names the store it used on stderr (never its password).",
    )
    agents_sub = agents.add_subparsers(dest="agents_cmd", required=True)
    add = agents_sub.add_parser(
        "add", help="mint a token for an agent; prints it once, alone on stdout"
    )
    add.add_argument("agent_id")
    remove = agents_sub.add_parser("remove", help="revoke an agent's token")
    remove.add_argument("agent_id")
    listing = agents_sub.add_parser("list", help="list agents that have a token")
    for command in (add, remove, listing):
        _add_store_flag(command)
    agents.set_defaults(func=_cmd_agents)

    a2a_clients = sub.add_parser(
        "a2a-clients",
        help="manage the bearer tokens of A2A callers",
        description="Manage the tokens A2A peers authenticate with (Authorization: Bearer) "
        "when they reach attached agents over A2A, in the store under $CAR_HOME or the one "
        "--store / CAR_STORE names: run with the store of the server that is to honour them.",
    )
    a2a_sub = a2a_clients.add_subparsers(dest="a2a_cmd", required=True)
    a2a_add = a2a_sub.add_parser(
        "add", help="mint a token for a caller; prints it once, alone on stdout"
    )
    a2a_add.add_argument("name")
    a2a_remove = a2a_sub.add_parser("remove", help="revoke a caller's token")
    a2a_remove.add_argument("name")
    a2a_list = a2a_sub.add_parser("list", help="list the callers that have a token")
    for command in (a2a_add, a2a_remove, a2a_list):
        _add_store_flag(command)
    a2a_clients.set_defaults(func=_cmd_a2a_clients)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    for cert, key in (
        ("tls_cert", "tls_key"),
        ("grpc_tls_cert", "grpc_tls_key"),
        ("a2a_tls_cert", "a2a_tls_key"),
    ):
        if (getattr(args, cert, None) is None) != (getattr(args, key, None) is None):
            flags = f"--{cert.replace('_', '-')} and --{key.replace('_', '-')}"
            parser.error(f"{flags} go together")
    if hasattr(args, "store"):  # a command that opens the store: check its URL first
        url = args.store or os.environ.get("CAR_STORE", "").strip() or None
        try:
            store_location(url, Path())
        except StoreUrlError as e:
            parser.error(f"--store / CAR_STORE: {e}")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
