"""End-to-end: host events, the agent registry and WatchHostEvents on a real core (gRPC)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import pytest

from car_grpc.config import Config
from car_grpc.core.server import Core
from car_grpc.v1 import host_pb2, host_pb2_grpc, session_pb2, session_pb2_grpc
from car_grpc.wire import codec
from car_grpc.wire.errors import HANDSHAKE_REQUIRED, INVALID_PARAMS, CarError
from tests.bounded import stopped
from tests.conftest import make_config
from tests.session_client import SessionClient, connect
from tests.ws_helpers import running_core


def token(core: Core) -> str:
    assert core.parts is not None and core.parts.tokens is not None
    return core.parts.tokens.daemon


def bearer(core: Core) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token(core)}"),)


async def session(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    return await connect(channel, token=token(core))


async def subscribe(client: SessionClient) -> host_pb2.SubscribeHostResponse:
    reply: host_pb2.SubscribeHostResponse = await client.request(
        "host_subscribe", host_pb2.SubscribeHostRequest()
    )
    assert reply.subscribed
    return reply


async def next_event(client: SessionClient) -> host_pb2.HostEvent:
    frame = await client.next_notification()
    assert frame.WhichOneof("body") == "host_event", frame
    return frame.host_event


def register(agent_id: str, name: str = "Agent", **metadata: Any) -> host_pb2.RegisterAgentRequest:
    req = host_pb2.RegisterAgentRequest(id=agent_id, name=name, kind="assistant")
    if metadata:
        req.metadata.CopyFrom(codec.to_struct(metadata))
    return req


async def test_subscribe_before_handshake_is_refused(core: Core, channel: grpc.aio.Channel) -> None:
    client = await connect(channel, token=token(core), handshake=False)
    with pytest.raises(CarError) as err:
        await client.request("host_subscribe", host_pb2.SubscribeHostRequest())
    assert err.value.code == HANDSHAKE_REQUIRED
    await client.close()


async def test_two_subscribers_see_the_same_events_in_order(
    core: Core, channel: grpc.aio.Channel
) -> None:
    first, second, owner = [await session(core, channel) for _ in range(3)]
    await subscribe(first)
    await subscribe(second)

    agent = (await owner.request("host_register_agent", register("a1", "Writer"))).agent
    assert (agent.id, agent.name, agent.status) == ("a1", "Writer", "registered")
    status = host_pb2.SetAgentStatusRequest(agent_id="a1", status="busy", message="drafting")
    status.extra.update({"progress": 0.5})
    updated = (await owner.request("host_set_status", status)).agent
    assert updated.status == "busy"
    assert codec.struct_to_json(updated.metadata) == {"progress": 0.5}
    unregister = host_pb2.UnregisterAgentRequest(agent_id="a1")
    assert (await owner.request("host_unregister_agent", unregister)).ok

    for client in (first, second):
        events = [await next_event(client) for _ in range(3)]
        assert [e.kind for e in events] == [
            "agent.registered",
            "agent.status_changed",
            "agent.unregistered",
        ]
        assert all(e.agent_id == "a1" for e in events)
        assert [e.sequence for e in events] == list(
            range(events[0].sequence, events[0].sequence + 3)
        )
        assert events[1].message == "drafting"
        assert codec.value_to_json(events[1].payload)["status"] == "busy"
    for client in (first, second, owner):
        await client.close()


async def test_snapshot_carries_agents_pending_approvals_and_recent_events(
    core: Core, channel: grpc.aio.Channel
) -> None:
    owner, late = await session(core, channel), await session(core, channel)
    await owner.request("host_register_agent", register("a1"))
    asked = await owner.request(
        "host_request_approval", host_pb2.RequestApprovalRequest(title="Deploy?")
    )

    snapshot = await subscribe(late)
    assert [a.id for a in snapshot.agents] == ["a1"]
    assert [a.id for a in snapshot.approvals] == [asked.approval.id]
    assert [e.kind for e in snapshot.events] == ["agent.registered", "approval.requested"]
    # The live events continue right after the snapshot's.
    await owner.request(
        "host_set_status", host_pb2.SetAgentStatusRequest(agent_id="a1", status="x")
    )
    live = await next_event(late)
    assert live.sequence == snapshot.events[-1].sequence + 1
    await owner.close()
    await late.close()


async def test_subscribing_again_replaces_the_subscription(
    core: Core, channel: grpc.aio.Channel
) -> None:
    host, owner = await session(core, channel), await session(core, channel)
    await subscribe(host)
    await subscribe(host)
    for i in range(3):
        await owner.request("host_register_agent", register(f"a{i}"))
    await owner.request("host_unregister_agent", host_pb2.UnregisterAgentRequest(agent_id="a0"))
    seen = [await next_event(host) for _ in range(4)]
    assert [(e.kind, e.agent_id) for e in seen] == [
        ("agent.registered", "a0"),
        ("agent.registered", "a1"),
        ("agent.registered", "a2"),
        ("agent.unregistered", "a0"),
    ]  # each once
    await host.close()
    await owner.close()


async def test_only_the_registering_session_may_change_its_agent(
    core: Core, channel: grpc.aio.Channel
) -> None:
    owner, other = await session(core, channel), await session(core, channel)
    await owner.request("host_register_agent", register("a1"))
    refusals = [
        ("host_register_agent", register("a1", "Impostor")),
        ("host_set_status", host_pb2.SetAgentStatusRequest(agent_id="a1", status="hijacked")),
        ("host_unregister_agent", host_pb2.UnregisterAgentRequest(agent_id="a1")),
    ]
    for member, message in refusals:
        with pytest.raises(CarError) as err:
            await other.request(member, message)
        assert err.value.message == "agent 'a1' is owned by another session", member
        assert err.value.code == INVALID_PARAMS

    listed = await other.request("host_agents", host_pb2.ListAgentsRequest())
    assert [(a.id, a.name, a.status) for a in listed.agents] == [("a1", "Agent", "registered")]
    # The owner may re-register (an update), and its agents leave with it.
    again = await owner.request("host_register_agent", register("a1", "Renamed"))
    assert again.agent.name == "Renamed"
    await subscribe(other)
    await owner.close()
    gone = await next_event(other)
    assert (gone.kind, gone.agent_id) == ("agent.unregistered", "a1")
    assert not (await other.request("host_agents", host_pb2.ListAgentsRequest())).agents
    await other.close()


async def test_registry_errors_name_the_field(core: Core, channel: grpc.aio.Channel) -> None:
    client = await session(core, channel)
    cases = [
        ("host_register_agent", host_pb2.RegisterAgentRequest(kind="k"), "name"),
        ("host_register_agent", host_pb2.RegisterAgentRequest(name="n"), "kind"),
        ("host_set_status", host_pb2.SetAgentStatusRequest(agent_id="a1"), "status"),
        ("host_unregister_agent", host_pb2.UnregisterAgentRequest(), "agent_id"),
    ]
    for member, message, field in cases:
        with pytest.raises(CarError) as err:
            await client.request(member, message)
        assert err.value.code == INVALID_PARAMS
        assert err.value.message.endswith(field), err.value.message
    with pytest.raises(CarError) as err:
        await client.request(
            "host_set_status", host_pb2.SetAgentStatusRequest(agent_id="zz", status="s")
        )
    assert err.value.message == "invalid params: unknown agent: zz"
    unknown = host_pb2.UnregisterAgentRequest(agent_id="zz")
    assert not (await client.request("host_unregister_agent", unknown)).ok
    fresh = await client.request(
        "host_register_agent", host_pb2.RegisterAgentRequest(name="n", kind="k")
    )
    assert fresh.agent.id  # an id is minted when none is given
    await client.close()


# ---------------------------------------------------------------- WatchHostEvents


async def watch(
    core: Core, channel: grpc.aio.Channel, after: int
) -> AsyncGenerator[host_pb2.HostEvent, None]:
    stub = host_pb2_grpc.HostServiceStub(channel)
    call = stub.WatchHostEvents(
        host_pb2.WatchHostEventsRequest(after_sequence=after), metadata=bearer(core)
    )
    async for item in call:
        yield item.event


async def take(events: AsyncIterator[host_pb2.HostEvent], n: int) -> list[host_pb2.HostEvent]:
    out: list[host_pb2.HostEvent] = []
    async with asyncio.timeout(5):
        async for event in events:
            out.append(event)
            if len(out) == n:
                break
    return out


async def test_watch_host_events_replays_then_follows(
    core: Core, channel: grpc.aio.Channel
) -> None:
    owner = await session(core, channel)
    for i in range(3):
        await owner.request("host_register_agent", register(f"a{i}"))
    everything = watch(core, channel, after=0)
    replayed = await take(everything, 3)
    assert [(e.sequence, e.agent_id) for e in replayed] == [(1, "a0"), (2, "a1"), (3, "a2")]

    resumed = watch(core, channel, after=2)
    assert [e.sequence for e in await take(resumed, 1)] == [3]
    await owner.request("host_register_agent", register("a3"))
    for stream in (everything, resumed):
        (live,) = await take(stream, 1)
        assert (live.sequence, live.agent_id) == (4, "a3")
        await stream.aclose()
    await owner.close()


async def test_watch_resume_point_out_of_history_shows_a_gap(tmp_path: Any) -> None:
    async with (
        running_core(make_config(tmp_path, host_event_history=2).core) as core,
        grpc.aio.insecure_channel(core.grpc_address) as channel,
    ):
        owner = await session(core, channel)
        for i in range(5):
            await owner.request("host_register_agent", register(f"a{i}"))
        stream = watch(core, channel, after=1)
        # Events 2 and 3 fell out of the history: the stream starts at the oldest kept.
        assert [e.sequence for e in await take(stream, 2)] == [4, 5]
        await stream.aclose()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await take(watch(core, channel, after=99), 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "after_sequence 99 is ahead of the newest host event (5)" in str(err.value.details())
        await owner.close()


# ---------------------------------------------------------------- slow subscribers


async def test_a_stalled_subscriber_slows_neither_the_gate_nor_other_subscribers(
    tmp_path: Any,
) -> None:
    config: Config = make_config(
        tmp_path,
        gated_methods=frozenset({"host.agents"}),
        session_outbound_queue=4,
        host_event_queue=4,
        host_event_history=8,
    )
    core = Core(config.core)
    await core.start()
    # The stalled subscriber's channel does not grow its flow-control window by itself.
    stalled_channel = grpc.aio.insecure_channel(
        core.grpc_address, options=[("grpc.http2.bdp_probe", 0)]
    )
    try:
        async with grpc.aio.insecure_channel(core.grpc_address) as channel:
            stalled = await stalled_subscriber(stalled_channel, token(core))
            reader, owner, asker = [await session(core, channel) for _ in range(3)]
            await subscribe(reader)

            # Far more than the stalled subscriber's queues and windows can hold.
            blob = "x" * 16_384
            count = 200
            for i in range(count):
                await owner.request("host_register_agent", register(f"a{i}", blob=blob))
            # The gate announces and parks while the stalled subscriber still stalls.
            parked = asyncio.create_task(asker.request("host_agents", host_pb2.ListAgentsRequest()))
            seen = [await next_event(reader) for _ in range(count + 1)]
            requested = seen[-1]
            assert requested.kind == "approval.requested"
            approval_id = codec.value_to_json(requested.payload)["id"]
            resolve = host_pb2.ResolveApprovalRequest(approval_id=approval_id, approved=True)
            await reader.request("host_resolve_approval", resolve)
            assert len((await parked).agents) == count
            seen.append(await next_event(reader))
            assert seen[-1].kind == "approval.resolved"
            # The reader saw every event, in order, with no gap.
            first = seen[0].sequence
            assert [e.sequence for e in seen] == list(range(first, first + count + 2))

            # The stalled one, read at last, missed events (a visible gap in `sequence`)
            # and then gets the newest ones.
            sequences = await stalled.read_until(seen[-1].sequence)
            assert sequences == sorted(sequences)
            assert len(sequences) < len(seen)
            assert any(b - a > 1 for a, b in itertools.pairwise(sequences))
            for client in (reader, owner, asker):
                await client.close()
            stalled.call.cancel()
    finally:
        await stalled_channel.close()
        await stopped(core.stop(grace=0))


class StalledSubscriber:
    """A raw Connect stream that subscribes and then reads nothing until `drain`."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def read_until(self, last: int) -> list[int]:
        """The sequences of the host events it receives, up to the one numbered `last`."""
        sequences: list[int] = []
        async with asyncio.timeout(10):
            while not sequences or sequences[-1] < last:
                frame = await self.call.read()
                if frame.WhichOneof("body") == "host_event":
                    sequences.append(frame.host_event.sequence)
        return sequences


async def stalled_subscriber(channel: grpc.aio.Channel, daemon_token: str) -> StalledSubscriber:
    call = session_pb2_grpc.SessionServiceStub(channel).Connect()
    auth = session_pb2.ClientFrame(id="1")
    auth.session_auth.token = daemon_token
    handshake = session_pb2.ClientFrame(id="2")
    handshake.server_handshake.protocol_version.number_value = 3
    subscribe = session_pb2.ClientFrame(id="3")
    subscribe.host_subscribe.SetInParent()
    for frame in (auth, handshake, subscribe):
        await call.write(frame)
        answer = await call.read()
        assert isinstance(answer, session_pb2.ServerFrame)
        assert answer.id == frame.id and answer.WhichOneof("body") != "error", answer
    return StalledSubscriber(call)
