"""`python -m bench`: run every benchmark and print its figures as ratios to its baseline."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from bench import summary


def main() -> int:
    names = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    wanted = set(sys.argv[1:])
    failed: list[str] = []
    for name in names:
        if wanted and name not in wanted:
            continue
        print(f"== {name}", flush=True)
        try:
            importlib.import_module(f"bench.{name}").main()
        except SystemExit as e:  # bench_load's verdict: the others still run
            print(f"{name}: {e}", flush=True)
            failed.append(name)
    summary.print_summary(summary.FIGURES)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
