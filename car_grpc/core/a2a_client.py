"""Outbound A2A: one SendMessage to a remote agent, bounded in time and size.

The protocol work is the official a2a-sdk's (its JSON-RPC transport and the `lf.a2a.v1`
types); this module only bounds it: one deadline for the whole call, an answer of at most
`max_response_bytes` (read through a transport that stops reading past it), no redirects
(a redirect could leave the endpoint the caller was allowed to call), and a failure
reported as `A2aCallFailed` with a message that never holds the credential.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from a2a.client import A2AClientError, minimal_agent_card
from a2a.client.transports.jsonrpc import JsonRpcTransport
from a2a.types import a2a_pb2
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, VERSION_HEADER
from google.protobuf import json_format

from car_grpc.core.route_auth import RouteAuth
from car_grpc.wire import codec
from car_grpc.wire.errors import field_error


class A2aCallFailed(Exception):
    """The remote call failed (unreachable, timed out, refused, an answer too large or
    not A2A); the message says how, never with the credential."""


class _BoundedTransport(httpx.AsyncBaseTransport):
    """Reads each response whole, failing once it passes `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._limit = limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        body = bytearray()
        try:
            assert isinstance(response.stream, httpx.AsyncByteStream)
            async for chunk in response.stream:
                body += chunk
                if len(body) > self._limit:
                    raise A2aCallFailed(f"the answer is larger than {self._limit} bytes")
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=bytes(body),
            request=request,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def _v03_part(part: Any) -> Any:
    """A v0.3 part (`{kind: "text", text}`, `{kind: "data", data}`) as a v1.0 one."""
    if isinstance(part, dict) and "kind" in part:
        part = {k: v for k, v in part.items() if k != "kind"}
    return part


def message_from_json(value: codec.JSON, name: str = "message") -> a2a_pb2.Message:
    """An A2A Message from the JSON a caller gives (v1.0 or v0.3 shapes, or a string)."""
    if isinstance(value, str):
        value = {"parts": [{"text": value}]}
    if not isinstance(value, dict):
        raise field_error(name, "expected an A2A message (an object) or a string")
    data = dict(value)
    data.pop("kind", None)
    role = data.get("role", "user")
    if role in ("user", "agent"):
        data["role"] = f"ROLE_{role.upper()}"
    if isinstance(data.get("parts"), list):
        data["parts"] = [_v03_part(p) for p in data["parts"]]
    message = a2a_pb2.Message()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        raise field_error(name, f"not an A2A message ({str(e)[:200]})") from None
    if not message.parts:
        raise field_error(f"{name}.parts", "an A2A message needs at least one part")
    if not message.message_id:
        message.message_id = uuid.uuid4().hex
    return message


class A2aClient:
    """Sends A2A messages: at most `timeout` seconds and `max_response_bytes` each."""

    def __init__(self, *, timeout: float, max_response_bytes: int) -> None:
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes

    async def send(
        self,
        endpoint: str,
        message: a2a_pb2.Message,
        *,
        blocking: bool,
        auth: RouteAuth | None,
    ) -> dict[str, Any]:
        """SendMessage at `endpoint` (its JSON-RPC URL); the answer, as A2A JSON."""
        request = a2a_pb2.SendMessageRequest(
            message=message,
            configuration=a2a_pb2.SendMessageConfiguration(return_immediately=not blocking),
        )
        headers = {VERSION_HEADER: PROTOCOL_VERSION_CURRENT}
        if auth is not None:
            headers |= auth.headers()
        http = httpx.AsyncClient(
            transport=_BoundedTransport(self.max_response_bytes),
            timeout=self.timeout,
            headers=headers,
            follow_redirects=False,
        )
        transport = JsonRpcTransport(http, minimal_agent_card(endpoint), endpoint)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await transport.send_message(request)
        except TimeoutError:
            raise A2aCallFailed(f"no answer within {self.timeout:g} s") from None
        except A2aCallFailed:
            raise
        except (A2AClientError, httpx.HTTPError) as e:
            raise A2aCallFailed(_describe(e)) from None
        except Exception as e:  # an answer the SDK could not read is the remote's fault
            raise A2aCallFailed(f"not an A2A answer: {type(e).__name__}") from None
        finally:
            await http.aclose()
        result: dict[str, Any] = json_format.MessageToDict(answer)
        return result


def _describe(error: Exception) -> str:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, A2aCallFailed):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(error) or type(error).__name__
    return text[:300]


def task_state(answer: dict[str, Any]) -> str | None:
    """The state of the task in a SendMessage answer, e.g. "TASK_STATE_COMPLETED"."""
    task = answer.get("task")
    if isinstance(task, dict) and isinstance(status := task.get("status"), dict):
        state = status.get("state")
        return state if isinstance(state, str) else None
    return None
