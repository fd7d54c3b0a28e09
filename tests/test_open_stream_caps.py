"""The streams anyone may open without credentials, grpc.health.v1.Health/Watch and server
reflection (v1 and v1alpha), are capped for the whole core (max_health_watches,
max_reflection_streams), on a real core over real gRPC with caps of 2: the one past the cap
is refused RESOURCE_EXHAUSTED with the rich details naming the limit, the held ones are
still answered, and a slot frees when a stream is cancelled, its client goes, or it ends;
unary Health/Check is not counted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from car_grpc.cli import build_parser, config_from
from car_grpc.config import Config
from car_grpc.core.open_services import MAX_WATCHED_NAME
from car_grpc.core.registry import StreamCap
from car_grpc.core.server import Core
from car_grpc.wire.errors import INTERNAL
from tests.bounded import until
from tests.conftest import make_config
from tests.error_details import assert_rich_status, car_error
from tests.test_health_reflection import REFLECTION
from tests.ws_helpers import running_core

Status = health_pb2.HealthCheckResponse
WATCHES_REFUSAL = "too many health watches: the core holds at most 2 (max_health_watches)"
REFLECTION_REFUSAL = (
    "too many reflection streams: the core holds at most 2 (max_reflection_streams)"
)


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    config = make_config(tmp_path, max_health_watches=2, max_reflection_streams=2)
    async with running_core(config.core) as core:
        yield core


async def held(cap: StreamCap, count: int) -> None:
    """Wait (bounded) until the core holds `count` streams under `cap`: the server sees a
    cancel or a client's going a little after the client does."""
    await until(lambda: cap.held == count, f"the core holds {count} {cap.what}")


def _watch(channel: grpc.aio.Channel, service: str = "") -> Any:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))


async def _check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def _read(call: Any) -> Any:
    return await call.read()


async def _refused(call: Any, message: str) -> None:
    """`call` fails RESOURCE_EXHAUSTED with `message` and the rich details of the others."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    e = refused.value
    assert (e.code(), e.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    error = car_error(e)
    assert (error.code, error.message) == (INTERNAL, message)
    assert_rich_status(e, error)


async def test_health_watches_past_the_cap_are_refused_and_slots_free(core: Core) -> None:
    health: Any = core._health  # the library's servicer: what sets a service's status
    async with (
        grpc.aio.insecure_channel(core.grpc_address) as channel,
        grpc.aio.insecure_channel(core.grpc_address) as other,
    ):
        known = _watch(channel, "car.v1.SessionService")
        unknown = _watch(other, "no.such.Service")  # answered, and held like any
        assert (await _read(known)).status == Status.SERVING
        assert (await _read(unknown)).status == Status.SERVICE_UNKNOWN
        assert core.health_watches.held == 2
        await _refused(_watch(channel), WATCHES_REFUSAL)
        # Check is not a stream: answered while the watches are full.
        assert await _check(channel) == Status.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await _check(channel, "no.such.Service")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # A held watch still gets updates.
        await health.set("car.v1.SessionService", Status.NOT_SERVING)
        assert (await _read(known)).status == Status.NOT_SERVING
        await health.set("car.v1.SessionService", Status.SERVING)
        assert (await _read(known)).status == Status.SERVING

        known.cancel()  # the client cancels: its slot frees
        await held(core.health_watches, 1)
        again = _watch(channel)
        assert (await _read(again)).status == Status.SERVING
        await _refused(_watch(channel), WATCHES_REFUSAL)

        await other.close()  # the client goes: its watch's slot frees
        await held(core.health_watches, 1)
        last = _watch(channel, "no.such.Service")
        assert (await _read(last)).status == Status.SERVICE_UNKNOWN
        # The library's entries for watched names are only those being watched.
        assert set(health._server_watchers) == {"", "no.such.Service"}
        again.cancel()
        last.cancel()
        await held(core.health_watches, 0)
        assert not health._server_watchers and not health._watcher_count_by_service


async def test_a_watch_of_an_overlong_name_is_refused_without_a_slot(core: Core) -> None:
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _read(_watch(channel, "x" * (MAX_WATCHED_NAME + 1)))
        e = refused.value
        message = f"invalid params: longer than {MAX_WATCHED_NAME} characters: service"
        assert (e.code(), e.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
        assert_rich_status(e, car_error(e))
        assert core.health_watches.held == 0
        longest = _watch(channel, "x" * MAX_WATCHED_NAME)
        assert (await _read(longest)).status == Status.SERVICE_UNKNOWN
        longest.cancel()


async def test_health_list_answers_every_service_with_the_status_check_gives(core: Core) -> None:
    health: Any = core._health
    async with grpc.aio.insecure_channel(core.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        listed = (await stub.List(health_pb2.HealthListRequest(), timeout=5)).statuses
        assert {"", "car.v1.SessionService", "lf.a2a.v1.A2AService"} <= set(listed)
        for name, reply in listed.items():
            assert reply.status == await _check(channel, name) == Status.SERVING, name
        await health.set("car.v1.SessionService", Status.NOT_SERVING)
        listed = (await stub.List(health_pb2.HealthListRequest(), timeout=5)).statuses
        assert listed["car.v1.SessionService"].status == Status.NOT_SERVING
        assert core.health_watches.held == 0  # a unary call, not counted


def _reflection(channel: grpc.aio.Channel, version: str) -> Any:
    return channel.stream_stream(
        f"/{REFLECTION[version]}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()


async def _lists(call: Any) -> None:
    """`call` is answered: it lists the services."""
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    assert "car.v1.SessionService" in [s.name for s in reply.list_services_response.service]


async def test_reflection_streams_past_the_cap_are_refused_and_slots_free(core: Core) -> None:
    async with (
        grpc.aio.insecure_channel(core.grpc_address) as channel,
        grpc.aio.insecure_channel(core.grpc_address) as other,
    ):
        calls = [_reflection(channel, "v1"), _reflection(other, "v1alpha")]
        for call in calls:
            await _lists(call)
        assert core.reflection_streams.held == 2  # both versions count under one cap
        for version in REFLECTION:
            await _refused(_reflection(channel, version), REFLECTION_REFUSAL)
        for call in calls:
            await _lists(call)

        calls[0].cancel()  # the client cancels
        await held(core.reflection_streams, 1)
        again = _reflection(channel, "v1")
        await _lists(again)
        await _refused(_reflection(channel, "v1alpha"), REFLECTION_REFUSAL)

        await other.close()  # the client goes
        await held(core.reflection_streams, 1)
        last = _reflection(channel, "v1alpha")
        await _lists(last)

        await again.done_writing()  # the stream ends as it should
        assert await again.read() is grpc.aio.EOF
        await held(core.reflection_streams, 1)
        await _lists(_reflection(channel, "v1"))
        assert core.reflection_streams.held == 2
        # Health watches are counted apart.
        watch = _watch(channel)
        assert (await _read(watch)).status == Status.SERVING
        watch.cancel()


def test_the_caps_come_from_the_environment_or_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Config().core
    assert (defaults.max_health_watches, defaults.max_reflection_streams) == (64, 64)
    monkeypatch.setenv("CAR_MAX_HEALTH_WATCHES", "10")
    monkeypatch.setenv("CAR_MAX_REFLECTION_STREAMS", "11")
    config = Config.from_env().core
    assert (config.max_health_watches, config.max_reflection_streams) == (10, 11)
    for command in ("serve", "core"):
        args = [command, "--max-health-watches", "3", "--max-reflection-streams", "4"]
        flagged = config_from(build_parser().parse_args(args)).core
        assert (flagged.max_health_watches, flagged.max_reflection_streams) == (3, 4)
    monkeypatch.setenv("CAR_MAX_HEALTH_WATCHES", "0")
    with pytest.raises(ValueError, match="CAR_MAX_HEALTH_WATCHES must be a whole"):
        Config.from_env()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["core", "--max-reflection-streams", "0"])
