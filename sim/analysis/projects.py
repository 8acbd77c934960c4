"""Per project: GPU-hours, cost, idle and hoarded GPU-hours (hoarded as the `sim.analysis`
docstring defines it), peaks, quota and budget."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.config import FleetConfig
from sim.analysis.history import History, Record
from sim.analysis.timeseries import held_hours, series, spans


def hoarded_gpu_hours(r: Record, end: float, config: FleetConfig) -> float:
    """A lower bound on the GPU-hours this allocation held idle (see the module docstring)."""
    gpu_h = r.count * held_hours(r, end)
    floor = 0.0
    if r.hoarded_hours is not None:  # what the ledger measured: held idle with no work left
        floor = min(gpu_h, r.count * r.hoarded_hours)
    elif r.reason == "idle":
        floor = min(gpu_h, r.count * config.monitor.idle_timeout_minutes / 60.0)
    threshold = config.monitor.idle_util_pct
    if r.mean_util is not None and threshold > 0:
        floor = max(floor, gpu_h * max(0.0, 1.0 - r.mean_util / threshold))
    return floor


@dataclass(frozen=True)
class ProjectUsage:
    project: str
    allocations: int
    gpu_hours: float
    cost_usd: float
    mean_util_pct: float | None  # GPU-hour weighted, over allocations with a reading
    idle_gpu_hours: float
    hoarded_gpu_hours: float
    hoarded_share: float
    idle_releases: int
    peak_held_gpus: int
    peak_demand_gpus: int
    quota_gpus: int | None
    budget_usd: float | None


def cost_of(r: Record, end: float) -> float:
    if r.state == "active":
        return r.price_per_hour * r.count * held_hours(r, end)
    return r.cost_usd or 0.0


def project_usage(project: str, history: History, config: FleetConfig) -> ProjectUsage:
    end = history.end
    mine = [r for r in history.records if r.project == project]
    gpu_h = {r.id: r.count * held_hours(r, end) for r in mine}
    rated = [r for r in mine if r.mean_util is not None and gpu_h[r.id] > 0]
    rated_h = sum(gpu_h[r.id] for r in rated)
    hoarded = sum(hoarded_gpu_hours(r, end, config) for r in mine)
    total = sum(gpu_h.values())
    s = series((sp for r in mine for sp in spans(r, end)), end)
    return ProjectUsage(
        project=project,
        allocations=len(mine),
        gpu_hours=total,
        cost_usd=sum(cost_of(r, end) for r in mine),
        mean_util_pct=sum(gpu_h[r.id] * (r.mean_util or 0.0) for r in rated) / rated_h
        if rated_h
        else None,
        idle_gpu_hours=sum(gpu_h[r.id] * (1 - (r.mean_util or 0.0) / 100) for r in rated),
        hoarded_gpu_hours=hoarded,
        hoarded_share=hoarded / total if total else 0.0,
        idle_releases=sum(1 for r in mine if r.reason == "idle"),
        peak_held_gpus=max((h for h, _ in s.levels), default=0),
        peak_demand_gpus=max(s.demand(), default=0),
        quota_gpus=config.quotas.projects.get(project),
        budget_usd=history.budgets.get(project),
    )
