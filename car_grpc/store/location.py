"""Where a store lives: the URL of `--store` / `CAR_STORE`, parsed, and shown without secrets.

- none given: the embedded SQLite file under the state root (`$CAR_HOME/car-grpc/...`);
- `sqlite:PATH` (also `sqlite:///ABSOLUTE/PATH`): that SQLite file;
- `postgresql://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgres://`, and anything else a
  libpq connection URL may hold: several hosts, `?sslmode=...`): a PostgreSQL database.

A URL may carry a password, so a location is only ever shown through `redact`: `str()` of
a StoreLocation and every message here leave the password out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

#: Query parameters of a libpq URL whose values are secrets.
_SECRET_PARAMS = re.compile(r"(?i)(^|&)(password|sslpassword)=[^&]*")
_MASK = "***"


class StoreUrlError(ValueError):
    """A store URL that names no store, or that the driver cannot parse (shown redacted)."""


def embedded_path(state_root: Path) -> Path:
    """The embedded store's database file under a state root (`$CAR_HOME`)."""
    return state_root / "car-grpc" / "store.sqlite3"


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL. `str()` names it without its password."""

    #: "sqlite" or "postgresql".
    kind: str
    #: The database file of a SQLite store (None for PostgreSQL).
    path: Path | None = None
    #: The connection URL of a PostgreSQL store, as given (password included: hand it to
    #: the driver, never to a log). Empty for SQLite.
    url: str = field(default="", repr=False)

    def __str__(self) -> str:
        return f"sqlite:{self.path}" if self.path is not None else redact(self.url)


def store_location(url: str | None, state_root: Path) -> StoreLocation:
    """Parse a store URL (None or "": the embedded file under `state_root`);
    StoreUrlError for anything else than the forms in this module's docstring."""
    if not url:
        return StoreLocation("sqlite", path=embedded_path(state_root))
    if url.startswith("sqlite:"):
        raw = url.removeprefix("sqlite:")
        if raw.startswith("//"):  # sqlite:///abs/path, URL style
            raw = raw[2:]
        if not raw:
            raise StoreUrlError("store URL sqlite:PATH needs a PATH")
        return StoreLocation("sqlite", path=Path(raw).expanduser())
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return StoreLocation("postgresql", url=url)
    # Not echoed: what is not a URL may still hold a secret (`host=... password=...`).
    named = f"a {scheme}:// URL" if scheme.isalnum() else "not a store URL"
    raise StoreUrlError(
        f"unknown store ({named}): give sqlite:PATH or "
        "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
    )


def redact(url: str) -> str:
    """`url` with any password replaced by ***: the one in its user info
    (`user:secret@host`) and `password=` / `sslpassword=` query parameters. What is not a
    URL is not shown at all."""
    if "://" not in url:
        return _MASK
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a store URL that could not be parsed>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")  # a password may hold an unquoted "@"
        if ":" in userinfo:
            userinfo = userinfo.partition(":")[0] + ":" + _MASK
        netloc = f"{userinfo}@{hosts}"
    query = _SECRET_PARAMS.sub(lambda m: f"{m[1]}{m[2]}={_MASK}", parts.query)
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += "?" + query
    if parts.fragment:
        out += "#" + parts.fragment
    return out
