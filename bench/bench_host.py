"""Host events and the approval gate on an in-process core, over real gRPC sockets.

- fan-out: 8 host.subscribe sessions receive every event of a publisher (host.set_status
  in a loop); events/s delivered to each, with and without a 9th subscriber that never
  reads. Target: the stalled subscriber costs the others at most 20%.
- parked: p50 of an ungated request (host.agents) on a session that has 64 gated
  requests parked, as a ratio to the same session with none parked. Target: at most 1.5x.
- gate round trip: a gated call resolved at once by a subscriber that approves every
  approval.requested it sees (two store commits, two events, the call itself): p50/p99.

    python -m bench bench_host          (or ./dev bench bench_host)
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from car_grpc.config import CoreConfig
from car_grpc.core.server import Core
from car_grpc.v1 import host_pb2, session_pb2, session_pb2_grpc
from car_grpc.wire import codec
from tests.session_client import SessionClient, connect

SUBSCRIBERS = 8
EVENTS = 4000
PARKED = 64
ROUND_TRIPS = 300


def _config(root: Path, **overrides: Any) -> CoreConfig:
    return CoreConfig(
        state_root=root / "home",
        token_dir=root / "home" / "tokens",
        grpc_port=0,
        session_outbound_queue=64,
        host_event_queue=64,
        **overrides,
    )


async def _session(core: Core, channel: grpc.aio.Channel) -> SessionClient:
    assert core.parts is not None and core.parts.tokens is not None
    return await connect(channel, token=core.parts.tokens.daemon)


async def _stalled(channel: grpc.aio.Channel, token: str) -> Any:
    """A Connect stream that subscribes and then never reads."""
    call = session_pb2_grpc.SessionServiceStub(channel).Connect()
    frames = [session_pb2.ClientFrame(id=str(i)) for i in (1, 2, 3)]
    frames[0].session_auth.token = token
    frames[1].server_handshake.protocol_version.number_value = 3
    frames[2].host_subscribe.SetInParent()
    for frame in frames:
        await call.write(frame)
        await call.read()
    return call


async def fan_out(stalled: bool) -> float:
    """Events per second delivered to each of the reading subscribers."""
    with tempfile.TemporaryDirectory() as tmp:
        core = Core(_config(Path(tmp)))
        await core.start()
        slow_channel = grpc.aio.insecure_channel(
            core.grpc_address, options=[("grpc.http2.bdp_probe", 0)]
        )
        try:
            async with grpc.aio.insecure_channel(core.grpc_address) as channel:
                assert core.parts is not None and core.parts.tokens is not None
                if stalled:
                    await _stalled(slow_channel, core.parts.tokens.daemon)
                readers = [await _session(core, channel) for _ in range(SUBSCRIBERS)]
                for reader in readers:
                    await reader.request("host_subscribe", host_pb2.SubscribeHostRequest())
                owner = await _session(core, channel)
                register = host_pb2.RegisterAgentRequest(id="a", name="a", kind="k")
                register.metadata.CopyFrom(codec.to_struct({"blob": "x" * 512}))
                await owner.request("host_register_agent", register)

                async def drain(reader: SessionClient) -> None:
                    for _ in range(EVENTS + 1):
                        await reader.next_notification(timeout=30)

                started = time.perf_counter()
                draining = [asyncio.create_task(drain(r)) for r in readers]
                status = host_pb2.SetAgentStatusRequest(agent_id="a", status="s")
                for _ in range(EVENTS):
                    await owner.request("host_set_status", status)
                await asyncio.gather(*draining)
                elapsed = time.perf_counter() - started
                for client in [*readers, owner]:
                    await client.close()
        finally:
            await slow_channel.close()
            await core.stop(grace=0)
    return EVENTS / elapsed


async def parked_latency(parked: int) -> float:
    """p50 seconds of host.agents on a session with `parked` gated calls waiting."""
    with tempfile.TemporaryDirectory() as tmp:
        core = Core(_config(Path(tmp), gated_methods=frozenset({"host.register_agent"})))
        await core.start()
        try:
            async with grpc.aio.insecure_channel(core.grpc_address) as channel:
                client, watcher = await _session(core, channel), await _session(core, channel)
                await watcher.request("host_subscribe", host_pb2.SubscribeHostRequest())
                waiting = [
                    asyncio.create_task(
                        client.request(
                            "host_register_agent",
                            host_pb2.RegisterAgentRequest(id=f"a{i}", name="a", kind="k"),
                            timeout=60,
                        )
                    )
                    for i in range(parked)
                ]
                for _ in range(parked):  # every one is parked once announced
                    await watcher.next_notification(timeout=30)
                times = []
                for _ in range(ROUND_TRIPS):
                    t0 = time.perf_counter()
                    await client.request("host_agents", host_pb2.ListAgentsRequest())
                    times.append(time.perf_counter() - t0)
                for task in waiting:
                    task.cancel()
                await client.close()
                await watcher.close()
        finally:
            await core.stop(grace=0)
    return statistics.median(times)


async def gate_round_trip() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        core = Core(_config(Path(tmp), gated_methods=frozenset({"host.agents"})))
        await core.start()
        try:
            async with grpc.aio.insecure_channel(core.grpc_address) as channel:
                caller, person = await _session(core, channel), await _session(core, channel)
                await person.request("host_subscribe", host_pb2.SubscribeHostRequest())

                async def approve_all() -> None:
                    while True:
                        event = (await person.next_notification(timeout=60)).host_event
                        if event.kind == "approval.requested":
                            approval_id = codec.value_to_json(event.payload)["id"]
                            req = host_pb2.ResolveApprovalRequest(
                                approval_id=approval_id, approved=True
                            )
                            await person.request("host_resolve_approval", req)

                bot = asyncio.create_task(approve_all())
                times = []
                for _ in range(ROUND_TRIPS):
                    t0 = time.perf_counter()
                    await caller.request("host_agents", host_pb2.ListAgentsRequest())
                    times.append(time.perf_counter() - t0)
                bot.cancel()
                await caller.close()
                await person.close()
        finally:
            await core.stop(grace=0)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


async def _main() -> None:
    free = await fan_out(stalled=False)
    with_stall = await fan_out(stalled=True)
    print(
        f"fan-out to {SUBSCRIBERS} subscribers: {free:,.0f} events/s; with a stalled 9th: "
        f"{with_stall:,.0f} events/s (ratio {with_stall / free:.2f}, target >= 0.8)"
    )
    idle = await parked_latency(0)
    busy = await parked_latency(PARKED)
    print(
        f"host.agents p50: {idle * 1e3:.2f} ms idle, {busy * 1e3:.2f} ms with {PARKED} gated "
        f"calls parked (ratio {busy / idle:.2f}, target <= 1.5)"
    )
    p50, p99 = await gate_round_trip()
    print(f"gated call approved at once: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
