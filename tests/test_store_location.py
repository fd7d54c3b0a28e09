"""Choosing the store: the URL of --store / CAR_STORE, how it is parsed, and that its
password shows nowhere (the config's repr, messages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from car_grpc.cli import build_parser, config_from
from car_grpc.config import Config
from car_grpc.store import redact, store_location


def test_no_url_is_the_embedded_file_under_the_state_root() -> None:
    location = store_location(None, Path("/home/me/.car"))
    assert location.path == Path("/home/me/.car/car-grpc/store.sqlite3")
    assert str(location) == "sqlite:/home/me/.car/car-grpc/store.sqlite3"
    assert store_location("", Path("/r")).path == Path("/r/car-grpc/store.sqlite3")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:/var/lib/car/store.db", "/var/lib/car/store.db"),
        ("sqlite:///var/lib/car/store.db", "/var/lib/car/store.db"),
        ("sqlite:relative/store.db", "relative/store.db"),
    ],
)
def test_sqlite_urls_name_a_file(url: str, path: str) -> None:
    location = store_location(url, Path("/unused"))
    assert (location.kind, location.path) == ("sqlite", Path(path))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://car:s3cret@db.internal:5432/car",
        "postgres://car:s3cret@db.internal/car?sslmode=require",
        "postgresql://car@h1:5432,h2:5432/car?password=s3cret",
    ],
)
def test_postgresql_urls_keep_their_password_for_the_driver_only(url: str) -> None:
    location = store_location(url, Path("/unused"))
    assert (location.kind, location.path, location.url) == ("postgresql", None, url)
    assert "s3cret" not in str(location) and "s3cret" not in repr(location)
    assert "***" in str(location)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://car:pw@db:5432/car", "postgresql://car:***@db:5432/car"),
        ("postgresql://car:p@ss:w@[::1]/car", "postgresql://car:***@[::1]/car"),
        ("postgresql://car@db/car", "postgresql://car@db/car"),
        ("postgresql://db/car?sslmode=verify-full&password=pw", None),
        ("postgresql://db/car?sslpassword=pw&application_name=x", None),
        ("host=db password=pw", "***"),
    ],
)
def test_redact_leaves_no_password(url: str, shown: str | None) -> None:
    out = redact(url)
    assert "pw" not in out
    if shown is not None:
        assert out == shown


@pytest.mark.parametrize("url", ["mysql://u:pw@h/d", "host=db password=pw", "sqlite:"])
def test_an_unknown_store_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        store_location(url, Path("/unused"))
    assert "pw" not in str(refused.value)


def test_car_store_and_store_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAR_STORE", "postgresql://car:from-env@db/car")
    config = Config.from_env()
    assert config.core.store == "postgresql://car:from-env@db/car"
    assert "from-env" not in repr(config)  # a config may be logged
    parser = build_parser()
    for argv in (
        ["serve"],
        ["core"],
        ["agents", "add", "bot"],
        ["agents", "list"],
        ["agents", "remove", "bot"],
    ):
        assert config_from(parser.parse_args(argv)).core.store == "postgresql://car:from-env@db/car"
        flagged = config_from(parser.parse_args([*argv, "--store", "sqlite:/tmp/x.db"]))
        assert flagged.core.store == "sqlite:/tmp/x.db"
    monkeypatch.delenv("CAR_STORE")
    assert Config.from_env().core.store is None


def test_a_bad_store_url_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from car_grpc.cli import main

    monkeypatch.delenv("CAR_STORE", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["agents", "list", "--store", "mysql://u:pw@h/d"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--store / CAR_STORE: unknown store" in err and "pw" not in err
