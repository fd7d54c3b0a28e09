"""`car-grpc serve` decides how many gateway processes to run by default ("auto"): one of
its own where the server may run on 2 CPUs or more, none (the gateway in the core's
process) on one; `--gateway-processes` / CAR_GATEWAY_PROCESSES choose otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from car_grpc.cli import build_parser, config_from
from car_grpc.config import Config, gateway_processes, serve_gateway_processes, usable_cpus
from tests.processes import car_grpc_serve
from tests.ws_helpers import rpc


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [(1, (0, "auto, 1 CPU")), (2, (1, "auto, 2 CPUs")), (64, (1, "auto, 64 CPUs"))],
)
def test_auto_is_one_gateway_process_from_two_cpus(cpus: int, expected: tuple[int, str]) -> None:
    # Whatever the host: gateway processes listen on each of its addresses
    # (tests/test_gateway_processes_hosts.py).
    assert serve_gateway_processes("auto", cpus) == expected


@pytest.mark.parametrize(
    ("cpu_max", "quota_cpus"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000\n", 1),
     ("50000 100000\n", 1), ("800000 100000\n", 8), ("garbage\n", None)],
)  # fmt: skip
def test_auto_counts_no_more_cpus_than_the_cgroup_quota_allows(
    tmp_path: Path, cpu_max: str, quota_cpus: int | None
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if quota_cpus is None else min(affinity, quota_cpus)
    assert usable_cpus(tmp_path / "cpu.max") == expected


def test_auto_counts_the_cpus_this_process_may_run_on(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path / "absent") == len(os.sched_getaffinity(0))
    cpus = usable_cpus()
    assert serve_gateway_processes("auto") == serve_gateway_processes("auto", cpus)


@pytest.mark.parametrize("count", [0, 1, 2, 64])
@pytest.mark.parametrize("cpus", [1, 2])
def test_a_number_is_taken_as_set(count: int, cpus: int) -> None:
    assert serve_gateway_processes(count, cpus) == (count, "as set")


def test_a_setting_that_is_neither_a_number_nor_auto_is_refused() -> None:
    with pytest.raises(ValueError, match="gateway_processes: a number or 'auto', got '0'"):
        serve_gateway_processes("0")  # type: ignore[arg-type]  # a str where an int belongs


@pytest.mark.parametrize(("raw", "expected"), [("auto", "auto"), ("0", 0), ("1", 1), ("64", 64)])
def test_the_values_read(raw: str, expected: object) -> None:
    assert gateway_processes(raw) == expected


@pytest.mark.parametrize("raw", ["65", "-1", "", "one", "1.5", "AUTO", "auto1"])
def test_a_bad_value_is_refused_precisely(raw: str) -> None:
    with pytest.raises(ValueError) as refused:
        gateway_processes(raw)
    assert str(refused.value) == f"must be a number from 0 to 64 or auto, got {raw!r}"


def test_the_default_the_environment_and_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAR_GATEWAY_PROCESSES", raising=False)
    # The embedded API's default is the gateway in the caller's process
    # (tests/test_embedded_gateway.py); "auto" is `car-grpc serve`'s.
    assert Config().gateway.gateway_processes == 0
    assert Config.from_env().gateway.gateway_processes == 0
    serve = build_parser().parse_args(["serve"])
    assert config_from(serve).gateway.gateway_processes == "auto"
    monkeypatch.setenv("CAR_GATEWAY_PROCESSES", "0")
    assert config_from(serve).gateway.gateway_processes == 0
    auto = build_parser().parse_args(["serve", "--gateway-processes", "auto"])
    assert config_from(auto).gateway.gateway_processes == "auto"  # the flag over the variable
    monkeypatch.setenv("CAR_GATEWAY_PROCESSES", "auto")
    two = build_parser().parse_args(["serve", "--gateway-processes", "2"])
    assert config_from(two).gateway.gateway_processes == 2
    monkeypatch.setenv("CAR_GATEWAY_PROCESSES", "many")
    with pytest.raises(ValueError) as refused:
        Config.from_env()
    assert str(refused.value) == (
        "CAR_GATEWAY_PROCESSES must be a number from 0 to 64 or auto, got 'many'"
    )


def _gateway_processes_of(pid: int) -> list[int]:
    """The children of `pid` that are gateway processes (not, say, decode workers)."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [
        child
        for child in children
        if b"car_grpc.gateway.process" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


async def test_serve_runs_what_auto_gives_on_this_machine(tmp_path: Path) -> None:
    """No flag: as many gateway processes as "auto" gives for the CPUs the server may run on
    (it inherits this process's affinity), said in the log; it serves and stops cleanly."""
    cpus = len(os.sched_getaffinity(0))
    expected = 1 if cpus >= 2 else 0
    home = tmp_path / "home"
    async with car_grpc_serve(home, "--no-dashboard") as server:
        _, url = await server.listeners(2)
        plural = "" if cpus == 1 else "s"
        assert f"serve: gateway processes: {expected} (auto, {cpus} CPU{plural})" in server.log
        gateways = _gateway_processes_of(server.proc.pid)
        assert len(gateways) == expected
        token = (home / "ai.parslee.car" / "auth-token").read_text()
        async with rpc(url) as client:
            await client.login(token)
            assert await client.result("tools.list") == {"tools": [], "count": 0}
        assert await server.terminate() == 0, server.log
    assert not _running(gateways)
    assert not (home / "ai.parslee.car" / "auth-token").exists()
