"""What every Python client of the car.v1 gRPC API needs besides the generated code
(`car_grpc.v1`, made from proto/ by grpcio-tools): where the server is, the token files it
writes, the call metadata that authenticates a typed RPC, the server's own error (the
`car-error-bin` trailer), and the session stream (SessionService.Connect) with its request
ids matched to their answers.

    from car import channel, metadata
    from car_grpc.v1 import runs_pb2, runs_pb2_grpc

    async with channel() as ch:
        runs = runs_pb2_grpc.RunServiceStub(ch)
        started = await runs.StartRun(
            runs_pb2.StartRunRequest(intent="fix it"), metadata=metadata(token, agent_id="me")
        )
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import NoReturn, TypeAlias

import grpc
from google.protobuf import struct_pb2

from car_grpc.v1 import errors_pb2, session_pb2, session_pb2_grpc

# ------------------------------------------------------------------ configuration


def address() -> str:
    """The server's gRPC address (`car-grpc serve` listens on 127.0.0.1:9102)."""
    return os.environ.get("CAR_GRPC_ADDRESS") or "127.0.0.1:9102"


def token_dir() -> Path:
    """The directory of the token files, as the server writes them (docs/grpc-guide.md)."""
    if home := os.environ.get("CAR_HOME"):
        return Path(home, "ai.parslee.car")
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime, "ai.parslee.car")
    return Path.home() / ".config" / "ai.parslee.car"


def _read_token_file(name: str) -> str:
    try:
        return (token_dir() / name).read_text().strip()
    except OSError:
        return ""


def daemon_token() -> str:
    """CAR_AUTH_TOKEN, else the `auth-token` file. The server writes a new one at every
    start, so read it again after a restart."""
    return os.environ.get("CAR_AUTH_TOKEN") or _read_token_file("auth-token")


def host_token() -> str:
    """The host token (the host role may read every run and chat with every agent):
    CAR_HOST_TOKEN, else the `host-token` file."""
    return os.environ.get("CAR_HOST_TOKEN") or _read_token_file("host-token")


# ------------------------------------------------------------------ typed services

# guide:typed-clients
Metadata: TypeAlias = tuple[tuple[str, str], ...]


def channel() -> grpc.aio.Channel:
    """One HTTP/2 connection for every service: `runs_pb2_grpc.RunServiceStub(channel)`.

    Plaintext (the server listens on loopback unless it was given --grpc-tls-cert), or TLS
    when CAR_GRPC_CA names a PEM file of the certificates to trust (for a self-signed
    server, its --grpc-tls-cert)."""
    # A restarted server is found again within a second (the default backoff grows to 2 min).
    options = [("grpc.max_reconnect_backoff_ms", 1000)]
    if ca := os.environ.get("CAR_GRPC_CA"):
        trust = grpc.ssl_channel_credentials(Path(ca).read_bytes())
        return grpc.aio.secure_channel(address(), trust, options)
    return grpc.aio.insecure_channel(address(), options)


def metadata(token: str = "", *, agent_id: str = "", session_id: str = "") -> Metadata:
    """The call metadata of a typed RPC (pass it as `metadata=`):

    - `authorization: Bearer <token>`: the daemon, host or agent token (none when the
      server runs --no-auth);
    - `car-agent-id`: goes with an agent token: the call acts as that agent;
    - `car-session-id`: runs the call as the live SessionService.Connect session with this
      id (its tools, state and current run); the credentials must be that session's."""
    pairs = []
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    if agent_id:
        pairs.append(("car-agent-id", agent_id))
    if session_id:
        pairs.append(("car-session-id", session_id))
    return tuple(pairs)


# guide:end

# ------------------------------------------------------------------ JSON

JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None


def to_value(data: JSON) -> struct_pb2.Value:
    """Plain JSON as a google.protobuf.Value (free-form parameters and outputs)."""
    value = struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int | float):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.list_value.values.extend(to_value(item) for item in data)
    else:
        value.struct_value.update(data)
    return value


def from_value(value: struct_pb2.Value) -> JSON:
    """A google.protobuf.Value as plain JSON; whole numbers as ints (the proto has only
    doubles: 5, not 5.0)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    if kind == "number_value":
        n = value.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def to_struct(data: dict[str, JSON]) -> struct_pb2.Struct:
    """A plain JSON object as a google.protobuf.Struct (tool parameters, JSON Schemas)."""
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, JSON]:
    return {key: from_value(item) for key, item in struct.fields.items()}


# ------------------------------------------------------------------ errors

ERROR_TRAILER = "car-error-bin"


class CarError(Exception):
    """A failure with a JSON-RPC code (errors.proto): what a ServerFrame.error says, or what
    a typed RPC's `car-error-bin` trailer carries.

    `grpc_code` is the gRPC status of a failed typed call, None for an error answered on
    the session stream; `answered` is True when the server answered (the trailer was
    there): such an answer is final, not worth retrying."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        data: JSON = None,
        grpc_code: grpc.StatusCode | None = None,
        answered: bool = False,
        error_code: errors_pb2.ErrorCode.ValueType = errors_pb2.ERROR_CODE_UNSPECIFIED,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.grpc_code = grpc_code
        self.answered = answered
        # The code as an enum to switch on (UNSPECIFIED for a code outside the table).
        self.error_code = error_code

    @classmethod
    def of(cls, error: errors_pb2.Error, grpc_code: grpc.StatusCode | None = None) -> CarError:
        data = from_value(error.data) if error.HasField("data") else None
        return cls(
            error.code,
            error.message,
            data=data,
            grpc_code=grpc_code,
            answered=grpc_code is not None,
            error_code=error.error_code,
        )


# guide:errors
def from_error(error: BaseException) -> CarError:
    """The CarError of a failed call: the server's car.v1.Error from the call's
    `car-error-bin` trailer (the same Error is among the details of its google.rpc.Status:
    grpcio-status's `rpc_status.from_call`); else the gRPC status alone (the connection
    broke, a deadline passed, ...)."""
    if isinstance(error, CarError):
        return error
    if not isinstance(error, grpc.aio.AioRpcError):
        return CarError(0, str(error))
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_TRAILER and isinstance(value, bytes):
            return CarError.of(errors_pb2.Error.FromString(value), error.code())
    return CarError(0, error.details() or "", grpc_code=error.code())


# guide:end

# ------------------------------------------------------------------ output


def log(event: str, **fields: object) -> None:
    """Prints one JSON line on stdout: how the example programs report what they do (the
    tests read these lines)."""
    print(json.dumps({"event": event, **fields}, separators=(",", ":")), flush=True)


def fail(error: BaseException) -> NoReturn:
    """Reports a failure as an `error` event and exits with status 1. The gRPC status is
    named as Go and Connect name it (`NotFound`), so that every client prints the same."""
    e = from_error(error)
    fields: dict[str, object] = {}
    if e.grpc_code is not None:
        fields["grpc_code"] = "".join(w.capitalize() for w in e.grpc_code.name.split("_"))
        fields["error_code"] = errors_pb2.ErrorCode.Name(e.error_code)
    log("error", **fields, code=e.code, message=e.message)
    sys.exit(1)


# ------------------------------------------------------------------ the session stream

Handler: TypeAlias = Callable[[session_pb2.ServerFrame], Coroutine[None, None, None]]


class Session:
    """One SessionService.Connect stream. Requests get fresh ids and are matched to their
    answers; the server's own requests (ids `cb-N`: tools.execute, agent.chat, ...) go to
    `on_request`, each in a task of its own, its notifications to `on_notification`, in
    order, each as the whole typed ServerFrame. Make it inside the running event loop."""

    def __init__(self, ch: grpc.aio.Channel, credentials: Metadata = ()) -> None:
        self._call = session_pb2_grpc.SessionServiceStub(ch).Connect(metadata=credentials)
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[session_pb2.ServerFrame]] = {}
        self._writing = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closed = False
        self.on_request: Handler = self._unknown_method
        self.on_notification: Handler = _ignore
        #: Done when the stream ends: None when it ended cleanly or by close().
        self.ended: asyncio.Task[CarError | None] = asyncio.create_task(self._read())

    async def _read(self) -> CarError | None:
        failure = None
        try:
            async for frame in self._call:
                waiter = self._waiting.pop(frame.id, None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(frame)
                elif frame.id:
                    handler = asyncio.create_task(self.on_request(frame))
                    self._handlers.add(handler)
                    handler.add_done_callback(self._handlers.discard)
                else:
                    await self.on_notification(frame)
        except asyncio.CancelledError:
            if not self._closed:  # close() cancels the call: no failure
                raise
        except grpc.aio.AioRpcError as e:
            if not self._closed:
                failure = from_error(e)
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(failure or CarError(0, "stream ended"))
        return failure

    async def send(self, frame: session_pb2.ClientFrame) -> None:
        """Sends a frame: an answer to a server request (`id` = its `cb-N`), or a
        notification (no id)."""
        async with self._writing:  # one write at a time on a gRPC stream
            await self._call.write(frame)

    # guide:session-request
    async def request(
        self, frame: session_pb2.ClientFrame, timeout: float = 10
    ) -> session_pb2.ServerFrame:
        """Sends a request frame with a fresh id; returns the answer, which has the same
        member set (`answer.session_auth`), or raises the CarError of a ServerFrame.error."""
        frame.id = str(next(self._ids))
        member = frame.WhichOneof("body")
        answered = asyncio.get_running_loop().create_future()
        self._waiting[frame.id] = answered
        try:
            await self.send(frame)
            answer: session_pb2.ServerFrame = await asyncio.wait_for(answered, timeout)
        except TimeoutError:
            raise CarError(0, f"{member}: no answer within {timeout:g} s") from None
        finally:
            self._waiting.pop(frame.id, None)
        if answer.WhichOneof("body") == "error":
            raise CarError.of(answer.error)
        if answer.WhichOneof("body") != member:
            raise CarError(0, f"{member}: answered with {answer.WhichOneof('body')}")
        return answer

    # guide:end

    def close(self) -> None:
        """Ends the stream, and with it the session; `ended` then finishes with None."""
        self._closed = True
        self._call.cancel()

    async def _unknown_method(self, frame: session_pb2.ServerFrame) -> None:
        error = errors_pb2.Error(code=-32601, message=f"unknown method: {frame.WhichOneof('body')}")
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self.send(session_pb2.ClientFrame(id=frame.id, error=error))


async def _ignore(frame: session_pb2.ServerFrame) -> None:
    pass
