"""Configs are frozen, built once, and refuse a name no section has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from car_grpc.cli import build_parser, config_from
from car_grpc.config import DEFAULT_GATED_METHODS, Config, CoreConfig


def test_a_misspelt_field_is_refused() -> None:
    with pytest.raises(TypeError, match="tool_timout"):
        Config().with_overrides(tool_timout=1.0)


def test_overrides_land_in_the_section_that_has_the_field() -> None:
    config = Config().with_overrides(tool_timeout=1.5, ws_port=0, dashboard_port=7, core_ca=None)
    assert config.core.tool_timeout == 1.5
    assert config.gateway.ws_port == 0
    assert config.dashboard.dashboard_port == 7
    assert Config().core.tool_timeout == 300.0  # the original is untouched


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().core.tool_timeout = 1.0  # type: ignore[misc]


def test_the_environment_changes_only_what_it_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAR_NO_AUTH", "1")
    monkeypatch.setenv("CAR_TOOL_TIMEOUT", "12")
    core = Config.from_env().core
    assert (core.auth, core.tool_timeout) == (False, 12.0)
    defaults = CoreConfig()
    assert (core.approvals, core.handler_timeout) == (defaults.approvals, defaults.handler_timeout)
    assert core.gated_methods == DEFAULT_GATED_METHODS


def test_serve_trusts_the_cores_own_certificate_unless_a_ca_is_named() -> None:
    own = Config().with_overrides(grpc_tls_cert=Path("core.pem")).for_serve()
    assert own.gateway.core_ca == own.dashboard.core_ca == Path("core.pem")
    named = Config().with_overrides(grpc_tls_cert=Path("c.pem"), core_ca=Path("ca.pem"))
    assert named.for_serve().gateway.core_ca == Path("ca.pem")
    assert Config().for_serve().gateway.core_ca is None  # plaintext core: plaintext dial


def test_the_multiplexed_streams_bound_comes_from_the_environment_or_the_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert CoreConfig().multiplex_stream_bytes == 64 * 1024 * 1024
    monkeypatch.setenv("CAR_MULTIPLEX_STREAM_BYTES", "1048576")
    assert Config.from_env().core.multiplex_stream_bytes == 1048576
    flagged = build_parser().parse_args(["serve", "--multiplex-stream-bytes", "4096"])
    assert config_from(flagged).core.multiplex_stream_bytes == 4096
    monkeypatch.setenv("CAR_MULTIPLEX_STREAM_BYTES", "0")
    with pytest.raises(ValueError, match="CAR_MULTIPLEX_STREAM_BYTES must be a whole number"):
        Config.from_env()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["core", "--multiplex-stream-bytes", "lots"])
