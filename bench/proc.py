"""What a server process costs, read from /proc: its CPU time and resident memory, summed
over the process and its descendants (`car-grpc serve --gateway-processes N` serves from
N + 1 processes, and the server is all of them)."""

from __future__ import annotations

import os
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    tree = [pid]
    for parent in tree:
        for task in Path(f"/proc/{parent}/task").iterdir():
            tree += (int(child) for child in (task / "children").read_text().split())
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants so far."""
    return sum(own_cpu_seconds(process) for process in process_tree(pid))


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` alone so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of `pid` and its descendants, in KiB."""
    total = 0
    for process in process_tree(pid):
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process: /proc/stat's
    user, nice, system, irq, softirq and steal time; idle and iowait not counted)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
