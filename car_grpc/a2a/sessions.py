"""The non-streaming A2A methods inside a session (docs/protocol.md §7b): `SendMessage`,
`GetTask`, `ListTasks`, `CancelTask`, `GetExtendedAgentCard`, the push-notification config
methods, and their v0.3 names (`message/send`, `tasks/get`, ...).

The session is the A2A caller (`session:<session id>`), so a task it sends is seen only
by that session, through the agent it was sent to; the agent is the params' `tenant`, as
on gRPC. The call is served by the same a2a-sdk JSON-RPC dispatcher and request handler
as the A2A HTTP listener (server.py), handed the request as the listener would be: the
A2A protocol is not written twice here, only carried. A2A's own error codes (-32001
TaskNotFound ... -32009) mean other things on the session (-32001 is auth required), so
they are answered as -32602 (TaskNotFound) or -32603, the A2A error in `data.a2a`.
"""

from __future__ import annotations

import json
from typing import Any

from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from starlette.requests import Request
from starlette.types import Message as AsgiMessage

from car_grpc.a2a.server import A2aServer
from car_grpc.core.router import handles
from car_grpc.core.session import ClientSession
from car_grpc.v1 import a2ui_pb2
from car_grpc.wire import codec
from car_grpc.wire.errors import (
    INTERNAL,
    INVALID_PARAMS,
    INVALID_REQUEST,
    CarError,
    failed_precondition,
    field_error,
    not_found,
)

#: A2A's TaskNotFound code; the other A2A-specific codes are -32002 ... -32099.
A2A_TASK_NOT_FOUND = -32001
#: JSON-RPC's own codes, which mean the same on the session.
_JSON_RPC_CODES = frozenset({INVALID_PARAMS, INTERNAL})


def session_caller(session: ClientSession) -> str:
    """The A2A caller a session is: its tasks are its own."""
    return f"session:{session.id}"


def _served(member: str, method: str) -> Any:
    @handles(member)
    async def serve(
        self: A2aSessions, session: ClientSession, req: a2ui_pb2.A2aSessionRequest
    ) -> a2ui_pb2.A2aSessionResponse:
        return await self.call(session, method, req)

    return serve


class A2aSessions:
    """The A2A methods of the session; `server` is None when A2A is off (--no-a2a)."""

    def __init__(self) -> None:
        self.server: A2aServer | None = None
        self._dispatcher: JsonRpcDispatcher | None = None
        #: Sessions whose finished tasks go when they close (nobody can read them then).
        self._callers: set[str] = set()

    send_message = _served("a2a_send_message", "SendMessage")
    get_task = _served("a2a_get_task", "GetTask")
    list_tasks = _served("a2a_list_tasks", "ListTasks")
    cancel_task = _served("a2a_cancel_task", "CancelTask")
    get_extended_agent_card = _served("a2a_get_extended_agent_card", "GetExtendedAgentCard")
    create_push_config = _served("a2a_create_push_config", "CreateTaskPushNotificationConfig")
    get_push_config = _served("a2a_get_push_config", "GetTaskPushNotificationConfig")
    list_push_configs = _served("a2a_list_push_configs", "ListTaskPushNotificationConfigs")
    delete_push_config = _served("a2a_delete_push_config", "DeleteTaskPushNotificationConfig")
    v03_message_send = _served("a2a_v03_message_send", "message/send")
    v03_tasks_get = _served("a2a_v03_tasks_get", "tasks/get")
    v03_tasks_cancel = _served("a2a_v03_tasks_cancel", "tasks/cancel")
    v03_get_extended_card = _served(
        "a2a_v03_get_extended_card", "agent/getAuthenticatedExtendedCard"
    )
    v03_push_config_set = _served("a2a_v03_push_config_set", "tasks/pushNotificationConfig/set")
    v03_push_config_get = _served("a2a_v03_push_config_get", "tasks/pushNotificationConfig/get")
    v03_push_config_list = _served("a2a_v03_push_config_list", "tasks/pushNotificationConfig/list")
    v03_push_config_delete = _served(
        "a2a_v03_push_config_delete", "tasks/pushNotificationConfig/delete"
    )

    async def call(
        self, session: ClientSession, method: str, req: a2ui_pb2.A2aSessionRequest
    ) -> a2ui_pb2.A2aSessionResponse:
        server = self.server
        if server is None:
            raise failed_precondition(INTERNAL, f"{method}: A2A is off on this server (--no-a2a)")
        if not req.tenant:
            raise field_error("tenant", "name the attached agent (its agent_id)")
        if self._dispatcher is None:
            self._dispatcher = server.json_rpc_dispatcher()
        caller = session_caller(session)
        if caller not in self._callers:
            self._callers.add(caller)
            session.on_close(self._forget)
        params = codec.struct_to_json(req.params)
        v1 = "/" not in method
        if v1:
            params["tenant"] = req.tenant
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        headers = [(b"content-type", b"application/json")]
        if v1:  # v0.3 is what a request without the header is
            headers.append((VERSION_HEADER.lower().encode(), PROTOCOL_VERSION_CURRENT.encode()))
        request = Request(
            {
                "type": "http",
                "method": "POST",
                "path": f"/a2a/{req.tenant}",
                "query_string": b"",
                "headers": headers,
                "path_params": {"agent_id": req.tenant},
                "state": {"a2a_caller": caller},
            },
            _body(body.encode()),
        )
        response = await self._dispatcher.handle_requests(request)
        answer = json.loads(bytes(response.body))
        if "error" in answer:
            raise _session_error(method, answer["error"])
        return a2ui_pb2.A2aSessionResponse(result=codec.to_value(answer.get("result")))

    async def _forget(self, session: ClientSession) -> None:
        caller = session_caller(session)
        self._callers.discard(caller)
        if self.server is not None:
            await self.server.tasks.forget_finished(caller)


def _body(body: bytes) -> Any:
    async def receive() -> AsgiMessage:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _session_error(method: str, error: dict[str, Any]) -> CarError:
    code, message = int(error.get("code", INTERNAL)), str(error.get("message", ""))
    if code == INVALID_REQUEST:  # the session's frame was valid: the params were not
        return CarError(INVALID_PARAMS, f"invalid params: {method}: {message}")
    if code in _JSON_RPC_CODES:
        return CarError(code, message)
    data = codec.to_value({"a2a": error})
    if code == A2A_TASK_NOT_FOUND:
        found = not_found(INVALID_PARAMS, f"{method}: {message}")
    else:
        found = failed_precondition(INTERNAL, f"{method}: {message}")
    found.data = data
    return found
