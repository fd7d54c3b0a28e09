"""Shared fixtures: a real core on an ephemeral loopback port, with its state in tmp_path;
and one real PostgreSQL server for the session, for the tests that ask for it."""

from __future__ import annotations

import atexit
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.gateway import Gateway
from tests.postgres_server import PostgresServer
from tests.session_client import SessionClient, connect
from tests.ws_helpers import daemon_token, running, running_core

#: `CAR_TEST_STORE=postgresql ./dev test` runs every core that make_config configures (the
#: in-process ones) on a database of its own on the session's PostgreSQL server instead of
#: the embedded SQLite file. Processes started with their own CAR_HOME keep theirs.
TEST_STORE = os.environ.get("CAR_TEST_STORE", "")
_server: list[PostgresServer] = []
_databases: dict[Path, str] = {}


def shared_postgres() -> PostgresServer:
    """The session's PostgreSQL server, started the first time it is asked for and removed
    when the test process exits."""
    if not _server:
        server = PostgresServer.create()
        atexit.register(server.destroy)
        server.start()
        _server.append(server)
    return _server[0]


def make_config(root: Path, **overrides: object) -> Config:
    """A config with its state under `root`, every port ephemeral, no Unix socket, and
    `overrides` (a field no section has is a TypeError: a typo fails the test)."""
    defaults: dict[str, object] = {
        "state_root": root / "car-home",
        "token_dir": root / "car-home" / "ai.parslee.car",
        "grpc_port": 0,
        "ws_port": 0,
        # Ephemeral too (not the gRPC port + 1): a core restarted on its gRPC port must not
        # need a neighbouring port that another test may hold meanwhile.
        "a2a_port": 0,
        "unix_socket": None,
        # A Server made from it runs its gateway in this process (`server.gateway`), not
        # in processes of its own as "auto" may (tests/test_gateway_processes*.py do).
        "gateway_processes": 0,
    }
    if TEST_STORE == "postgresql" and "store" not in overrides:
        # One database per state root: a core restarted on the same root finds its state.
        if root not in _databases:
            _databases[root] = shared_postgres().create_database("suite")
        defaults["store"] = _databases[root]
    return Config().with_overrides(**(defaults | overrides))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def served(config: Config) -> AsyncIterator[tuple[Core, Gateway]]:
    """A running core and a gateway in front of it, with `config`."""
    async with running(config) as both:
        yield both


@pytest.fixture
async def core(config: Config) -> AsyncIterator[Core]:
    async with running_core(config.core) as core:
        yield core


@pytest.fixture
async def channel(core: Core) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(core.grpc_address) as ch:
        yield ch


@pytest.fixture
async def client(core: Core, channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    """A session on `core` with its daemon token."""
    c = await connect(channel, token=daemon_token(core))
    yield c
    await c.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole test session (tests/postgres_server.py),
    installed when missing and started the first time a test asks for it."""
    yield shared_postgres()
