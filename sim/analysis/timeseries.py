"""Step functions of the GPUs held and waiting over time; the hours an allocation held or waited."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sim.analysis.history import Record
from sim.analysis.thresholds import SUSTAINED_HOURS

Span = tuple[float, float, int, int]  # start, end, GPUs, which level (0 held, 1 waiting)


@dataclass(frozen=True)
class Series:
    """A step function: from times[i] on, the levels are levels[i] (held, waiting)."""

    times: list[float]
    levels: list[tuple[int, int]]
    end: float

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.times, [*self.times[1:], self.end], strict=False)]

    def demand(self) -> list[int]:
        return [h + w for h, w in self.levels]


def series(spans: Iterable[Span], end: float) -> Series:
    delta: dict[float, list[int]] = defaultdict(lambda: [0, 0])
    for start, stop, n, which in spans:
        if stop > start:
            delta[start][which] += n
            delta[stop][which] -= n
    times, levels, held, waiting = [], [], 0, 0
    for t in sorted(delta):
        held, waiting = held + delta[t][0], waiting + delta[t][1]
        times.append(t)
        levels.append((held, waiting))
    return Series(times, levels, end)


def spans(r: Record, end: float) -> list[Span]:
    waited_until = r.started_at if r.started_at is not None else (r.ended_at or end)
    out: list[Span] = [(r.enqueued_at, waited_until, r.count, 1)]
    if r.started_at is not None:
        out.append((r.started_at, r.ended_at if r.ended_at is not None else end, r.count, 0))
    return out


def held_hours(r: Record, end: float) -> float:
    if r.started_at is None:
        return 0.0
    return max(0.0, (r.ended_at if r.ended_at is not None else end) - r.started_at) / 3600.0


def wait_hours(r: Record, end: float) -> float:
    stop = r.started_at if r.started_at is not None else (r.ended_at or end)
    return max(0.0, stop - r.enqueued_at) / 3600.0


def mean_level(s: Series, start: float, values: Sequence[int]) -> float:
    width = s.end - start
    if width <= 0:
        return 0.0
    return sum(v * d for v, d in zip(values, s.durations(), strict=True)) / width


def sustained_excess(s: Series, capacity: int) -> int:
    """The largest excess of demand over capacity that lasted SUSTAINED_HOURS in all."""
    pieces = sorted(zip(s.demand(), s.durations(), strict=True), reverse=True)
    total = 0.0
    for demand, duration in pieces:
        if demand <= capacity:
            return 0
        total += duration
        if total >= SUSTAINED_HOURS * 3600.0:
            return demand - capacity
    return 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
