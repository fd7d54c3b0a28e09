"""What the core needs from durable state: one repository Protocol per persistent concept.

The core is typed against these Protocols only; car_grpc.store.sqlite implements them on
the embedded database, and a PostgreSQL store implements the same contract:

- Every method is a coroutine and atomic: it takes effect whole or not at all.
- A write returns only once committed and durable ("acknowledged after commit"). Concurrent
  writes may share one transaction (group commit, as the SQLite store does), but each
  still fails alone: a write that raises leaves nothing, and fails none of the others.
- A read sees every write that returned before it was called, and one consistent state.
- No method hands out a connection or takes a callback: values in, values out (protobuf
  messages as the API defines them, or the frozen rows below).
- Concurrent calls are not ordered among themselves: a domain that needs an order (the
  goals of chats) serializes its own calls.
- A call that contradicts the stored state (a duplicate key, a run not at the record the
  caller thinks) raises StoreConflict, never a driver's exception.
- A call the store could not carry out in time (a database server that went away, is
  restarting or does not answer) raises StoreUnavailable, within the store's timeout:
  none waits forever. A read or a write that failed before its commit left nothing; one
  that failed at its commit may or may not have taken effect. Later calls work again
  once the store is back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from car_grpc.v1 import a2ui_pb2, chats_pb2, host_pb2, runs_pb2, voice_pb2


class StoreConflict(RuntimeError):
    """A write did not match the stored state: a bug of the caller, which serializes its
    writes and never reuses a key."""


class StoreRefused(ValueError):
    """A value the store cannot keep (PostgreSQL's text holds no NUL character): the
    request's fault, answered with -32602 (INVALID_ARGUMENT on typed RPCs)."""


class StoreUnavailable(RuntimeError):
    """The store could not be reached, or did not answer within its timeout. The core
    answers the request with -32603 (UNAVAILABLE on typed RPCs); retrying later may work."""


# ---------------------------------------------------------------- agent tokens


@dataclass(frozen=True)
class AgentTokenRow:
    """An agent that has a token (the digest stays in the store)."""

    agent_id: str
    #: Unix ms: when its current token was minted.
    created_at: int


class AgentTokenStore(Protocol):
    """Per-agent token digests (car_grpc.core.tokens hashes and compares; no token is stored)."""

    async def put(self, agent_id: str, digest: bytes, created_at: int) -> None:
        """Set the agent's digest, replacing any earlier one."""

    async def digest(self, agent_id: str) -> bytes | None:
        """The agent's current digest, None when it has no token."""

    async def remove(self, agent_id: str) -> bool:
        """Forget the agent's token; whether it had one."""

    async def list_all(self) -> list[AgentTokenRow]:
        """Every agent with a token, sorted by agent_id."""


# ---------------------------------------------------------------- approvals


class ApprovalStore(Protocol):
    """The approval ledger: one car.v1.HostApproval per id, pending until resolved once."""

    async def insert(self, approval: host_pb2.HostApproval) -> None:
        """Add a new (pending) approval; StoreConflict when its id is taken."""

    async def get(self, approval_id: str) -> host_pb2.HostApproval | None: ...

    async def finish(
        self, resolved: host_pb2.HostApproval
    ) -> tuple[host_pb2.HostApproval | None, bool]:
        """Write `resolved` over its row if the row is still pending.

        Returns the row as it now stands (None for an unknown id) and whether this call
        resolved it: of two racing resolutions exactly one wins, the other sees its row.
        """

    async def finish_all(self, resolved: Sequence[host_pb2.HostApproval]) -> int:
        """`finish` each of `resolved`, all in one transaction; how many this call resolved."""

    async def pending(self) -> list[host_pb2.HostApproval]:
        """Pending approvals, oldest first (by created_at, then by insertion)."""

    async def history(self, limit: int) -> list[host_pb2.HostApproval]:
        """Up to `limit` resolved approvals, the most recently resolved first (ties: the
        later inserted first)."""


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunRow:
    """A run without its records."""

    run_id: str
    agent_id: str
    intent: str
    outcome_description: str | None
    started_at: int
    ended_at: int | None
    status: runs_pb2.RunStatus.ValueType
    turn_count: int
    #: Records stored so far (started + turns + ended): the seq of the next one.
    record_count: int

    def summary(self) -> runs_pb2.RunSummary:
        out = runs_pb2.RunSummary(
            run_id=self.run_id,
            agent_id=self.agent_id,
            intent=self.intent,
            started_at=self.started_at,
            status=self.status,
            turn_count=self.turn_count,
        )
        if self.ended_at is not None:
            out.ended_at = self.ended_at
        return out


@dataclass(frozen=True)
class RunAgentRow:
    """An agent that has runs, and how many."""

    agent_id: str
    runs: int
    in_progress: int
    #: Unix ms: when its newest run started.
    last_started_at: int


class RunStore(Protocol):
    """Runs and their ordered records (docs/protocol.md §4).

    A run's records are numbered from 0 (`started`), then its turns, then `ended`. Every
    write also moves the run's counters in the same transaction, so the row always agrees
    with its records; a write that does not start at the run's `record_count` is refused
    with StoreConflict (the domain serializes the writes of a run).
    """

    async def create(self, row: RunRow, started: runs_pb2.RunRecord) -> None:
        """Store a new run (record_count 1) and its record 0; StoreConflict if it exists."""

    async def append(self, run_id: str, first_seq: int, turns: Sequence[bytes]) -> None:
        """Add turn records, serialized RunRecords (the core puts them together from the
        turns' bytes: runs.turn_records), from seq `first_seq` (the run's record_count)."""

    async def end(
        self,
        run_id: str,
        seq: int,
        ended: runs_pb2.RunRecord,
        status: runs_pb2.RunStatus.ValueType,
    ) -> None:
        """Add the `ended` record at `seq` and give the run its final status and end time."""

    async def get(self, run_id: str) -> RunRow | None: ...

    async def list_for_agent(self, agent_id: str) -> list[RunRow]:
        """The agent's runs, newest first (ties: the later created first)."""

    async def agents(self, limit: int) -> list[RunAgentRow]:
        """Up to `limit` agents with runs, the one whose newest run started last first
        (ties: by agent_id)."""

    async def records(self, run_id: str, start: int, limit: int) -> list[runs_pb2.RunRecord]:
        """Up to `limit` records of the run from seq `start`, in order."""

    async def abandon_open(self, ended: runs_pb2.RunRecord) -> list[str]:
        """End every run still in progress (left by a process that died) with `ended`;
        their ids. Called once at start-up, before anything is served."""


# ---------------------------------------------------------------- goals


class GoalStore(Protocol):
    """Standing goals of chat sessions, keyed by session_id (docs/protocol.md §5).

    Each goal has an owner: the principal that set it (`ClientSession.principal`). Calls
    with an `owner` see and change only that owner's goals (another's is as absent); with
    None, every goal. Writes stamp `updated_at` with the store's clock. Updating an unknown
    session's goal does nothing: a goal cleared while its chat ran stays cleared.
    """

    async def put(
        self, session_id: str, check: str, max_iterations: int, owner: str, *, any_owner: bool
    ) -> chats_pb2.StoredGoal | None:
        """Set (or replace) the goal: active, no evaluation yet, owned by `owner`. Returns it
        as stored, or None when another owner's goal holds the session_id (which
        `any_owner` replaces, its owner kept)."""

    async def get(
        self, session_id: str, owner: str | None = None
    ) -> chats_pb2.StoredGoal | None: ...

    async def list_all(self, owner: str | None = None) -> list[chats_pb2.StoredGoal]:
        """Every goal (of `owner`), sorted by session_id."""

    async def clear(self, session_id: str, owner: str | None = None) -> bool:
        """Remove the goal; whether there was one."""

    async def clear_all(self, owner: str | None = None) -> int:
        """Remove every goal (of `owner`); how many there were."""

    async def set_status(
        self,
        session_id: str,
        status: chats_pb2.GoalStatus.ValueType,
        terminal_kind: str | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        """Move the goal to `status`; `terminal_kind` is recorded when given, else kept.
        With `owner`, only that owner's goal (a chat moves the goal of its host's scope,
        not one another caller set on the session_id meanwhile)."""

    async def record_evaluation(
        self,
        session_id: str,
        event: chats_pb2.ChatEvent,
        status: chats_pb2.GoalStatus.ValueType,
        *,
        owner: str | None = None,
    ) -> None:
        """Record a goal_evaluated event's iteration, met, grounded and reason (an absent
        field clears the stored one) and the status (of `owner`'s goal, as set_status)."""

    async def reset_running(self) -> int:
        """After a restart no chat runs any goal: `running` goals become `active`; how many."""


# ---------------------------------------------------------------- meetings


class MeetingStore(Protocol):
    """Meetings (one car.v1.Meeting each) and their transcripts, numbered from 0."""

    async def get(self, meeting_id: str) -> voice_pb2.Meeting | None: ...

    async def put(self, meeting: voice_pb2.Meeting) -> None:
        """Insert or replace the meeting (its transcript is untouched; a replaced
        meeting keeps the start it was first stored with for `recent`)."""

    async def delete(self, meeting_id: str) -> None:
        """Remove the meeting and its transcript (a start that failed)."""

    async def append_segment(
        self, meeting_id: str, segment: voice_pb2.TranscriptSegment, limit: int
    ) -> int | None:
        """Add `segment` at the end of the transcript, stored with `index` set to its
        number (the meeting's segment_count moves with it); that index. None when the
        meeting is unknown or already has `limit` segments: the meeting is then marked
        truncated."""

    async def transcript(
        self, meeting_id: str
    ) -> tuple[voice_pb2.Meeting, list[voice_pb2.TranscriptSegment]] | None:
        """The meeting and its segments in order, read together; None when unknown."""

    async def recent(self, limit: int) -> list[voice_pb2.Meeting]:
        """Up to `limit` meetings by first start, newest first (ties: the later stored first)."""

    async def finish(
        self,
        meeting_id: str,
        status: voice_pb2.MeetingStatus.ValueType,
        at: int,
        reason: str | None,
    ) -> voice_pb2.Meeting | None:
        """Mark the meeting no longer live: `status`, ended at `at`, with `reason` (None
        clears it). The meeting as stored, None when unknown."""

    async def interrupt_live(self, at: int, reason: str) -> int:
        """Mark every meeting still live (left so by a previous process) interrupted;
        how many."""


# ---------------------------------------------------------------- A2UI surfaces and A2A peers


@dataclass(frozen=True)
class SurfaceRow:
    """A stored A2UI surface: the surface, whose limit it counts against (`owner_key`) and
    its route credential, sealed (car_grpc.core.route_auth), or None."""

    surface: a2ui_pb2.A2uiSurface
    owner_key: str
    route: bytes | None


class A2uiStore(Protocol):
    """A2UI surfaces (alive while `expires_at` is in the future) and the registry of
    remote A2A peers."""

    async def put_surface(self, row: SurfaceRow) -> None:
        """Insert or replace the surface with its id (its route credential with it)."""

    async def get_surface(self, surface_id: str, now: int) -> SurfaceRow | None:
        """The surface, None when unknown or expired at `now`."""

    async def live_surfaces(self, now: int) -> list[SurfaceRow]:
        """Every surface not expired at `now`, oldest first."""

    async def count_surfaces(self, now: int, owner_key: str) -> tuple[int, int]:
        """(surfaces of `owner_key`, surfaces in all), of those not expired at `now`."""

    async def delete_surface(self, surface_id: str) -> bool:
        """Remove the surface and its credential; whether there was one."""

    async def write_surfaces(self, put: Sequence[SurfaceRow], delete: Sequence[str]) -> None:
        """Insert or replace the surfaces of `put` and remove those of `delete`, all in one
        transaction (a batch of A2UI messages lands whole or not at all)."""

    async def reap(self, now: int) -> list[str]:
        """Remove every surface expired at `now` (credentials with them); their ids."""

    async def add_peer(self, peer: a2ui_pb2.A2aPeer) -> bool:
        """Add a peer; False when its slug or its url is already there."""

    async def peers(self) -> list[a2ui_pb2.A2aPeer]:
        """Every peer, in the order they were added."""

    async def remove_peer(self, slug: str) -> bool:
        """Remove the peer; whether there was one."""


# ---------------------------------------------------------------- a cluster of cores


@dataclass(frozen=True)
class CoreRow:
    """A member of the cluster as the store has it."""

    core_id: str
    #: host:port its peers dial (its gRPC listener unless told otherwise).
    advertise: str
    #: Unix ms.
    joined_at: int
    #: Its lease has not expired.
    alive: bool
    #: What it last said of itself with its lease (JSON: sessions, agents, ...).
    stats: str
    #: SHA-256 digests of its daemon and host tokens (empty with auth off).
    tokens: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Released:
    """What a core held when it was released (its lease expired, or it rejoined)."""

    core_id: str
    #: Runs it left open, now ended with the given record.
    runs: list[str]
    #: Approvals it left pending, now expired.
    approvals: list[host_pb2.HostApproval]
    #: Agents that were attached on it.
    agents: list[str]


class ClusterStore(Protocol):
    """Membership of several cores sharing one database (PostgreSQL only), where each
    agent is attached, and a notification channel between the cores.

    A core joins under `core_id` (the store's own) with an expiring lease; its runs and
    approvals are stamped with that id when created. `release_expired` is how a
    surviving core takes over from a dead one: atomically, so exactly one core does it."""

    @property
    def core_id(self) -> str: ...

    async def join(
        self,
        advertise: str,
        incarnation: str,
        lease: float,
        ended: runs_pb2.RunRecord,
        expire: Callable[[host_pb2.HostApproval], host_pb2.HostApproval],
        tokens: Sequence[bytes] = (),
    ) -> tuple[float, Released | None]:
        """Register (or re-register) this core with a lease of `lease` seconds (and the
        digests of its daemon and host tokens, which the other cores accept), releasing
        what an earlier life of the same id left. When another incarnation still holds an
        unexpired lease under this id: (seconds until it expires, None), nothing done."""

    async def renew(self, incarnation: str, lease: float, stats: str) -> bool:
        """Extend the lease; False when this incarnation no longer holds it."""

    async def leave(
        self,
        incarnation: str,
        ended: runs_pb2.RunRecord,
        expire: Callable[[host_pb2.HostApproval], host_pb2.HostApproval],
    ) -> None:
        """Give up the lease (a clean stop), releasing what this core still holds (its
        domains ended what they could; `running` goals, say, go back to `active`)."""

    async def release_expired(
        self,
        ended: runs_pb2.RunRecord,
        expire: Callable[[host_pb2.HostApproval], host_pb2.HostApproval],
    ) -> list[Released]:
        """Remove every core whose lease expired and release what it held: open runs end
        with `ended`, pending approvals become `expire(approval)`, attachments go."""

    async def members(self) -> list[CoreRow]:
        """Every registered core, by id."""

    async def attach(self, agent_id: str, session_id: str) -> int:
        """Record that `agent_id` is attached here as `session_id`; a number that orders
        attachments of the same agent across cores (the newer wins)."""

    async def detach(self, agent_id: str, session_id: str) -> None:
        """Forget the attachment if it is still this core's `session_id`."""

    async def locate_agent(self, agent_id: str) -> tuple[str, str] | None:
        """(core_id, advertise) of the live core `agent_id` is attached on, or None."""

    async def notify(self, messages: Sequence[str]) -> None:
        """Send `messages` (each at most NOTIFY_MAX bytes) to every core, in order."""

    async def listen(
        self, on_message: Callable[[str], None], on_connected: Callable[[], None]
    ) -> None:
        """Receive every core's messages until cancelled, reconnecting when the connection
        is lost; `on_connected` runs after each (re)connection (messages sent while it was
        down are lost: the caller catches up from the store)."""


#: Longest message `ClusterStore.notify` carries (PostgreSQL's NOTIFY payload < 8000 bytes).
NOTIFY_MAX = 7900


# ---------------------------------------------------------------- the store


# ---------------------------------------------------------------- A2A


@dataclass(frozen=True)
class A2aClientRow:
    """An A2A caller that has a token (the digest stays in the store)."""

    name: str
    #: Unix ms: when its current token was minted.
    created_at: int


class A2aClientStore(Protocol):
    """Bearer token digests of the A2A callers (car_grpc.a2a.callers hashes; no token is
    stored). A token is found by its digest: tokens are 256-bit random, so a lookup by
    SHA-256 digest tells an attacker nothing a guess would not."""

    async def put(self, name: str, digest: bytes, created_at: int) -> None:
        """Set the caller's digest, replacing any earlier one."""

    async def find(self, digest: bytes) -> str | None:
        """The name of the caller whose current token has this digest, None if none."""

    async def remove(self, name: str) -> bool:
        """Forget the caller's token; whether it had one."""

    async def list_all(self) -> list[A2aClientRow]:
        """Every caller with a token, sorted by name."""


@dataclass(frozen=True)
class A2aTaskRow:
    """One A2A task (lf.a2a.v1.Task, serialized: the store knows nothing of A2A) with what
    is looked up and listed by copied out."""

    task_id: str
    #: The attached agent the task is a chat with.
    agent_id: str
    #: The A2A caller (a2a-clients name) the task belongs to.
    caller: str
    context_id: str
    #: lf.a2a.v1.TaskState value.
    state: int
    #: Unix ms of the last write.
    updated_at: int
    task: bytes


class A2aTaskStore(Protocol):
    """A2A tasks, each the record of a chat with an attached agent."""

    async def put(self, row: A2aTaskRow) -> None:
        """Insert or replace the task `row.task_id`. StoreConflict when a task of that id
        belongs to another agent or caller."""

    async def get(self, task_id: str) -> A2aTaskRow | None: ...

    async def page(
        self,
        agent_id: str,
        caller: str,
        *,
        context_id: str | None,
        state: int | None,
        limit: int,
        offset: int,
    ) -> tuple[list[A2aTaskRow], int]:
        """A page of the caller's tasks with the agent (newest first: updated_at, then
        task_id, descending), and how many match in all."""

    async def delete(self, task_id: str) -> bool: ...

    async def prune(self, caller: str, keep: int, terminal: Sequence[int]) -> int:
        """Delete the caller's oldest tasks in a `terminal` state beyond its newest `keep`
        tasks; how many were deleted."""

    async def in_states(self, states: Sequence[int]) -> list[A2aTaskRow]:
        """Every task in one of `states` (at start: the tasks a stop left unfinished); on a
        store shared by a cluster, only this core's and those of no core."""


class Store(Protocol):
    """An open store: its repositories, its size, and closing it.

    Built where the store is chosen (car_grpc.store.open_store); the core holds it only
    to hand each domain its repository.
    """

    @property
    def agent_tokens(self) -> AgentTokenStore: ...

    @property
    def approvals(self) -> ApprovalStore: ...

    @property
    def runs(self) -> RunStore: ...

    @property
    def goals(self) -> GoalStore: ...

    @property
    def meetings(self) -> MeetingStore: ...

    @property
    def a2a_clients(self) -> A2aClientStore: ...

    @property
    def a2a_tasks(self) -> A2aTaskStore: ...

    @property
    def a2ui(self) -> A2uiStore: ...

    @property
    def cluster(self) -> ClusterStore | None:
        """Membership of several cores on this store; None for a store of one core."""

    async def size_bytes(self) -> int:
        """What the store occupies on disk, in bytes (for status and metrics)."""

    async def close(self) -> None:
        """Wait for what is under way, then release the store; no call may follow."""
