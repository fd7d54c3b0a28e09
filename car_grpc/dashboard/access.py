"""Who may use the dashboard: a one-time login link, a cookie, and same-origin requests.

At start a login token is minted and logged as a URL (the way notebook servers do).
Opening that URL once trades the token for a browser session: a random id in an
HttpOnly, SameSite=Strict cookie. The token is then spent and a fresh one is logged, so
the link in the log always works exactly once. Every other request needs the cookie,
except that machines (a Prometheus scraper, a health check) may instead present the
host token as `Authorization: Bearer` on /metrics and /healthz. The page never sees
the daemon or host token.

Requests must name this server in `Host` (against DNS rebinding) and, when the browser
says where they come from (`Origin`, `Sec-Fetch-Site`), come from this origin; POSTs must
carry `Origin`.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable

from car_grpc.dashboard.http import Request

COOKIE = "car_dashboard"
#: How long a browser session lasts.
SESSION_SECONDS = 12 * 3600
#: Browser sessions kept at once; logging in beyond it ends the oldest.
MAX_SESSIONS = 32
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_WILDCARDS = ("", "0.0.0.0", "::")


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Access:
    def __init__(self, host_token: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._host_token = host_token
        self._clock = clock
        self.login_token = secrets.token_urlsafe(32)
        #: session id -> expiry (on `clock`).
        self._sessions: dict[str, float] = {}
        self._hosts: frozenset[str] | None = frozenset()

    def bind(self, host: str, port: int) -> None:
        """The address served: requests must name it (or a loopback name) in `Host`."""
        if host in _WILDCARDS:
            self._hosts = None  # reachable under any name: the cookie alone decides
            return
        shown = f"[{host}]" if ":" in host else host
        self._hosts = frozenset(f"{name}:{port}" for name in {*_LOOPBACK_NAMES, shown})

    # ------------------------------------------------------------ logging in

    def login(self, token: str) -> str | None:
        """Trade the current login token for a new session id (None if it is not it)."""
        if not token or not _equal(token, self.login_token):
            return None
        self.login_token = secrets.token_urlsafe(32)  # spent: the log shows the next one
        now = self._clock()
        self._sessions = {sid: t for sid, t in self._sessions.items() if t > now}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[min(self._sessions, key=self._sessions.__getitem__)]
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = now + SESSION_SECONDS
        return session_id

    def logout(self, request: Request) -> None:
        self._sessions.pop(request.cookies().get(COOKIE, ""), None)

    @staticmethod
    def set_cookie(session_id: str) -> str:
        return (
            f"{COOKIE}={session_id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECONDS}"
        )

    @staticmethod
    def clear_cookie() -> str:
        return f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"

    # ------------------------------------------------------------ checks

    def has_session(self, request: Request) -> bool:
        session_id = request.cookies().get(COOKIE, "")
        expiry = self._sessions.get(session_id) if session_id else None
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._sessions[session_id]
            return False
        return True

    def has_host_token(self, request: Request) -> bool:
        scheme, _, token = request.header("authorization").partition(" ")
        return (
            self._host_token is not None
            and scheme.lower() == "bearer"
            and _equal(token.strip(), self._host_token)
        )

    def known_host(self, request: Request) -> bool:
        return self._hosts is None or request.header("host") in self._hosts

    def same_origin(self, request: Request, *, require_origin: bool) -> bool:
        """Whether the browser says the request comes from this origin."""
        origin = request.header("origin")
        if origin:
            if origin != f"http://{request.header('host')}":
                return False
        elif require_origin:
            return False
        site = request.header("sec-fetch-site")
        return site in ("", "same-origin", "none")
