"""A cluster: several cores on one PostgreSQL store (docs/architecture.md, "A cluster").

Each core joins under its id with a lease it renews every third of the lease; a core
whose lease has expired is released by whichever surviving core sees it first (one
transaction in the store: its open runs end `incomplete`, its pending approvals expire,
its attachments go). A core restarted under the same id waits for its old lease to run
out if it is still held, releases what its earlier life left, and rejoins.

What the cores tell each other goes through the store's notification channel
(`ClusterStore.notify` / `listen`), as small JSON messages `{"k": kind, "c": core_id, ...}`
sent after the writes they announce have committed:

- `run` {run}: a run has new records (readers on other cores read them from the store);
- `event` {event}: a host event published on core `c` (base64 of its protobuf);
- `approval` {id}: an approval was resolved on core `c` (the core parking the call
  reads the outcome from the store);
- `attach` {agent, seq}: an agent attached on core `c` (an older attachment elsewhere
  is dropped).

The messages are a wake-up, never the only copy: what matters is in the store, and a
core whose listening connection came back catches up from it (`on_connected`). Chats,
which need a request, an answer and a stream tied to two live sessions, go core to core
over gRPC instead (car_grpc.core.peers).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import logging
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from car_grpc.core.background import Background
from car_grpc.core.registry import SessionRegistry
from car_grpc.core.session import ClientSession
from car_grpc.store.repositories import (
    NOTIFY_MAX,
    ClusterStore,
    CoreRow,
    Released,
    StoreUnavailable,
)
from car_grpc.v1 import host_pb2, runs_pb2

log = logging.getLogger(__name__)

Message = dict[str, Any]
Handler = Callable[[Message], None]

#: Messages waiting to be sent at most (beyond it the oldest are dropped: they are
#: wake-ups, and readers catch up from the store), and messages sent per transaction.
SEND_QUEUE = 4096
SEND_BATCH = 256


class Cluster:
    """This core's membership and its messages to and from the other cores."""

    def __init__(
        self,
        store: ClusterStore,
        *,
        lease: float,
        ended: Callable[[], runs_pb2.RunRecord],
        expire: Callable[[host_pb2.HostApproval, str], host_pb2.HostApproval],
    ) -> None:
        if lease <= 0:
            raise ValueError("cluster_lease must be positive")
        self.store = store
        self.core_id = store.core_id
        self.lease = lease
        self.advertise = ""
        self.incarnation = uuid.uuid4().hex
        self._ended = ended
        #: How approvals expire: those of this core's earlier life or of its own clean
        #: stop as on one core, a dead peer's saying why.
        self._expire_own: Callable[[host_pb2.HostApproval], host_pb2.HostApproval] = lambda a: (
            expire(a, "the server stopped")
        )
        self._expire_gone: Callable[[host_pb2.HostApproval], host_pb2.HostApproval] = lambda a: (
            expire(a, "its core is gone")
        )
        self._handlers: dict[str, list[Handler]] = collections.defaultdict(list)
        self._on_connected: list[Callable[[], None]] = []
        self._on_released: list[Callable[[Released], None]] = []
        self._on_lost: list[Callable[[], None]] = []
        #: What this core says of itself with each renewal (status counts).
        self.stats: Callable[[], dict[str, int]] = dict
        #: Digests of this core's daemon and host tokens, registered with it.
        self.tokens: tuple[bytes, ...] = ()
        self._on_members: list[Callable[[list[CoreRow]], None]] = []
        self._outbox: collections.deque[str] = collections.deque()
        self._queued_runs: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0

    # ------------------------------------------------------------ hooks

    def on(self, kind: str, handler: Handler) -> None:
        """Call `handler(message)` for each message of `kind` from another core."""
        self._handlers[kind].append(handler)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Call `hook` whenever the listening connection is (re)established."""
        self._on_connected.append(hook)

    def on_members(self, hook: Callable[[list[CoreRow]], None]) -> None:
        """Call `hook` with the members, as read at join and after each renewal."""
        self._on_members.append(hook)

    async def refresh_members(self) -> list[CoreRow]:
        members = await self.store.members()
        for hook in self._on_members:
            hook(members)
        return members

    def on_lost(self, hook: Callable[[], None]) -> None:
        """Call `hook` when this core finds its lease lost (a peer released what it held)."""
        self._on_lost.append(hook)

    def on_released(self, hook: Callable[[Released], None]) -> None:
        """Call `hook` with what a dead core held, once this core has released it."""
        self._on_released.append(hook)

    # ------------------------------------------------------------ life

    async def join(self, advertise: str) -> Released | None:
        """Register with a lease (waiting for an earlier life's lease to run out), then
        listen, renew and watch the others. What an earlier life left is released."""
        self.advertise = advertise
        # An earlier life that died holds the id for at most a lease; a live process that
        # holds it renews it: refuse to start rather than wait for ever.
        give_up = asyncio.get_running_loop().time() + 2 * self.lease + 1
        while True:
            wait, released = await self.store.join(
                advertise,
                self.incarnation,
                self.lease,
                self._ended(),
                self._expire_own,
                self.tokens,
            )
            if released is not None:
                break
            if asyncio.get_running_loop().time() > give_up:
                raise RuntimeError(
                    f"cluster: core id {self.core_id} is held by another live core "
                    "(give each core its own --core-id or CAR_HOME)"
                )
            log.warning(
                "cluster: core id %s is held by another process for %.1fs more; waiting",
                self.core_id,
                wait,
            )
            await asyncio.sleep(min(wait + 0.05, self.lease))
        log.info("cluster: core %s joined, advertising %s", self.core_id, advertise)
        await self.refresh_members()
        listening = asyncio.Event()

        def connected() -> None:
            listening.set()
            for hook in self._on_connected:
                hook()

        self._tasks = [
            asyncio.create_task(self.store.listen(self._received, connected)),
            asyncio.create_task(self._keep_lease()),
            asyncio.create_task(self._send_loop()),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.lease):
                await listening.wait()
        return released

    async def leave(self) -> None:
        """Stop (at shutdown, after the domains ended what they hold): send what is
        queued, then give up the lease."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while self._outbox:
                    self._wake.set()
                    await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.store.leave(self.incarnation, self._ended(), self._expire_own)
        except StoreUnavailable as e:
            log.warning("cluster: could not leave cleanly: %s", e)

    async def members(self) -> list[CoreRow]:
        return await self.store.members()

    async def _keep_lease(self) -> None:
        period = self.lease / 3
        while True:
            await asyncio.sleep(period)
            try:
                stats = json.dumps(self.stats(), separators=(",", ":"))
                if not await self.store.renew(self.incarnation, self.lease, stats):
                    # Our lease ran out (the store was away longer than a lease) and a
                    # peer released what we held: join again as a new incarnation.
                    log.error("cluster: core %s lost its lease; rejoining", self.core_id)
                    for hook in self._on_lost:
                        hook()
                    self.incarnation = uuid.uuid4().hex
                    await self.store.join(
                        self.advertise,
                        self.incarnation,
                        self.lease,
                        self._ended(),
                        self._expire_own,
                        self.tokens,
                    )
                gone = await self.store.release_expired(self._ended(), self._expire_gone)
                for released in gone:
                    self._released(released)
                await self.refresh_members()
            except StoreUnavailable as e:
                log.warning("cluster: lease not renewed: %s", e)
            except Exception:
                log.exception("cluster: lease renewal failed")

    def _released(self, released: Released) -> None:
        log.warning(
            "cluster: core %s is gone: released %d run(s), %d approval(s), %d agent(s)",
            released.core_id,
            len(released.runs),
            len(released.approvals),
            len(released.agents),
        )
        for run_id in released.runs:
            self.publish("run", run=run_id)
        for hook in self._on_released:
            hook(released)

    # ------------------------------------------------------------ messages

    def publish(self, kind: str, **data: Any) -> None:
        """Send a message to every core (this one too), after what is queued; never waits.
        A `run` message already queued for the same run is not queued twice."""
        if kind == "run":
            if data["run"] in self._queued_runs:
                return
            self._queued_runs.add(data["run"])
        text = json.dumps({"k": kind, "c": self.core_id, **data}, separators=(",", ":"))
        if len(text.encode()) > NOTIFY_MAX:
            log.warning("cluster: %s message of %d bytes not sent (too large)", kind, len(text))
            return
        if len(self._outbox) >= SEND_QUEUE:
            self._forget(self._outbox.popleft())
            self.dropped += 1
        self._outbox.append(text)
        self._wake.set()

    def publish_event(self, event: host_pb2.HostEvent) -> None:
        """Send a host event of this core to the others."""
        data = base64.b64encode(event.SerializeToString()).decode()
        if len(data) > NOTIFY_MAX - 100:
            # Too large for a notification: it crosses without its payload.
            slim = host_pb2.HostEvent()
            slim.CopyFrom(event)
            slim.ClearField("payload")
            data = base64.b64encode(slim.SerializeToString()).decode()
        self.publish("event", event=data)

    def _forget(self, text: str) -> None:
        if text.startswith('{"k":"run"'):
            self._queued_runs.discard(json.loads(text)["run"])

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(SEND_BATCH, len(self._outbox)))]
                for text in batch:
                    self._forget(text)
                try:
                    await self.store.notify(batch)
                except StoreUnavailable as e:
                    # Lost: every core catches up from the store when it reconnects.
                    log.warning("cluster: %d message(s) not sent: %s", len(batch), e)
                    await asyncio.sleep(0.2)
                except Exception:
                    log.exception("cluster: sending failed")

    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            kind = message["k"]
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: unreadable message ignored")
            return
        for handler in self._handlers.get(kind, ()):
            try:
                handler(message)
            except Exception:
                log.exception("cluster: %s handler failed", kind)


def event_of(message: Message) -> host_pb2.HostEvent:
    """The host event an `event` message carries."""
    return host_pb2.HostEvent.FromString(base64.b64decode(message["event"]))


def from_elsewhere(cluster: Cluster, message: Message) -> bool:
    return bool(message.get("c") != cluster.core_id)


def default_core_id(state_root: Path) -> str:
    """A stable id: the machine's name and a digest of the core's state root (CAR_HOME),
    the same across restarts; two cores on one machine have their own state roots (their
    token files and sockets are there)."""
    digest = hashlib.sha256(str(state_root.resolve()).encode()).hexdigest()[:10]
    return f"{socket.gethostname() or 'core'}-{digest}"


class ClusterAttachments:
    """Agent attachment, cluster-wide: attaching an agent here records it in the store
    (where other cores look for it to route chats) and tells the other cores, which drop
    an older attachment of the same agent, as one core drops the older of two of its
    own. The store's attachment numbers decide which is newer when two cores race."""

    def __init__(self, cluster: Cluster, registry: SessionRegistry) -> None:
        self._cluster = cluster
        self._registry = registry
        #: agent_id -> the number of its attachment here.
        self._numbers: dict[str, int] = {}
        self._background = Background(log)
        registry.on_attach(self._attached)
        registry.on_detach(self._detached)
        cluster.on("attach", self._attached_elsewhere)

    async def _attached(self, agent_id: str, session: ClientSession) -> None:
        number = await self._cluster.store.attach(agent_id, session.id)
        self._numbers[agent_id] = number
        self._cluster.publish("attach", agent=agent_id, seq=number)

    async def _detached(self, agent_id: str, session: ClientSession) -> None:
        if agent_id not in self._registry.attached:
            self._numbers.pop(agent_id, None)
        try:
            await self._cluster.store.detach(agent_id, session.id)
        except StoreUnavailable as e:  # the row goes with this core's lease at the latest
            log.warning("cluster: detaching %s not recorded: %s", agent_id, e)

    def _attached_elsewhere(self, message: Message) -> None:
        agent_id, number = str(message.get("agent", "")), int(message.get("seq", 0))
        if not from_elsewhere(self._cluster, message) or agent_id not in self._registry.attached:
            return
        if self._numbers.get(agent_id, 0) < number:
            self._numbers.pop(agent_id, None)
            self._background.spawn(self._registry.release(agent_id))
