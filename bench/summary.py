"""The one summary table `python -m bench` ends with: each figure of the throughput issue,
its value, its ratio to the baseline it was measured beside, its target, and whether the
run met it. Each benchmark reports its figures here as it runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    name: str
    #: The figure as measured, with its unit.
    value: str
    #: Its ratio to the baseline it was measured beside (None: the figure is absolute).
    ratio: float | None
    #: The target, e.g. ">= 0.6x echo" (empty: reported, no target).
    target: str = ""
    met: bool | None = None
    #: The same ratio for the bare floor measured beside it (the same hops with none of
    #: car-grpc's work, e.g. a bare WebSocket -> grpc.aio relay), when there is one: a
    #: target the floor itself misses is out of reach on that path.
    floor: float | None = None
    floor_met: bool | None = None


FIGURES: list[Figure] = []


def report(*figures: Figure) -> None:
    FIGURES.extend(figures)


def at_least(
    name: str, value: str, ratio: float, target: float, baseline: str, floor: float | None = None
) -> Figure:
    return Figure(
        name, value, ratio, f">= {target:g}x {baseline}", ratio >= target,
        floor, None if floor is None else floor >= target,
    )  # fmt: skip


def at_most(
    name: str, value: str, ratio: float, target: float, baseline: str, floor: float | None = None
) -> Figure:
    return Figure(
        name, value, ratio, f"<= {target:g}x {baseline}", ratio <= target,
        floor, None if floor is None else floor <= target,
    )  # fmt: skip


def print_summary(figures: list[Figure]) -> None:
    if not figures:
        return
    width = max(len(f.name) for f in figures)
    vwidth = max(len(f.value) for f in figures)
    twidth = max(len(f.target) for f in figures)
    print(f"\n== summary ({sum(f.met is True for f in figures)} of "
          f"{sum(f.met is not None for f in figures)} targets met)")  # fmt: skip
    print(f"{'figure':{width}}  {'value':>{vwidth}}  {'ratio':>7}  {'target':{twidth}}  met?"
          "  floor (the bare path alone)")  # fmt: skip
    for f in figures:
        ratio = f"{f.ratio:6.2f}x" if f.ratio is not None else ""
        met = {True: "yes", False: "NO", None: ""}[f.met]
        floor = ""
        if f.floor is not None:
            floor = f"{f.floor:.2f}x" + ("" if f.floor_met else ": misses the target too")
        print(f"{f.name:{width}}  {f.value:>{vwidth}}  {ratio:>7}  {f.target:{twidth}}  {met:4}"
              f"  {floor}".rstrip())  # fmt: skip
