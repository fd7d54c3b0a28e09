"""A real headless Chromium for the dashboard tests, driven by playwright-core from Python.

`scripts/setup_browser.sh` installs what it needs (Debian's chromium, and playwright-core
from tests/browser/package-lock.json); `Browser.launch()` starts tests/browser/driver.mjs,
which launches the browser, and each method sends it one JSON-line command.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

from tests.bounded import stopped

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "browser" / "driver.mjs"
SETUP = ROOT / "scripts" / "setup_browser.sh"
#: Where screenshots go (gitignored): looked at by people reviewing the dashboard.
ARTIFACTS = ROOT / "artifacts" / "dashboard"


def ensure_installed() -> None:
    """Install chromium and playwright-core when missing (idempotent, quick when present)."""
    done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{SETUP.name} failed:\n{done.stdout}\n{done.stderr}")


class BrowserError(Exception):
    pass


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._ids = itertools.count(1)

    @classmethod
    async def launch(cls) -> Browser:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(DRIVER),
            cwd=DRIVER.parent,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        browser = cls(proc)
        hello = await browser._read(timeout=30)
        if not hello.get("ready"):
            raise BrowserError(f"the driver did not start: {hello}")
        return browser

    async def _read(self, timeout: float) -> Any:
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        if not line:
            assert self._proc.stderr is not None
            err = await self._proc.stderr.read()
            raise BrowserError(f"the driver exited: {err.decode(errors='replace')}")
        return json.loads(line)

    async def call(self, op: str, timeout: float = 20, **args: Any) -> Any:
        assert self._proc.stdin is not None
        command_id = next(self._ids)
        self._proc.stdin.write((json.dumps({"id": command_id, "op": op, **args}) + "\n").encode())
        await self._proc.stdin.drain()
        answer = await self._read(timeout)
        assert answer.get("id") == command_id, answer
        if not answer["ok"]:
            raise BrowserError(f"{op} {args}: {answer['error']}")
        return answer["result"]

    # One method per driver op, for readable tests.

    async def goto(self, url: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("goto", url=url)
        return result

    async def wait(self, selector: str, state: str = "visible") -> None:
        await self.call("wait", selector=selector, state=state)

    async def wait_count(self, selector: str, count: int) -> None:
        """Wait until exactly `count` elements match the CSS `selector`."""
        await self.call("wait_count", selector=selector, count=count)

    async def count(self, selector: str) -> int:
        return int(await self.call("count", selector=selector))

    async def texts(self, selector: str) -> list[str]:
        return list(await self.call("texts", selector=selector))

    async def click(self, selector: str) -> None:
        await self.call("click", selector=selector)

    async def fill(self, selector: str, value: str) -> None:
        """Type `value` into the input `selector` (replacing it), then leave it (change)."""
        await self.call("fill", selector=selector, value=value)

    async def press(self, selector: str, key: str) -> None:
        """Focus `selector` and press `key` on the keyboard."""
        await self.call("press", selector=selector, key=key)

    async def evaluate(self, expression: str) -> Any:
        return await self.call("evaluate", expression=expression)

    async def cookies(self) -> list[dict[str, Any]]:
        return list(await self.call("cookies"))

    async def clear_cookies(self) -> None:
        await self.call("clear_cookies")

    async def screenshot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        await self.call("screenshot", path=str(path))
        return path

    async def page_errors(self) -> list[str]:
        return list(await self.call("page_errors"))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call("close", timeout=10)
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await stopped(self._proc.wait(), "the browser driver's exit")
