"""A real PostgreSQL server for the tests: Debian's postgresql package, a throwaway cluster.

`scripts/setup_postgres.sh` installs the package when missing (as `./dev test` does) and
prints where its programs are. `PostgresServer.start()` runs initdb into a temporary
directory and starts the server on a free loopback port (TCP only, password auth); `stop`
removes it all. PostgreSQL refuses to run as root: as root (CI), the cluster belongs to
the `postgres` system user (created by the package) and every server program runs as it;
otherwise as the current user.

The cluster sorts text with an ICU collation (not byte order), so that a store that forgot
its own collation is caught by the ordering tests. fsync is off: a crash of the machine
during the tests is not what they test, and commits still wait for the server.

No server outlives the process that made it (its owner), even one killed by SIGKILL (a
timeout, Ctrl-C: pg_ctl starts the server in a session of its own, out of reach of the
terminal's signals). Two mechanisms, the second for when the first is killed too:

- a watchdog (`python -m tests.postgres_server --watch ROOT`, in a session of its own) reads
  a pipe whose only writer is the owner: when the owner is gone, however, the read ends
  (EOF) and the watchdog destroys the cluster;
- each cluster's directory names its owner (OWNER: pid and start time, so a reused pid is
  no owner), and `create` first destroys every cluster whose owner is gone (`reap`).

Both stop an orphan's server by its postmaster.pid (SIGQUIT, checked to be a server of that
directory) and remove the directory with OWNER last, so a removal cut short is reaped later.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup_postgres.sh"
#: The superuser role of the test cluster (its password is random per cluster).
ROLE = "car"
#: The clusters' directories: PREFIX + a random part, under /tmp or the temporary directory.
PREFIX = "car-grpc-pg-"
#: In a cluster's directory: its owner ("PID STARTTIME"), removed last.
OWNER = "owner"
#: Seconds an orphaned server has to end after SIGQUIT (immediate shutdown) before SIGKILL.
QUIT_GRACE = 30.0


def ensure_installed() -> Path:
    """Install PostgreSQL when missing (idempotent, quick when present); its bin directory."""
    done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{SETUP.name} failed:\n{done.stdout}\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """One throwaway cluster: its programs, its directory and its port."""

    bindir: Path
    root: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    #: The OS user the server runs as (None: the current one).
    user: str | None = None
    #: The watchdog's pid (0: none, as in a watchdog's own copy).
    watchdog_pid: int = 0
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: The write end of the watchdog's pipe, held open while this process lives.
    _lifeline: int | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls) -> PostgresServer:
        """initdb a new cluster in a temporary directory (not started), watched: it is
        destroyed when this process is gone. Clusters whose owner is gone go first."""
        bindir = ensure_installed()
        reap()
        user = "postgres" if os.geteuid() == 0 else None
        # Under /tmp when the server runs as another user: it must reach its directory
        # (a TMPDIR under root's home would not let it).
        root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp" if user else None))
        (root / OWNER).write_text(_identity(os.getpid()) + "\n")
        server = cls(bindir=bindir, root=root, user=user)
        server._watch()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        if user is not None:
            os.chown(pwfile, pwd.getpwnam(user).pw_uid, -1)
        pwfile.chmod(0o600)
        server._run(
            "initdb",
            "--pgdata",
            str(server.data),
            "--username",
            ROLE,
            "--pwfile",
            str(pwfile),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--locale",
            "C.UTF-8",
            "--locale-provider",
            "icu",
            "--icu-locale",
            "en",
            "--no-sync",
        )
        pwfile.unlink()
        return server

    def start(self) -> None:
        """Start the server on a free loopback port (the same port again after a stop)."""
        for attempt in range(3):
            if not self.port or attempt:
                self.port = _free_port()
            options = " ".join(
                (
                    f"-p {self.port}",
                    "-c listen_addresses=127.0.0.1",
                    "-c unix_socket_directories=''",
                    "-c fsync=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                    "-c shared_buffers=32MB",
                )
            )
            done = self._run(
                "pg_ctl",
                "start",
                "--wait",
                "--timeout=30",
                "--pgdata",
                str(self.data),
                "--log",
                str(self.log),
                "-o",
                options,
                check=False,
            )
            if done.returncode == 0:
                return
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: sessions are ended, as a restart by an administrator
        would; `immediate`: as a crash)."""
        self._run("pg_ctl", "stop", "--wait", "--pgdata", str(self.data), "--mode", mode)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        _remove(self.root)
        if self._lifeline is not None:  # the watchdog's read ends: it has nothing left to do
            os.close(self._lifeline)
            self._lifeline = None

    @property
    def pid(self) -> int | None:
        """The server's (postmaster's) pid while it runs, as its data directory says."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def _watch(self) -> None:
        """Start the watchdog; this process keeps the only write end of its pipe."""
        read, self._lifeline = os.pipe()  # not inherited by the programs started later
        try:
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "tests.postgres_server", "--watch", str(self.root)],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,  # not stopped by a Ctrl-C meant for its owner
            )
        finally:
            os.close(read)
        self.watchdog_pid = watchdog.pid

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # ------------------------------------------------------------ databases

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def execute(self, database_url: str, query: str) -> list[tuple[Any, ...]]:
        """Run one statement on a database; its rows (none for a statement without)."""
        with psycopg.connect(database_url, autocommit=True) as conn:
            cur = conn.execute(query.encode())
            return cur.fetchall() if cur.description else []

    # ------------------------------------------------------------ helpers

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / program), *args]
        if self.user is not None:
            # Not subprocess's user=: that forks the whole process, and a fork of a process
            # with gRPC's threads running crashes (in the child, and it upsets the parent).
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # util-linux
            argv = [runuser, "-u", self.user, "--", *argv]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,  # the server's user may not enter the caller's directory
            env={
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "LC_ALL": "C.UTF-8",
            },
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                f"{self.log_tail()}"
            )
        return done


# ------------------------------------------------------------------ owners


def _identity(pid: int) -> str:
    """ "PID STARTTIME" of a live process ("" when there is none): its start time (in clock
    ticks since boot, /proc/PID/stat) tells it from a later process given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):  # exited, not yet waited for
        return ""
    return f"{pid} {fields[19]}"


def _owner_alive(root: Path) -> bool:
    """Whether the process that made the cluster in `root` still runs (True when unsure:
    a directory without its owner recorded yet, or not readable)."""
    try:
        owner = (root / OWNER).read_text().strip()
        pid = int(owner.split()[0])
    except (OSError, ValueError, IndexError):  # not there, or not written whole yet
        return True
    return _identity(pid) == owner


def _postmaster(root: Path) -> int | None:
    """The pid of the server running on the cluster in `root` (None: none does): its data
    directory's postmaster.pid, if that process is a server of this very directory."""
    data = root / "data"
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(data).encode() in command and _identity(pid) else None


def _remove(root: Path) -> None:
    """Stop the server of the cluster in `root` if one runs (SIGQUIT: an immediate shutdown,
    as `pg_ctl stop -m immediate`, which needs neither its programs nor its user), then
    remove the directory, its OWNER last: what a kill interrupts is still reaped later."""
    pid = _postmaster(root)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + QUIT_GRACE
        while _identity(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            if _identity(pid):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if entry.name != OWNER:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        (root / OWNER).unlink(missing_ok=True)
        root.rmdir()


def reap() -> list[Path]:
    """Destroy every cluster whose owner is gone and whose watchdog did not destroy it (it
    was killed too); the directories reaped."""
    reaped = []
    for parent in {Path("/tmp"), Path(tempfile.gettempdir())}:
        for root in parent.glob(PREFIX + "*"):
            if not _owner_alive(root):
                _remove(root)
                reaped.append(root)
    return reaped


def _watchdog(root: Path) -> None:
    """Wait for the owner to be gone (EOF on stdin), then destroy the cluster in `root`."""
    while sys.stdin.buffer.read(65536):
        pass
    _remove(root)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watch"] and len(sys.argv) == 3:
        _watchdog(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.postgres_server --watch ROOT")
