"""`car-grpc serve` as a real process, started synchronously so that a module-scoped fixture
can share one server among several tests (tests/serve_process.py is the asyncio variant).

    served = start_serve(tmp_path)      # ephemeral ports, state and token files in tmp_path
    ... served.grpc_address, served.ws_url, served.token("auth-token"), served.add_agent(id)
    served.stop()                        # SIGTERM; returns the exit status

Readiness is read from the server's log lines (one per listener), never from a sleep.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

_GRPC = re.compile(r"core: gRPC listening on (\S+)")
_WS = re.compile(r"gateway: WebSocket listening on (ws://\S+)")
#: Log lines kept for failure messages.
_LOG_LINES = 200


def _car_grpc() -> list[str]:
    return [sys.executable, "-m", "car_grpc.cli"]


def _env(car_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAR_")}
    return {**env, "CAR_HOME": str(car_home)}


class Served:
    """A running `car-grpc serve` process and where it listens."""

    def __init__(self, proc: subprocess.Popen[str], car_home: Path) -> None:
        self.proc = proc
        self.car_home = car_home
        self.grpc_address = ""
        self.ws_url = ""
        self.log: deque[str] = deque(maxlen=_LOG_LINES)
        self._ready = threading.Event()
        self._agents: dict[str, str] = {}
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if m := _GRPC.search(line):
                self.grpc_address = m.group(1)
            if m := _WS.search(line):
                self.ws_url = m.group(1)
            if self.grpc_address and self.ws_url:
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which then sees no addresses

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or not (self.grpc_address and self.ws_url):
            self.proc.kill()
            raise RuntimeError("car-grpc serve did not start:\n" + "\n".join(self.log))

    def token(self, name: str) -> str:
        """A token file the server wrote (`auth-token`, `host-token`), as clients read it."""
        return (self.car_home / "ai.parslee.car" / name).read_text().strip()

    def add_agent(self, agent_id: str) -> str:
        """`car-grpc agents add <agent_id>`, the operator command; returns the token."""
        if agent_id not in self._agents:
            out = subprocess.run(
                [*_car_grpc(), "agents", "add", agent_id],
                env=_env(self.car_home),
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            self._agents[agent_id] = out.stdout.strip()
        return self._agents[agent_id]

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit status (killed when it does not come in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def start_serve(car_home: Path, timeout: float = 30) -> Served:
    """Start `car-grpc serve` on ephemeral loopback ports with its state in `car_home`."""
    car_home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [*_car_grpc(), "serve", "--port", "0", "--grpc-port", "0", "--no-unix-socket"],
        env=_env(car_home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    served = Served(proc, car_home)
    served.wait_ready(timeout)
    return served
