"""The process launcher (tests/processes.py) on small Python children: listeners read from
the log as logged, log lines waited for in order, a child that ends or stays silent fails
the wait with its log, and stopping it."""

from __future__ import annotations

import signal
import sys

import pytest

from tests.bounded import stopped
from tests.processes import launch, port

CHILD = """
import sys
print("starting", file=sys.stderr, flush=True)
print("x: gRPC listening on 127.0.0.1:5001", file=sys.stderr, flush=True)
print("x: WebSocket listening on ws://127.0.0.1:5002/ (core 127.0.0.1:5001)", flush=True)
print("link 1", file=sys.stderr, flush=True)
print("link 2", file=sys.stderr, flush=True)
sys.stdin.read()
print("bye", file=sys.stderr, flush=True)
"""


async def test_listeners_and_lines_from_stdout_and_stderr() -> None:
    async with launch([sys.executable, "-c", CHILD], stdin=True) as child:
        grpc, ws = await child.listeners(2)
        assert (grpc, ws) == ("127.0.0.1:5001", "ws://127.0.0.1:5002/")
        assert (port(grpc), port(ws)) == (5001, 5002)
        assert await child.next_line("link") == "link 1"
        assert await child.next_line("link") == "link 2"
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        assert await child.wait() == 0
    assert child.lines[0] == "starting" and child.lines[-1] == "bye"


async def test_a_child_that_ends_first_fails_the_wait_with_its_log() -> None:
    argv = [sys.executable, "-c", "print('no listener here')"]
    async with launch(argv, name="quitter") as child:
        with pytest.raises(AssertionError, match=r"(?s)quitter ended its log.*no listener here"):
            await child.listeners(1)


async def test_a_silent_child_fails_the_wait_and_is_stopped() -> None:
    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    async with launch(argv, name="sleeper") as child:
        await child.next_line("up")  # its log has a line to show (a slow start is no failure)
        with pytest.raises(AssertionError, match=r"sleeper: no line with 'never'.*\nup"):
            await child.next_line("never", timeout=0.2)
        assert await stopped(child.stop()) == -signal.SIGTERM
