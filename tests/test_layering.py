"""The parts import each other in one direction: the gateway and the dashboard speak to
the core over gRPC and share only the wire package (and the generated code) with it, so
importing them never loads the core or the store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE_AND_STORE = ("car_grpc.core", "car_grpc.store")


def _loaded_by(module: str) -> list[str]:
    """The car_grpc modules a fresh interpreter has loaded after `import module`."""
    probe = (
        f"import sys, json, {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('car_grpc'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    loaded: list[str] = json.loads(out.stdout)
    assert module in loaded
    return loaded


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("car_grpc.gateway.jsonrpc", (*CORE_AND_STORE, "car_grpc.dashboard")),
        ("car_grpc.gateway", (*CORE_AND_STORE, "car_grpc.dashboard")),
        ("car_grpc.dashboard", (*CORE_AND_STORE, "car_grpc.gateway")),
        ("car_grpc.wire.codec", (*CORE_AND_STORE, "car_grpc.gateway", "car_grpc.dashboard")),
        ("car_grpc", ("car_grpc.core", "car_grpc.store", "car_grpc.gateway")),
        # The reference speech engine is a client of the public API, like any other.
        (
            "car_grpc.voice_engine.engine",
            (*CORE_AND_STORE, "car_grpc.gateway", "car_grpc.dashboard"),
        ),
    ],
)
def test_importing_a_part_loads_only_what_it_needs(
    module: str, must_not_load: tuple[str, ...]
) -> None:
    loaded = _loaded_by(module)
    assert [m for m in loaded if m.startswith(must_not_load)] == []
