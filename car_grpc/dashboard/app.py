"""The dashboard: a small web page for operators, served beside the WebSocket gateway.

    dashboard = Dashboard(config, core_address="127.0.0.1:9102", host_token=...)
    await dashboard.start()     # HTTP listener bound, login link logged
    ... dashboard.url, dashboard.login_url ...
    await dashboard.stop()

Plain files (car_grpc/dashboard/static: HTML, CSS, JavaScript; no build step) and a JSON
and Server-Sent Events API over the core's typed gRPC API (core_client). Live views use
SSE: `/api/events` follows WatchHostEvents (event id = host event sequence) and
`/api/runs/<id>/events` follows WatchRun (event id = the run's cursor), so a browser that
reconnects sends `Last-Event-ID` and resumes right after the last record it saw. Access
rules: car_grpc.dashboard.access. `/metrics` (Prometheus text) and `/healthz` are here
too.

Routes:
    GET  /login?token=T           trade the one-time token for the cookie, 303 to /
    GET  /                        the page; /static/* its files
    GET  /api/status              StatusService.GetStatus
    GET  /api/approvals           ApprovalService.ListApprovals
    POST /api/approvals/<id>      {"approved": bool} -> ApprovalService.ResolveApproval
    GET  /api/runs?agent_id=A     RunService.ListRuns
    GET  /api/runs/<id>/events    SSE of RunService.WatchRun (?cursor=N)
    GET  /api/events              SSE of HostService.WatchHostEvents
    GET  /api/surfaces            A2uiService.ListA2uiSurfaces (the Surfaces view)
    POST /api/surfaces/action     {surfaceId, name, sourceComponentId?, context?} ->
                                  A2uiService.A2uiAction (a click or an input on a surface)
    POST /logout                  end the browser session
    GET  /metrics, /healthz
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import unquote

from car_grpc.config import DashboardConfig
from car_grpc.dashboard.access import Access
from car_grpc.dashboard.core_client import CoreClient
from car_grpc.dashboard.http import (
    EventStream,
    HttpServer,
    Limits,
    Request,
    Response,
    ServerSentEvent,
)
from car_grpc.wire.errors import INVALID_PARAMS, CarError

log = logging.getLogger(__name__)

#: Live event streams served at once (a page holds one or two).
MAX_EVENT_STREAMS = 16
#: Reconnection delay (ms) the page's EventSource is told to use.
SSE_RETRY_MS = 1000
_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "surfaces.js": "text/javascript; charset=utf-8",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_LOGIN_HELP = (
    "Log in with the dashboard link printed in the car-grpc server log "
    "(each link works once; the log then shows a fresh one)."
)


def _json(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data).encode(), "application/json")


def _error(status: int, code: int, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


def _core_failure(e: CarError) -> Response:
    status = 409 if e.code == INVALID_PARAMS else 502
    return _error(status, e.code, e.message)


def _resume_point(request: Request, query_key: str) -> int:
    """Where an event stream resumes: Last-Event-ID (a reconnect), else the query."""
    raw = request.header("last-event-id") or request.query.get(query_key, "0")
    return int(raw) if raw.isdigit() else 0


class Dashboard:
    def __init__(self, config: DashboardConfig, core_address: str, host_token: str | None) -> None:
        self.config = config
        self.core_address = core_address
        self.access = Access(host_token)
        self._host_token = host_token
        self._core: CoreClient | None = None
        self._http: HttpServer | None = None
        self._static: dict[str, bytes] = {}
        self._streams = 0
        #: The bound port, known after start() (kept: a restart binds it again).
        self.port = 0

    @property
    def url(self) -> str:
        host = self.config.dashboard_host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The link that logs a browser in, once (then a fresh one is logged)."""
        return f"{self.url}login?token={self.access.login_token}"

    async def start(self) -> None:
        pkg = resources.files("car_grpc.dashboard") / "static"
        self._static = {name: (pkg / name).read_bytes() for name in _STATIC}
        limits = Limits(
            max_connections=self.config.dashboard_max_connections,
            max_connections_per_peer=self.config.dashboard_max_connections_per_peer,
            header_timeout=self.config.dashboard_header_timeout,
        )
        self._core = CoreClient(self.core_address, self._host_token, self.config.core_ca)
        http = HttpServer(self._handle, self._common_headers, limits)
        try:
            self.port = await http.start(
                self.config.dashboard_host, self.port or self.config.dashboard_port or 0
            )
        except BaseException:
            await self._core.close()
            raise
        self._http = http
        self.access.bind(self.config.dashboard_host, self.port)
        log.info("dashboard: listening on %s", self.url)
        self._log_login_url()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._core is not None:
            await self._core.close()
            self._core = None

    def _log_login_url(self) -> None:
        log.info("dashboard: log in at %s", self.login_url)

    @staticmethod
    def _common_headers(request: Request | None) -> list[tuple[str, str]]:
        return [
            ("Cache-Control", "no-store"),
            ("Content-Security-Policy", _CSP),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
            ("Cross-Origin-Resource-Policy", "same-origin"),
        ]

    # ------------------------------------------------------------ routing

    async def _handle(self, request: Request) -> Response | EventStream:
        access = self.access
        if not access.known_host(request):
            return Response.text(421, "unknown Host: use the address in the server log")
        path, method = request.path, request.method
        if path == "/login" and method in ("GET", "HEAD"):
            return self._login(request)
        logged_in = access.has_session(request)
        if path in ("/metrics", "/healthz") and method in ("GET", "HEAD"):
            if not (logged_in or access.has_host_token(request)):
                return Response.text(401, "unauthorized: " + _LOGIN_HELP)
            return await (self._metrics() if path == "/metrics" else self._healthz())
        if not logged_in:
            if path.startswith("/api/") or method != "GET":
                return _error(401, 401, "unauthorized: " + _LOGIN_HELP)
            return Response.text(401, _LOGIN_HELP)
        if not access.same_origin(request, require_origin=method == "POST"):
            return _error(403, 403, "forbidden: cross-origin request")
        if method == "POST":
            return await self._post(request)
        if method not in ("GET", "HEAD"):
            return _error(405, 405, f"method not allowed: {method}")
        return await self._get(request)

    def _login(self, request: Request) -> Response:
        session_id = self.access.login(request.query.get("token", ""))
        if session_id is None:
            return Response.text(401, "this login link is not valid (any more). " + _LOGIN_HELP)
        self._log_login_url()
        return Response(
            303,
            b"logged in\n",
            headers=[("Location", "/"), ("Set-Cookie", self.access.set_cookie(session_id))],
        )

    async def _get(self, request: Request) -> Response | EventStream:
        path = request.path
        if path == "/":
            return self._file("index.html")
        if path.startswith("/static/") and path.removeprefix("/static/") in _STATIC:
            return self._file(path.removeprefix("/static/"))
        core = self._core
        assert core is not None
        try:
            if path == "/api/status":
                return _json(200, await core.status())
            if path == "/api/approvals":
                return _json(200, await core.approvals())
            if path == "/api/surfaces":
                return _json(200, await core.surfaces())
            if path == "/api/runs":
                agent_id = request.query.get("agent_id", "")
                if not agent_id:
                    return _error(400, INVALID_PARAMS, "missing query parameter: agent_id")
                return _json(200, await core.runs(agent_id))
        except CarError as e:
            return _core_failure(e)
        if path == "/api/events":
            return self._event_stream(self._host_events(_resume_point(request, "after")))
        parts = path.split("/")
        if len(parts) == 5 and parts[1:3] == ["api", "runs"] and parts[4] == "events":
            run_id = unquote(parts[3])
            return self._event_stream(self._run_records(run_id, _resume_point(request, "cursor")))
        return _error(404, 404, f"not found: {path}")

    async def _post(self, request: Request) -> Response:
        path = request.path
        if path == "/logout":
            self.access.logout(request)
            return Response(204, headers=[("Set-Cookie", self.access.clear_cookie())])
        parts = path.split("/")
        surface_action = path == "/api/surfaces/action"
        if not surface_action and (
            len(parts) != 4 or parts[1:3] != ["api", "approvals"] or not parts[3]
        ):
            return _error(404, 404, f"not found: {path}")
        if request.header("content-type").split(";")[0].strip() != "application/json":
            return _error(415, 415, "the body must be application/json")
        try:
            body = json.loads(request.body)
        except ValueError:
            return _error(400, INVALID_PARAMS, "the body is not JSON")
        if surface_action:
            return await self._surface_action(body)
        approved = body.get("approved") if isinstance(body, dict) else None
        if not isinstance(approved, bool):
            return _error(400, INVALID_PARAMS, 'the body must be {"approved": true|false}')
        assert self._core is not None
        try:
            return _json(200, await self._core.resolve(unquote(parts[3]), approved))
        except CarError as e:
            return _core_failure(e)

    async def _surface_action(self, body: Any) -> Response:
        allowed = {"surfaceId", "name", "sourceComponentId", "context"}
        if not isinstance(body, dict) or not set(body) <= allowed:
            return _error(400, INVALID_PARAMS, f"the body must be an object of {sorted(allowed)}")
        assert self._core is not None
        try:
            return _json(200, await self._core.action(body))
        except CarError as e:
            return _core_failure(e)
        except ValueError as e:  # the JSON does not fit a2ui.action's params
            return _error(400, INVALID_PARAMS, f"invalid params: {e}")

    def _file(self, name: str) -> Response:
        return Response(200, self._static[name], _STATIC[name])

    async def _metrics(self) -> Response:
        assert self._core is not None
        try:
            text = await self._core.metrics()
        except CarError as e:
            return Response.text(502, f"no metrics: {e.message}\n")
        return Response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _healthz(self) -> Response:
        assert self._core is not None
        try:
            await self._core.status()
        except CarError as e:
            return Response.text(503, f"unhealthy: {e.message}\n")
        return Response.text(200, "ok\n")

    # ------------------------------------------------------------ live streams

    def _event_stream(self, events: AsyncIterator[ServerSentEvent]) -> Response | EventStream:
        if self._streams >= MAX_EVENT_STREAMS:
            return _error(503, 503, "too many live streams: close other dashboard tabs")
        return EventStream(self._counted(events))

    async def _counted(
        self, events: AsyncIterator[ServerSentEvent]
    ) -> AsyncIterator[ServerSentEvent]:
        self._streams += 1
        try:
            yield ServerSentEvent(data="", event="hello", retry=SSE_RETRY_MS)
            async for event in events:
                yield event
        finally:
            self._streams -= 1
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _host_events(self, after: int) -> AsyncIterator[ServerSentEvent]:
        assert self._core is not None
        try:
            async for event in self._core.watch_host_events(after):
                yield ServerSentEvent(json.dumps(event), "host", str(event["sequence"]))
        except CarError as e:
            # E.g. a resume point from before the core restarted: the page re-reads all.
            yield ServerSentEvent(json.dumps({"code": e.code, "message": e.message}), "failed")

    async def _run_records(self, run_id: str, cursor: int) -> AsyncIterator[ServerSentEvent]:
        assert self._core is not None
        try:
            async for item in self._core.watch_run(run_id, cursor):
                yield ServerSentEvent(json.dumps(item), "record", str(item["cursor"]))
            yield ServerSentEvent("{}", "end")
        except CarError as e:
            yield ServerSentEvent(json.dumps({"code": e.code, "message": e.message}), "failed")
