"""Per pool and per GPU type: demand against capacity, and queueing delay."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet.config import FleetConfig
from fleet.models import Purpose
from sim.analysis.history import History, Record
from sim.analysis.timeseries import (
    Series,
    mean_level,
    percentile,
    series,
    spans,
    sustained_excess,
    wait_hours,
)


@dataclass(frozen=True)
class WaitStats:
    started: int
    mean_h: float | None
    p50_h: float | None
    p90_h: float | None
    max_h: float | None
    queued: int
    queued_waited_h: float  # total so far
    cancelled: int
    cancelled_waited_h: float  # total until cancelled


@dataclass(frozen=True)
class PoolStats:
    """Demand against capacity and queueing of a pool, or of one GPU type (`name`)."""

    name: str
    gpu_types: list[str]
    capacity_gpus: int
    mean_held_gpus: float
    mean_demand_gpus: float
    utilisation: float
    peak_demand_gpus: int
    peak_at: float | None
    peak_held_gpus: int
    peak_waiting_gpus: int
    peak_shortfall_gpus: int
    sustained_shortfall_gpus: int
    hours_over_capacity: float
    wait: WaitStats
    series: Series = field(repr=False)


def wait_stats(records: list[Record], end: float) -> WaitStats:
    started = [wait_hours(r, end) for r in records if r.started_at is not None]
    queued = [wait_hours(r, end) for r in records if r.state == "queued"]
    cancelled = [wait_hours(r, end) for r in records if r.cancelled]
    return WaitStats(
        started=len(started),
        mean_h=sum(started) / len(started) if started else None,
        p50_h=percentile(started, 0.5),
        p90_h=percentile(started, 0.9),
        max_h=max(started, default=None),
        queued=len(queued),
        queued_waited_h=sum(queued),
        cancelled=len(cancelled),
        cancelled_waited_h=sum(cancelled),
    )


def pool_stats(pool: Purpose, history: History, config: FleetConfig) -> PoolStats:
    mine = [r for r in history.records if r.pool is pool]
    return capacity_stats(pool.value, list(config.pools[pool]), mine, history, config)


def type_stats(gpu_type: str, history: History, config: FleetConfig) -> PoolStats:
    mine = [r for r in history.records if r.gpu_type == gpu_type]
    return capacity_stats(gpu_type, [gpu_type], mine, history, config)


def capacity_stats(
    name: str, types: list[str], mine: list[Record], history: History, config: FleetConfig
) -> PoolStats:
    end, start = history.end, history.start
    s = series((sp for r in mine for sp in spans(r, end)), end)
    capacity = sum(config.gpus_of_type(t) for t in types)
    demand = s.demand()
    peak = max(demand, default=0)
    i = demand.index(peak) if demand else None
    mean_held = mean_level(s, start, [h for h, _ in s.levels])
    return PoolStats(
        name=name,
        gpu_types=types,
        capacity_gpus=capacity,
        mean_held_gpus=mean_held,
        mean_demand_gpus=mean_level(s, start, demand),
        utilisation=mean_held / capacity if capacity else 0.0,
        peak_demand_gpus=peak,
        peak_at=s.times[i] if i is not None else None,
        peak_held_gpus=s.levels[i][0] if i is not None else 0,
        peak_waiting_gpus=s.levels[i][1] if i is not None else 0,
        peak_shortfall_gpus=max(0, peak - capacity),
        sustained_shortfall_gpus=sustained_excess(s, capacity),
        hours_over_capacity=sum(
            d for v, d in zip(demand, s.durations(), strict=True) if v > capacity
        )
        / 3600.0,
        wait=wait_stats(mine, end),
        series=s,
    )
