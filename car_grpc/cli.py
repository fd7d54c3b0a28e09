"""`car-grpc`: the command line, a thin layer over Config and the embedding API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from car_grpc.config import Config
from car_grpc.core.auth import AgentTokens
from car_grpc.core.server import Core
from car_grpc.store.sqlite import SqliteStore


def _add_core_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-host", help="gRPC listen address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 9102; 0 picks a free one)")
    p.add_argument("--no-auth", action="store_true", help="disable auth (or CAR_NO_AUTH=1)")
    p.add_argument(
        "--no-approvals",
        action="store_true",
        help="disable the approval gate (or CAR_NO_APPROVALS=1)",
    )


def _config(args: argparse.Namespace) -> Config:
    config = Config.from_env()
    if args.grpc_host:
        config.grpc_host = args.grpc_host
    if args.grpc_port is not None:
        config.grpc_port = args.grpc_port
    if args.no_auth:
        config.auth = False
    if args.no_approvals:
        config.approvals = False
    return config


async def _run_until_signalled(core: Core) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await core.start()
    print(f"car-grpc core: gRPC on {core.grpc_address}", flush=True)
    try:
        await stop.wait()
    finally:
        await core.stop()


def _cmd_core(args: argparse.Namespace) -> int:
    asyncio.run(_run_until_signalled(Core(_config(args))))
    return 0


def _agents_store() -> AgentTokens:
    return AgentTokens(SqliteStore(Config.from_env().store_path))


def _cmd_agents(args: argparse.Namespace) -> int:
    tokens = _agents_store()
    try:
        if args.agents_cmd == "add":
            print(tokens.add(args.agent_id))
        elif args.agents_cmd == "remove":
            if not tokens.remove(args.agent_id):
                print(f"no agent token for {args.agent_id!r}", file=sys.stderr)
                return 1
        else:
            for agent_id, created_at in tokens.list():
                print(f"{agent_id}\t{created_at}")
    finally:
        tokens.store.close_sync()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="car-grpc",
        description="A gRPC-bridged session server for AI-agent runtimes. State lives under "
        "$CAR_HOME (default ~/.car).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    core = sub.add_parser("core", help="run the gRPC core alone")
    _add_core_flags(core)
    core.set_defaults(func=_cmd_core)

    agents = sub.add_parser("agents", help="manage per-agent tokens")
    agents_sub = agents.add_subparsers(dest="agents_cmd", required=True)
    add = agents_sub.add_parser("add", help="mint a token for an agent; prints it once")
    add.add_argument("agent_id")
    remove = agents_sub.add_parser("remove", help="revoke an agent's token")
    remove.add_argument("agent_id")
    agents_sub.add_parser("list", help="list agents that have a token")
    agents.set_defaults(func=_cmd_agents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
