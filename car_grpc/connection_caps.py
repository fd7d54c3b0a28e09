"""Connections counted by peer, for the caps of the listeners that take any client: the
dashboard's, the WebSocket gateway's and the A2A HTTP listener's
(`dashboard_max_connections[_per_peer]`, `ws_max_connections[_per_peer]`,
`a2a_max_connections_per_peer` and a2a/server.py's MAX_CONNECTIONS). One place says who a
peer is and keeps the counts; each listener decides what to do at its caps (the
dashboard evicts idle connections, the gateway refuses the handshake with 503, and closes
a connection past its handshakes under way at once; the A2A listener answers a connection
past its caps 503 at once)."""

from __future__ import annotations

import ipaddress

#: Seconds a client refused at a cap with HTTP 503 (the gateway's handshake, an A2A
#: request) is asked to wait (Retry-After) before it tries again: connections end all the
#: time, and one that obeys does not hammer.
RETRY_AFTER = 5


def peer_of(peername: object) -> str:
    """Whose connection this is, for the per-peer cap: the IPv4 address (an IPv4-mapped
    IPv6 one counts as IPv4), or the /64 of an IPv6 address (one host usually holds a
    whole /64). A loopback client is the address it comes from (usually 127.0.0.1; each of
    127/8 is a peer of its own); every client of a Unix socket is the peer ""."""
    if not isinstance(peername, tuple) or not peername:
        return ""
    host = str(peername[0]).partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class PeerCounts:
    """The connections held right now: in all (`total`) and per peer (`of`). Only peers
    holding one or more are kept, so it is as large as the connections it counts."""

    __slots__ = ("_per_peer", "total")

    def __init__(self) -> None:
        self.total = 0
        self._per_peer: dict[str, int] = {}

    def of(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def add(self, peer: str) -> None:
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self.total += 1

    def remove(self, peer: str) -> None:
        left = self._per_peer[peer] - 1
        if left:
            self._per_peer[peer] = left
        else:
            del self._per_peer[peer]
        self.total -= 1
