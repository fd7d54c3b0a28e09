"""Unit tests of the dashboard's pure parts: HTTP request parsing, SSE encoding, access."""

from __future__ import annotations

import pytest

from car_grpc.config import Config
from car_grpc.connection_caps import peer_of
from car_grpc.dashboard import access as access_module
from car_grpc.dashboard.access import COOKIE, MAX_SESSIONS, Access
from car_grpc.dashboard.http import (
    MAX_HEADERS,
    HttpError,
    Limits,
    Request,
    ServerSentEvent,
    parse_head,
)


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode()


def test_parse_head_reads_the_target_query_and_headers() -> None:
    request = parse_head(
        head(
            "GET /api/runs?agent_id=a%201&x= HTTP/1.1",
            "Host: 127.0.0.1:9101",
            "Cookie: a=1",
            "cookie: car_dashboard=s; b=2",
            "Accept: text/html",
            "accept: */*",
        )
    )
    assert (request.method, request.path) == ("GET", "/api/runs")
    assert request.query == {"agent_id": "a 1", "x": ""}
    assert request.header("HOST") == "127.0.0.1:9101"
    assert request.header("accept") == "text/html, */*"
    assert request.cookies() == {"a": "1", COOKIE: "s", "b": "2"}
    assert request.keep_alive


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (("GET /",), 400),
        (("GET / HTTP/2.0",), 505),
        (("G@T / HTTP/1.1",), 400),
        (("GET http://evil/ HTTP/1.1",), 400),
        (("GET / HTTP/1.1", "no colon here"), 400),
        (("GET / HTTP/1.1", " folded: header"), 400),
        (("GET / HTTP/1.1", *[f"h{i}: v" for i in range(MAX_HEADERS + 1)]), 431),
    ],
)
def test_parse_head_refuses_malformed_requests(lines: tuple[str, ...], status: int) -> None:
    with pytest.raises(HttpError) as refused:
        parse_head(head(*lines))
    assert refused.value.status == status


def test_a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert peer_of(("127.0.0.1", 50000)) == peer_of(("127.0.0.1", 50001)) == "127.0.0.1"
    assert peer_of(("127.0.0.2", 50000)) == "127.0.0.2"
    assert peer_of(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"
    one = peer_of(("2001:db8:1:2::1", 1, 0, 0))
    assert one == peer_of(("2001:db8:1:2:ffff::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert one != peer_of(("2001:db8:1:3::1", 1, 0, 0))
    assert peer_of(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert peer_of("") == peer_of(None) == ""  # e.g. a Unix socket: one peer


def test_limits_refuse_caps_that_cannot_work() -> None:
    for bad in (
        {"max_connections_per_peer": 0},
        {"max_connections": 4, "max_connections_per_peer": 8},
        {"header_timeout": 0},
    ):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_keep_alive_follows_the_version_and_connection_header() -> None:
    assert not parse_head(head("GET / HTTP/1.1", "Connection: close")).keep_alive
    assert not parse_head(head("GET / HTTP/1.0")).keep_alive
    assert parse_head(head("GET / HTTP/1.0", "Connection: keep-alive")).keep_alive


def test_server_sent_events_put_every_data_line_on_its_own_field() -> None:
    event = ServerSentEvent('{"a": 1}\nsecond', event="record", id="7", retry=1000)
    assert event.encode() == (
        b'retry: 1000\nid: 7\nevent: record\ndata: {"a": 1}\ndata: second\n\n'
    )


def req(**headers: str) -> Request:
    return Request("GET", "/", "/", {}, {k.replace("_", "-"): v for k, v in headers.items()})


def test_a_login_token_works_once_and_a_fresh_one_replaces_it() -> None:
    access = Access(host_token="h" * 43)
    first = access.login_token
    assert access.login("wrong") is None and access.login("") is None
    session = access.login(first)
    assert session is not None and access.login_token != first
    assert access.login(first) is None  # spent
    assert access.has_session(req(cookie=f"{COOKIE}={session}"))
    assert not access.has_session(req(cookie=f"{COOKIE}=forged"))
    access.logout(req(cookie=f"{COOKIE}={session}"))
    assert not access.has_session(req(cookie=f"{COOKIE}={session}"))


def test_sessions_expire_and_are_bounded() -> None:
    now = [1000.0]
    access = Access(host_token=None, clock=lambda: now[0])
    sessions = [access.login(access.login_token) for _ in range(MAX_SESSIONS + 1)]
    assert not access.has_session(req(cookie=f"{COOKIE}={sessions[0]}"))  # the oldest left
    assert access.has_session(req(cookie=f"{COOKIE}={sessions[-1]}"))
    now[0] += access_module.SESSION_SECONDS
    assert not access.has_session(req(cookie=f"{COOKIE}={sessions[-1]}"))


def test_the_cookie_is_http_only_and_same_site_strict() -> None:
    assert Access.set_cookie("s1").split("; ") == [
        f"{COOKIE}=s1",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        f"Max-Age={access_module.SESSION_SECONDS}",
    ]


def test_the_host_token_is_accepted_as_a_bearer_only() -> None:
    access = Access(host_token="secret")
    assert access.has_host_token(req(authorization="Bearer secret"))
    assert not access.has_host_token(req(authorization="Bearer secre"))
    assert not access.has_host_token(req(authorization="secret"))
    assert not Access(host_token=None).has_host_token(req(authorization="Bearer "))


def test_host_and_origin_checks() -> None:
    access = Access(host_token=None)
    access.bind("127.0.0.1", 9101)
    assert access.known_host(req(host="127.0.0.1:9101"))
    assert access.known_host(req(host="localhost:9101"))
    assert not access.known_host(req(host="evil.example:9101"))
    assert not access.known_host(req(host="127.0.0.1:9102"))
    here = {"host": "localhost:9101"}
    assert access.same_origin(req(**here), require_origin=False)
    assert not access.same_origin(req(**here), require_origin=True)
    assert access.same_origin(req(**here, origin="http://localhost:9101"), require_origin=True)
    assert not access.same_origin(req(**here, origin="http://127.0.0.1:9101"), require_origin=True)
    assert not access.same_origin(req(**here, sec_fetch_site="cross-site"), require_origin=False)
    assert access.same_origin(req(**here, sec_fetch_site="none"), require_origin=False)
    anywhere = Access(host_token=None)
    anywhere.bind("0.0.0.0", 9101)
    assert anywhere.known_host(req(host="dashboard.internal:9101"))


def test_the_dashboard_port_defaults_to_the_websocket_port_plus_one() -> None:
    def port(**fields: object) -> int | None:
        return Config().with_overrides(**fields).for_serve().dashboard.dashboard_port

    assert port(ws_port=9100) == 9101
    assert port(ws_port=0) == 0
    assert port(ws_port=9100, dashboard_port=0) == 0
    assert port(ws_port=9100, dashboard_port=8000) == 8000
