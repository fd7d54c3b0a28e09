"""The proposal executor (docs/protocol.md §3): pure logic, no sockets.

`plan` validates a proposal and works out its ordering: an action runs after the actions
that write the state keys in its `state_dependencies`, after every action whose output it
references as `$<id>.output`, and after the ids in its `dependencies`. A bad field, an
unknown reference or a cycle is -32602 before anything runs.

`execute` runs a plan against a session's key-value state: independent actions run
concurrently, `$<id>.output` references are replaced by the outputs, policies reject
actions (`rejected`), preconditions must hold, and failure_behavior decides what a failure
does (abort: later actions skipped, state rolled back, earlier successes marked
rolled_back; retry: backoff from `retry_backoff` doubling, then abort; skip: continue).
An action whose dependency did not succeed is skipped. A policy rejection is not a
failure: it does not abort the proposal.

Tool calls go through an injected `CallTool`, so the executor is tested without a client.
A tool call being given up is signalled by cancelling its task with a reason (`timeout`,
`proposal aborted`, `proposal cancelled`) that the binding forwards as `tools.cancel`
(`cancel_reason`: a cancellation without one of them is `proposal cancelled`: an action
that runs alone runs in the request's own task, which its deadline cancels as it is).

`lone_call` and `run_lone` are `execute` for a proposal that is one tool call with
nothing to order, check, retry or time out: the same result, without the plan and run
built for it (the common proposal; the caller picks the path).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf import struct_pb2

from car_grpc.clock import now_ms
from car_grpc.core.kv import KeyValueState
from car_grpc.v1 import state_pb2, tools_pb2
from car_grpc.wire.codec import json_to_value, struct_to_json, value_to_json
from car_grpc.wire.errors import CarError, field_error

JSON = Any


#: Retries of failure_behavior retry when the action does not say.
DEFAULT_MAX_RETRIES = 3
#: How long a cancelled action may take to wind down before it is left behind.
CANCEL_WAIT = 5.0

#: Reasons a tool call is given up: the message of the CancelledError its task sees.
CANCEL_TIMEOUT = "timeout"
CANCEL_ABORTED = "proposal aborted"
CANCEL_CANCELLED = "proposal cancelled"

_REFERENCE = re.compile(r"\$(.+)\.output")


def cancel_reason(error: asyncio.CancelledError) -> str:
    """Why a tool call was given up, from the cancellation its binding sees: one of the
    reasons above, else CANCEL_CANCELLED (the request itself was cancelled: its handler
    deadline, its RPC, its stream)."""
    reason = error.args[0] if error.args else None
    if reason in (CANCEL_TIMEOUT, CANCEL_ABORTED):
        return str(reason)
    return CANCEL_CANCELLED


def timed_out(tool: str, seconds: float) -> str:
    """The error of a tool call that got no answer in time."""
    return f"tool '{tool}' callback timed out ({seconds:g}s)"


class ToolInvocation(NamedTuple):
    """One tool call of one attempt of an action (a NamedTuple: as immutable as a frozen
    dataclass, built in a third of its time, once a call)."""

    action_id: str
    tool: str
    parameters: dict[str, JSON]
    timeout_ms: int | None
    attempt: int  # 1-based


class ToolFailed(Exception):
    """The tool call failed. `terminal`: do not retry; abort the proposal and halt."""

    def __init__(self, message: str, *, terminal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.terminal = terminal


#: Runs one tool call and returns its output (any JSON); raises ToolFailed.
CallTool = Callable[[ToolInvocation], Awaitable[JSON]]


# ------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Plan:
    """A validated proposal: its actions in submission order and what each waits for."""

    proposal_id: str
    actions: list[tools_pb2.Action]
    #: action id -> ids of the actions that must finish before it starts.
    deps: dict[str, frozenset[str]]


def plan(proposal: tools_pb2.ActionProposal) -> Plan:
    """Validate `proposal` and order its actions; CarError -32602 naming the field."""
    actions = list(proposal.actions)
    ids: dict[str, int] = {}
    for i, action in enumerate(actions):
        path = f"proposal.actions[{i}]"
        if not action.id:
            raise field_error(f"{path}.id")
        if action.id in ids:
            raise field_error(f"{path}.id", f"duplicate action id '{action.id}'")
        ids[action.id] = i
        _validate_action(action, path)

    writers: dict[str, set[str]] = {}
    for action in actions:
        if action.type == tools_pb2.ACTION_TYPE_STATE_WRITE:
            writers.setdefault(action.parameters.fields["key"].string_value, set()).add(action.id)

    deps: dict[str, frozenset[str]] = {}
    for i, action in enumerate(actions):
        path = f"proposal.actions[{i}]"
        wanted: set[str] = set()
        for key in action.state_dependencies:
            wanted |= writers.get(key, set()) - {action.id}
        for ref, ref_path in _references(action.parameters, f"{path}.parameters"):
            if ref not in ids:
                raise field_error(ref_path, f"reference to unknown action '{ref}'")
            wanted.add(ref)
        for j, dep in enumerate(action.dependencies):
            if dep not in ids:
                raise field_error(f"{path}.dependencies[{j}]", f"unknown action '{dep}'")
            wanted.add(dep)
        deps[action.id] = frozenset(wanted)

    if cycle := _find_cycle([a.id for a in actions], deps):
        raise field_error("proposal.actions", "dependency cycle " + " -> ".join(cycle))
    return Plan(proposal_id(proposal), actions, deps)


def proposal_id(proposal: tools_pb2.ActionProposal) -> str:
    """The proposal's own id, else a fresh one."""
    return proposal.id if proposal.HasField("id") and proposal.id else _fresh_id()


#: A fresh proposal id is this process's random prefix and a count: unique within the process
#: and, by the prefix's 64 random bits, beside any other. It is a label (echoed in the result
#: and to tool hosts), never a key nor a secret, so it need not be unguessable: no getrandom
#: call per proposal. A forked child draws a prefix of its own.
_id_prefix = ""
_ids = itertools.count()


def _new_prefix() -> None:
    global _id_prefix
    _id_prefix = "proposal-" + os.urandom(8).hex()


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def _fresh_id() -> str:
    return f"{_id_prefix}{next(_ids):016x}"


def _validate_action(action: tools_pb2.Action, path: str) -> None:
    kind = action.type
    if kind == tools_pb2.ACTION_TYPE_UNSPECIFIED:
        raise field_error(f"{path}.type")
    if kind == tools_pb2.ACTION_TYPE_TOOL_CALL and not action.tool:
        raise field_error(f"{path}.tool")
    if kind in (tools_pb2.ACTION_TYPE_STATE_WRITE, tools_pb2.ACTION_TYPE_STATE_READ):
        key = action.parameters.fields.get("key")
        if key is None:
            raise field_error(f"{path}.parameters.key")
        if key.WhichOneof("kind") != "string_value" or not key.string_value:
            raise field_error(f"{path}.parameters.key", "expected a non-empty string")
    for j, pre in enumerate(action.preconditions):
        if not pre.key:
            raise field_error(f"{path}.preconditions[{j}].key")
        if pre.operator == tools_pb2.PRECONDITION_OPERATOR_UNSPECIFIED:
            raise field_error(f"{path}.preconditions[{j}].operator")


def _references(struct: struct_pb2.Struct, path: str) -> Iterable[tuple[str, str]]:
    """(action id, field path) of every `$<id>.output` string in `struct`."""
    for key, value in struct.fields.items():
        yield from _value_references(value, f"{path}.{key}")


def _value_references(value: struct_pb2.Value, path: str) -> Iterable[tuple[str, str]]:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if match := _REFERENCE.fullmatch(value.string_value):
            yield match.group(1), path
    elif kind == "struct_value":
        yield from _references(value.struct_value, path)
    elif kind == "list_value":
        for i, item in enumerate(value.list_value.values):
            yield from _value_references(item, f"{path}[{i}]")


def _find_cycle(order: list[str], deps: Mapping[str, frozenset[str]]) -> list[str] | None:
    """A dependency cycle as a path `a, b, ..., a`, or None (iterative DFS)."""
    if not any(deps.values()):
        return None  # no edge at all (most proposals)
    done: set[str] = set()
    for root in order:
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, list[str]]] = [(root, sorted(deps[root]))]
        path.append(root)
        on_path.add(root)
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(deps[nxt])))
                path.append(nxt)
                on_path.add(nxt)
    return None


def substitute(data: JSON, outputs: Mapping[str, JSON]) -> JSON:
    """`data` with every `$<id>.output` string replaced by that action's output."""
    if isinstance(data, str):
        match = _REFERENCE.fullmatch(data)
        if match and match.group(1) in outputs:
            return outputs[match.group(1)]
        return data
    if isinstance(data, dict):
        return {k: substitute(v, outputs) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute(v, outputs) for v in data]
    return data


# ------------------------------------------------------------------ policies, preconditions


def policy_denial(
    policy: state_pb2.PolicyDefinition,
    action: tools_pb2.Action,
    parameters: Mapping[str, JSON],
    state: Mapping[str, JSON],
) -> str | None:
    """Why `policy` rejects `action` (with its final parameters), or None."""
    kind = policy.kind or policy.rule
    targeted = action.type == tools_pb2.ACTION_TYPE_TOOL_CALL and action.tool == policy.target
    if kind == state_pb2.POLICY_KIND_DENY_TOOL and targeted:
        return f"denied by policy '{policy.name}': tool '{action.tool}' is not allowed"
    if (
        kind == state_pb2.POLICY_KIND_DENY_TOOL_PARAM
        and targeted
        and policy.key in parameters
        and policy.pattern in _as_text(parameters[policy.key])
    ):
        return (
            f"denied by policy '{policy.name}': parameter '{policy.key}' "
            f"of tool '{action.tool}' contains '{policy.pattern}'"
        )
    if kind == state_pb2.POLICY_KIND_REQUIRE_STATE and policy.target not in state:
        return f"denied by policy '{policy.name}': state key '{policy.target}' is required"
    return None


def _as_text(value: JSON) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def json_equal(a: JSON, b: JSON) -> bool:
    """Equality of JSON values: true is not 1, 1 is 1.0, containers compare deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _ordered(a: JSON, b: JSON) -> bool:
    """Whether a and b can be ordered: both numbers or both strings."""
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    return numbers or (isinstance(a, str) and isinstance(b, str))


def precondition_holds(pre: tools_pb2.Precondition, state: Mapping[str, JSON]) -> bool:
    """Whether `pre` holds for `state`. Comparisons with an absent key do not hold,
    except `neq` and `not_exists`; gt/lt/gte/lte need two numbers or two strings."""
    op = pre.operator
    present = pre.key in state
    if op == tools_pb2.PRECONDITION_OPERATOR_EXISTS:
        return present
    if op == tools_pb2.PRECONDITION_OPERATOR_NOT_EXISTS:
        return not present
    expected = value_to_json(pre.value)
    if op == tools_pb2.PRECONDITION_OPERATOR_NEQ:
        return not present or not json_equal(state[pre.key], expected)
    if not present:
        return False
    actual = state[pre.key]
    if op == tools_pb2.PRECONDITION_OPERATOR_EQ:
        return json_equal(actual, expected)
    if op == tools_pb2.PRECONDITION_OPERATOR_CONTAINS:
        if isinstance(actual, str) and isinstance(expected, str):
            return expected in actual
        if isinstance(actual, list):
            return any(json_equal(item, expected) for item in actual)
        return False
    if not _ordered(actual, expected):
        return False
    if op == tools_pb2.PRECONDITION_OPERATOR_GT:
        return bool(actual > expected)
    if op == tools_pb2.PRECONDITION_OPERATOR_LT:
        return bool(actual < expected)
    if op == tools_pb2.PRECONDITION_OPERATOR_GTE:
        return bool(actual >= expected)
    if op == tools_pb2.PRECONDITION_OPERATOR_LTE:
        return bool(actual <= expected)
    return False


def _describe(pre: tools_pb2.Precondition) -> str:
    op = tools_pb2.PreconditionOperator.Name(pre.operator).removeprefix("PRECONDITION_OPERATOR_")
    shown = "" if not pre.HasField("value") else " " + json.dumps(value_to_json(pre.value))
    return f"{pre.key} {op.lower()}{shown}"


# ------------------------------------------------------------------ execution


class _ActionFailed(Exception):
    def __init__(self, message: str, *, terminal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.terminal = terminal


@dataclass
class _Outcome:
    result: tools_pb2.ActionResult
    aborts: bool = False


def _ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def _write_result(
    result: tools_pb2.ActionResult,
    status: tools_pb2.ActionStatus.ValueType,
    error: str | None,
    output: JSON,
    started: float | None,
) -> None:
    """An action's result written into `result` (its action_id already set); `started`:
    when the action started (its duration), None when it never did."""
    result.status = status
    result.timestamp = now_ms()
    json_to_value(output, result.output)  # written in place: no Value to copy in
    result.state_changes.SetInParent()
    if error is not None:
        result.error = error
    if started is not None:
        result.duration_ms = _ms_since(started)


def _as_failure(error: BaseException, tool: str) -> _ActionFailed | None:
    """What a tool call's exception does to its attempt: the _ActionFailed it fails with,
    or None when it is to propagate (this task is being cancelled, not just the call)."""
    if isinstance(error, _ActionFailed):
        return error
    if isinstance(error, ToolFailed):
        return _ActionFailed(error.message, terminal=error.terminal)
    if isinstance(error, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return None
        return _ActionFailed(f"tool '{tool}' call was cancelled")
    if isinstance(error, Exception):  # a broken binding fails the action, not the proposal
        return _ActionFailed(f"tool '{tool}' call failed: {error}")
    return None


@dataclass
class _Run:
    plan: Plan
    state: MutableMapping[str, JSON]
    policies: list[state_pb2.PolicyDefinition]
    call_tool: CallTool
    retry_backoff: float
    results: dict[str, tools_pb2.ActionResult] = field(default_factory=dict)
    outputs: dict[str, JSON] = field(default_factory=dict)
    #: Before-images of the keys this proposal wrote: key -> (existed, value).
    originals: dict[str, tuple[bool, JSON]] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    cost: tools_pb2.ProposalCost = field(default_factory=tools_pb2.ProposalCost)

    def __post_init__(self) -> None:
        self.by_id = {a.id: a for a in self.plan.actions}
        #: action id -> the actions waiting for it.
        self.dependents: dict[str, list[str]] = {a.id: [] for a in self.plan.actions}
        for action_id, deps in self.plan.deps.items():
            for dep in deps:
                self.dependents[dep].append(action_id)
        #: action id -> how many of its dependencies have not finished yet.
        self.blocked = {action_id: len(deps) for action_id, deps in self.plan.deps.items()}
        #: Actions whose dependencies have all finished, in submission order at first.
        self.ready = deque(a.id for a in self.plan.actions if not self.blocked[a.id])
        #: Action tasks that have finished and not been taken by `run` yet.
        self._done: list[asyncio.Task[_Outcome]] = []
        self._wakeup: asyncio.Future[None] | None = None

    async def run(self) -> tools_pb2.ProposalResult:
        begin = time.monotonic()
        running: dict[asyncio.Task[_Outcome], str] = {}
        abort_reason: str | None = None
        try:
            while abort_reason is None:
                if len(self.ready) == 1 and not running:
                    # Nothing else could run beside it: it runs in this task (no task of
                    # its own to start and wait for: the common one-call proposal, a chain).
                    action_id = self.ready.popleft()
                    if self._may_start(action_id):
                        outcome = await self._run_action(self.by_id[action_id])
                        abort_reason = self._land(action_id, outcome)
                    continue
                self._start_ready(running)
                if not running:
                    break
                for task in await self._landed():
                    aborts = self._land(running.pop(task), task.result())
                    abort_reason = abort_reason or aborts
            if abort_reason is not None:
                await self._cancel(running, CANCEL_ABORTED)
        except asyncio.CancelledError:
            await self._cancel(running, CANCEL_CANCELLED)
            raise
        if abort_reason is not None:
            for action in self.plan.actions:
                if action.id not in self.results:
                    reason = f"proposal aborted: {abort_reason}"
                    self._finish(action.id, self._skipped(action.id, reason))
            self._roll_back()
        result = tools_pb2.ProposalResult(proposal_id=self.plan.proposal_id)
        result.results.extend(self.results[a.id] for a in self.plan.actions)
        self.cost.total_duration_ms = _ms_since(begin)
        result.cost.CopyFrom(self.cost)
        return result

    def _land(self, action_id: str, outcome: _Outcome) -> str | None:
        """Record a finished action; the abort reason when it aborts the proposal."""
        self._finish(action_id, outcome.result)
        return f"action '{action_id}' failed" if outcome.aborts else None

    async def _landed(self) -> list[asyncio.Task[_Outcome]]:
        """The running actions that have finished, waiting for one when none has (one
        wakeup for any of them: no asyncio.wait over every running task each time)."""
        if not self._done:
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        done, self._done = self._done, []
        return done

    def _task_done(self, task: asyncio.Task[_Outcome]) -> None:
        self._done.append(task)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _may_start(self, action_id: str) -> bool:
        """Whether a ready action may start: skipped when a dependency did not succeed."""
        failed = sorted(
            d
            for d in self.plan.deps[action_id]
            if self.results[d].status != tools_pb2.ACTION_STATUS_SUCCEEDED
        )
        if failed:
            reason = f"dependency '{failed[0]}' did not succeed"
            self._finish(action_id, self._skipped(action_id, reason))
            return False
        self.started[action_id] = time.monotonic()
        return True

    def _start_ready(self, running: dict[asyncio.Task[_Outcome], str]) -> None:
        """Start every ready action in a task of its own."""
        while self.ready:
            action_id = self.ready.popleft()
            if self._may_start(action_id):
                task = asyncio.create_task(self._run_action(self.by_id[action_id]))
                task.add_done_callback(self._task_done)
                running[task] = action_id

    def _finish(self, action_id: str, result: tools_pb2.ActionResult) -> None:
        self.results[action_id] = result
        status = result.status
        if status in (tools_pb2.ACTION_STATUS_SUCCEEDED, tools_pb2.ACTION_STATUS_FAILED):
            self.cost.actions_executed += 1
        elif status == tools_pb2.ACTION_STATUS_REJECTED:
            self.cost.actions_rejected += 1
        else:
            self.cost.actions_skipped += 1
        for dependent in self.dependents[action_id]:
            self.blocked[dependent] -= 1
            if not self.blocked[dependent]:
                self.ready.append(dependent)

    async def _cancel(self, running: dict[asyncio.Task[_Outcome], str], reason: str) -> None:
        """Cancel in-flight actions (their tool calls see `reason`); they end skipped."""
        if not running:
            return
        for task in running:
            task.cancel(reason)
        await asyncio.wait(set(running), timeout=CANCEL_WAIT)
        for action_id in running.values():
            self._finish(action_id, self._skipped(action_id, f"cancelled: {reason}"))
        running.clear()

    def _roll_back(self) -> None:
        state = self.state
        for key, (existed, value) in self.originals.items():
            if isinstance(state, KeyValueState):
                state.restore(key, existed, value)  # never refused by the budget
            elif existed:
                state[key] = value
            else:
                state.pop(key, None)
        for result in self.results.values():
            if result.status == tools_pb2.ACTION_STATUS_SUCCEEDED:
                result.rolled_back = True

    def _result(
        self,
        action_id: str,
        status: tools_pb2.ActionStatus.ValueType,
        error: str | None,
        output: JSON = None,
    ) -> tools_pb2.ActionResult:
        result = tools_pb2.ActionResult(action_id=action_id)
        _write_result(result, status, error, output, self.started.get(action_id))
        return result

    def _skipped(self, action_id: str, reason: str) -> tools_pb2.ActionResult:
        return self._result(action_id, tools_pb2.ACTION_STATUS_SKIPPED, reason)

    async def _run_action(self, action: tools_pb2.Action) -> _Outcome:
        parameters = struct_to_json(action.parameters)
        if self.outputs:  # else there is no output to refer to
            parameters = substitute(parameters, self.outputs)
        for policy in self.policies:
            if denial := policy_denial(policy, action, parameters, self.state):
                return _Outcome(self._result(action.id, tools_pb2.ACTION_STATUS_REJECTED, denial))
        behavior = action.failure_behavior
        retries = action.max_retries if action.HasField("max_retries") else DEFAULT_MAX_RETRIES
        attempts = 1 + retries if behavior == tools_pb2.FAILURE_BEHAVIOR_RETRY else 1
        attempt = 0
        while True:
            attempt += 1
            try:
                output, changes = await self._attempt(action, parameters, attempt)
            except _ActionFailed as e:
                if e.terminal or attempt >= attempts:
                    result = self._result(action.id, tools_pb2.ACTION_STATUS_FAILED, e.message)
                    if e.terminal:
                        result.terminal = True
                    aborts = e.terminal or behavior != tools_pb2.FAILURE_BEHAVIOR_SKIP
                    return _Outcome(result, aborts)
                self.cost.retries += 1
                await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1))
                continue
            self.outputs[action.id] = output
            result = self._result(action.id, tools_pb2.ACTION_STATUS_SUCCEEDED, None, output)
            for key, value in changes.items():
                json_to_value(value, result.state_changes.fields[key])
            return _Outcome(result)

    async def _attempt(
        self, action: tools_pb2.Action, parameters: dict[str, JSON], attempt: int
    ) -> tuple[JSON, dict[str, JSON]]:
        """One attempt: (output, state changes), or _ActionFailed."""
        for pre in action.preconditions:
            if not precondition_holds(pre, self.state):
                raise _ActionFailed(f"precondition failed: {_describe(pre)}")
        kind = action.type
        if kind == tools_pb2.ACTION_TYPE_TOOL_CALL:
            return await self._call(action, parameters, attempt), {}
        if kind == tools_pb2.ACTION_TYPE_STATE_WRITE:
            key = parameters.get("key")
            if not isinstance(key, str) or not key:
                raise _ActionFailed("state_write needs a non-empty string parameters.key")
            value = parameters.get("value")
            before = (key in self.state, self.state.get(key))
            try:
                self.state[key] = value  # a session's state refuses writes over budget
            except CarError as e:
                raise _ActionFailed(e.message) from None
            self.originals.setdefault(key, before)
            return None, {key: value}
        if kind == tools_pb2.ACTION_TYPE_STATE_READ:
            key = parameters.get("key")
            if not isinstance(key, str) or not key:
                raise _ActionFailed("state_read needs a non-empty string parameters.key")
            return self.state.get(key), {}
        return None, {}  # assertion: its preconditions held

    async def _call(
        self, action: tools_pb2.Action, parameters: dict[str, JSON], attempt: int
    ) -> JSON:
        """Call the tool, failing the attempt at the action's timeout_ms."""
        timeout_ms = action.timeout_ms if action.HasField("timeout_ms") else None
        invocation = ToolInvocation(action.id, action.tool, parameters, timeout_ms, attempt)
        self.cost.tool_calls += 1
        try:
            if timeout_ms is None:
                # Awaited in place: a cancellation of this task reaches the call with its
                # reason as it is.
                return await self.call_tool(invocation)
            return await self._call_within(invocation, timeout_ms)
        except BaseException as e:
            failure = _as_failure(e, action.tool)
            if failure is None:
                raise
            raise failure from None

    async def _call_within(self, invocation: ToolInvocation, timeout_ms: int) -> JSON:
        """The call in a task of its own, cancelled with CANCEL_TIMEOUT at `timeout_ms`."""
        call = asyncio.ensure_future(self.call_tool(invocation))
        try:
            done, _ = await asyncio.wait({call}, timeout=timeout_ms / 1000)
        except asyncio.CancelledError as e:
            call.cancel(e.args[0] if e.args else CANCEL_CANCELLED)
            await asyncio.wait({call}, timeout=CANCEL_WAIT)
            raise
        if not done:
            call.cancel(CANCEL_TIMEOUT)
            await asyncio.wait({call}, timeout=CANCEL_WAIT)
            raise _ActionFailed(timed_out(invocation.tool, timeout_ms / 1000))
        return call.result()


async def execute(
    plan: Plan,
    *,
    state: MutableMapping[str, JSON],
    policies: Iterable[state_pb2.PolicyDefinition] = (),
    call_tool: CallTool,
    retry_backoff: float = 0.1,
    outputs: dict[str, JSON] | None = None,
) -> tools_pb2.ProposalResult:
    """Run `plan` against `state` (changed in place; rolled back on abort). A write that
    `state` refuses (a session's KeyValueState over its budget) fails the action.
    `outputs`, when given, gets each succeeded action's output (its result's `output`)."""
    run = _Run(plan, state, list(policies), call_tool, retry_backoff)
    if outputs is not None:
        run.outputs = outputs
    return await run.run()


def skipped_result(plan: Plan, reason: str) -> tools_pb2.ProposalResult:
    """A result in which no action ran (e.g. the session is halted)."""
    result = tools_pb2.ProposalResult(proposal_id=plan.proposal_id)
    for action in plan.actions:
        item = result.results.add(
            action_id=action.id,
            status=tools_pb2.ACTION_STATUS_SKIPPED,
            error=reason,
            timestamp=now_ms(),
        )
        item.output.null_value = struct_pb2.NULL_VALUE
        item.state_changes.SetInParent()
    result.cost.actions_skipped = len(plan.actions)
    return result


# ------------------------------------------------------------------ one tool call


def lone_call(proposal: tools_pb2.ActionProposal) -> tools_pb2.Action | None:
    """The action of a proposal that is one tool call with nothing to order, check, retry
    or time out (no preconditions, state_dependencies, dependencies, `$<id>.output`
    reference, retry or timeout_ms; a valid id and tool): `run_lone` runs it. None for
    every other proposal (`plan` and `execute`: they also give every error)."""
    actions = proposal.actions
    if len(actions) != 1:
        return None
    action = actions[0]
    if (
        action.type != tools_pb2.ACTION_TYPE_TOOL_CALL
        or not action.id
        or not action.tool
        or action.preconditions
        or action.state_dependencies
        or action.dependencies
        or action.failure_behavior == tools_pb2.FAILURE_BEHAVIOR_RETRY
        or action.HasField("timeout_ms")
    ):
        return None
    if action.parameters.fields and any(_references(action.parameters, "")):
        return None  # a reference to itself or to no action: plan's error
    return action


async def run_lone(
    action: tools_pb2.Action,
    into: tools_pb2.ProposalResult,
    *,
    state: Mapping[str, JSON],
    policies: Iterable[state_pb2.PolicyDefinition],
    call_tool: CallTool,
    outputs: dict[str, JSON],
) -> None:
    """`execute` of the plan of `lone_call`'s action, its result written into `into`
    (whose proposal_id the caller sets): the same result, outputs and cancellations, but
    no plan, run or ordering built for the one action, which runs in the caller's task as
    `execute` runs a lone action. It writes no state, so there is nothing to roll back;
    its failure (abort or skip) ends the proposal either way."""
    begin = time.monotonic()
    cost = into.cost
    cost.SetInParent()
    parameters = struct_to_json(action.parameters) if action.parameters.fields else {}
    for policy in policies:
        if denial := policy_denial(policy, action, parameters, state):
            item = into.results.add(action_id=action.id)
            _write_result(item, tools_pb2.ACTION_STATUS_REJECTED, denial, None, begin)
            cost.actions_rejected = 1
            cost.total_duration_ms = _ms_since(begin)
            return
    cost.tool_calls = 1
    try:
        output = await call_tool(ToolInvocation(action.id, action.tool, parameters, None, 1))
    except BaseException as e:
        failure = _as_failure(e, action.tool)
        if failure is None:
            raise
        item = into.results.add(action_id=action.id)
        _write_result(item, tools_pb2.ACTION_STATUS_FAILED, failure.message, None, begin)
        if failure.terminal:
            item.terminal = True
    else:
        outputs[action.id] = output
        item = into.results.add(action_id=action.id)
        _write_result(item, tools_pb2.ACTION_STATUS_SUCCEEDED, None, output, begin)
    cost.actions_executed = 1
    cost.total_duration_ms = _ms_since(begin)
