"""Fan-out serializes each event once, whatever the number of subscribers."""

from __future__ import annotations

from car_grpc.core.host import HostEvents
from car_grpc.v1 import host_pb2, session_pb2
from car_grpc.wire.twins import fill_out


def test_a_host_event_is_serialized_once_for_every_listener() -> None:
    host = HostEvents(history=16, queue_size=4)
    event = host.publish("agent.registered", agent_id="a1", payload={"i": 1})
    first = host.notification(event)
    assert host.notification(event) is first  # the same bytes, not made again
    # As any frame the core sends: its typed twins derived (kind_enum here).
    expected = fill_out(session_pb2.ServerFrame(host_event=event))
    assert session_pb2.ServerFrame.FromString(first) == expected
    assert expected.host_event.kind_enum == host_pb2.HOST_EVENT_KIND_AGENT_REGISTERED


def test_the_serialized_events_kept_are_bounded_by_the_listener_queue() -> None:
    host = HostEvents(history=16, queue_size=4)
    events = [host.publish("host.notification", message=str(i)) for i in range(10)]
    made = [host.notification(e) for e in events]
    assert len(host._notifications) == 4
    # One no longer kept is made again, and still right.
    again = host.notification(events[0])
    assert again == made[0] and again is not made[0]
