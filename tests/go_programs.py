"""The Go client (clients/go) as programs in other processes, built with Debian's Go.

`build_go_programs` runs scripts/setup_go.sh (Debian's golang-go and Go packages through
apt-get when missing, then clients/go/vendor) and compiles every command of clients/go;
`run_go` starts one against a server. Like the Node programs (tests/client_programs.py)
they print one JSON object per line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from tests.client_programs import Program, run_program
from tests.processes import cli_env

ROOT = Path(__file__).resolve().parent.parent
GO_DIR = ROOT / "clients" / "go"
SETUP = ROOT / "scripts" / "setup_go.sh"
#: How the Go client is built: its vendor/ links Debian's sources; nothing is downloaded.
GO_ENV = {"GOFLAGS": "-mod=vendor", "GOPROXY": "off", "GO111MODULE": "on"}


def build_go_programs(out: Path) -> Path:
    """Set up Debian's Go and build clients/go/cmd/* into `out`; returns `out`."""
    subprocess.run(["bash", str(SETUP)], check=True, timeout=900)
    go = shutil.which("go") or "/usr/bin/go"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [go, "build", "-o", f"{out}{os.sep}", "./cmd/..."],
        cwd=GO_DIR,
        env={**os.environ, **GO_ENV},
        check=True,
        timeout=600,
    )
    return out


def run_go(
    bin_dir: Path, program: str, *args: str, address: str, car_home: Path, **env: str
) -> contextlib.AbstractAsyncContextManager[Program]:
    """Start the Go `program` (built into `bin_dir`) against the server's gRPC `address`;
    it finds the token files under `car_home`, and `env` is added."""
    full_env = cli_env(car_home, CAR_GRPC_ADDRESS=address, **env)
    return run_program(program, [str(bin_dir / program), *args], full_env, GO_DIR)
