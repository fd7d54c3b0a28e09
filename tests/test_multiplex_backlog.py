"""What a ConnectMultiplexed stream's records wait for the gateway is bounded too: a
gateway that sends but does not read cannot make the core pile up the answers and end
records of session after session (each within its credits, but without end). Past the
stream's bytes bound (CoreConfig.multiplex_stream_bytes) the core reads no further record
until the gateway reads; then everything goes on, nothing lost. On a real core over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import session_pb2
from car_grpc.wire import batch, multiplex
from tests.bounded import stopped
from tests.conftest import make_config
from tests.test_connect_multiplexed import PATH, _frame
from tests.ws_helpers import daemon_token

#: The stream's bound here: a few dozen sessions' answers.
STREAM_BYTES = 4096
#: Sessions the gateway opens and ends: their answers are far past the bound and the
#: transport's windows (a few hundred KB).
SESSIONS = 3000
#: Sessions opened by one message.
PER_MESSAGE = 100
PAUSED = re.compile(r"(\d+) bytes wait for the gateway to read them \(at most (\d+)\)")
ENDED = re.compile(r"multiplexed stream from \S+ ended: the gateway read none")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, multiplex_stream_bytes=STREAM_BYTES)


class _Said(logging.Handler):
    """The core's log lines that match PAUSED, as they come (the core runs in this loop),
    and whether it said that a stream ended (ENDED)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[re.Match[str]] = []
        self.event = asyncio.Event()
        self.ended = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if match := PAUSED.search(record.getMessage()):
            self.found.append(match)
            self.event.set()
        if ENDED.search(record.getMessage()):
            self.ended.set()


@pytest.fixture
def said() -> Iterator[_Said]:
    handler = _Said()
    logger = logging.getLogger("car_grpc.core.multiplex")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@contextlib.asynccontextmanager
async def flooded(core: Core) -> AsyncIterator[tuple[Any, asyncio.Task[None]]]:
    """A ConnectMultiplexed stream (with the small fixed windows car-grpc's gateway keeps
    for its other streams) and the task that opens SESSIONS sessions on it, each asking
    once (unauthenticated: refused) and ending at once, whether the caller reads or not."""
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(core.grpc_address, options=options) as channel:
        call = channel.stream_stream(
            PATH,
            request_serializer=batch.serialize,
            response_deserializer=session_pb2.ConnectMultiplexedResponse.FromString,
        )(metadata=(("authorization", f"Bearer {daemon_token(core)}"),))
        ask = batch.encode([_frame("1", "tools_list")])

        async def send() -> None:
            for first in range(0, SESSIONS, PER_MESSAGE):
                keys = range(first, first + PER_MESSAGE)
                await call.write(b"".join(multiplex.record(k, ask, end=True) for k in keys))

        sending = asyncio.create_task(send())
        try:
            yield call, sending
        finally:
            sending.cancel()
            call.cancel()


async def read_ends(call: Any, ended: set[int], until: int) -> None:
    """Read the stream, noting each session whose end comes, until `until` have."""
    while len(ended) < until:
        message = await call.read()
        assert isinstance(message, session_pb2.ConnectMultiplexedResponse)
        ended |= {part.session for part in message.sessions if part.end}


async def test_a_gateway_that_does_not_read_stops_being_read(core: Core, said: _Said) -> None:
    async with flooded(core) as (call, sending):
        try:
            async with asyncio.timeout(30):
                await said.event.wait()  # the core paused reading, holding no more than:
        except TimeoutError:
            pytest.fail("the core read on while the answers for the gateway piled up")
        held, bound = map(int, said.found[0].groups())
        # Past the bound by at most what sessions opened before the pause still said
        # (those of one message here, each an answer and an end record).
        assert bound == STREAM_BYTES and held <= STREAM_BYTES + PER_MESSAGE * 128

        ended: set[int] = set()
        async with asyncio.timeout(60):  # read now: the core reads on, to the end
            await read_ends(call, ended, SESSIONS)
            await sending
    assert ended == set(range(SESSIONS))
    assert len(said.found) == 1  # said once a stream


async def test_a_gateway_that_never_reads_loses_its_stream(tmp_path: Path, said: _Said) -> None:
    """Reading paused, a gateway that still reads nothing within multiplex_stall_timeout
    loses its stream, and the core what it held for it: reading afterwards, the gateway
    gets what was already on its way, then RESOURCE_EXHAUSTED saying why (grpc sends the
    status after the data before it), not every session's end."""
    config = make_config(tmp_path, multiplex_stream_bytes=STREAM_BYTES, multiplex_stall_timeout=0.5)
    core = Core(config.core)
    await core.start()
    try:
        ended: set[int] = set()
        async with flooded(core) as (call, _):
            async with asyncio.timeout(30):
                await said.ended.wait()  # paused, then ended by the core
            assert said.found
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async with asyncio.timeout(30):
                    await read_ends(call, ended, SESSIONS)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.fullmatch(
            rf"the gateway read none of the \d+ bytes held for it \(at most {STREAM_BYTES}\)"
            r" in 0.5 s",
            str(refused.value.details()),
        ), refused.value.details()
        assert len(ended) < SESSIONS
    finally:
        await stopped(core.stop(grace=0), "the core's stop")
