"""Persistence stays behind the repositories: no sqlite3 and no SQL outside car_grpc/store/.

The core reaches durable state only through the Protocols of car_grpc/store/repositories.py,
so another store (PostgreSQL) plugs in without touching it. Generated code (car_grpc/v1)
is not ours to check.
"""

from __future__ import annotations

import re
from pathlib import Path

import car_grpc

PACKAGE = Path(car_grpc.__file__).parent
ALLOWED = (PACKAGE / "store", PACKAGE / "v1")
SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM"
    r"|CREATE\s+(TABLE|INDEX)|PRAGMA|BEGIN\s+IMMEDIATE)\b"
)


def _outside_store() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*.py") if not any(p.is_relative_to(a) for a in ALLOWED)]
    assert len(files) > 20  # the walk found the package
    return files


def test_no_sqlite3_outside_the_store() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in _outside_store()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "sqlite3" in line
    ]
    assert found == []


def test_no_sql_outside_the_store() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in _outside_store()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if SQL.search(line)
    ]
    assert found == []


def test_the_checks_see_what_they_look_for() -> None:
    """The store itself has both, so the patterns above are not blind."""
    text = "\n".join(p.read_text() for p in (PACKAGE / "store").rglob("*.py"))
    assert "import sqlite3" in text
    for statement in ("SELECT approval FROM", "INSERT INTO runs", "UPDATE goals SET"):
        assert statement in text and SQL.search(statement), statement
