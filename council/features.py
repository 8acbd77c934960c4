"""What the council reads about a request: the request itself, its project's standing and
recent record, and how busy the pool is. The neural council reads the same record."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.config import FleetConfig
from fleet.models import GPURequest, HistoryRecord, Priority, ProjectStats, Purpose, ReleaseReason
from fleet.routing import estimate
from fleet.scheduler import PRIORITY_FACTOR

REFERENCE_USD = 500.0  # the scale of "expensive" for a project without a budget


@dataclass(frozen=True)
class RequestFeatures:
    count: int
    hours: float
    priority: float
    worst_case_usd: float
    cost_pressure: float  # worst case / remaining budget (or / REFERENCE_USD without one)
    budgeted: bool  # whether the project has a budget
    usage_share: float
    fair_share: float
    pool_share: float  # requested GPUs / GPUs in the pool
    pool_busy: float  # held / total in the pool, now
    hoarding_rate: float  # share of recent GPU-hours released for idling
    overrun_rate: float  # share of recent GPU-hours released for budget
    recent_util: float  # GPU-hour-weighted mean utilisation of recent allocations (50 if none)
    history_len: int
    purpose_mismatch: float  # 1 when inference or research asks for training hardware


def _weighted(records: list[HistoryRecord], pick: set[ReleaseReason]) -> float:
    total = sum(r.count * r.hours for r in records)
    if total <= 0:
        return 0.0
    return sum(r.count * r.hours for r in records if r.reason in pick) / total


def _recent_util(records: list[HistoryRecord]) -> float:
    rated = [r for r in records if r.mean_util_pct is not None and r.hours > 0]
    weight = sum(r.count * r.hours for r in rated)
    if weight <= 0:
        return 50.0
    return sum((r.mean_util_pct or 0.0) * r.count * r.hours for r in rated) / weight


def build_features(
    request: GPURequest, config: FleetConfig, stats: ProjectStats, held: dict[str, int]
) -> RequestFeatures:
    """`held` maps GPU type to GPUs held now."""
    types = [request.gpu_type] if request.gpu_type else config.pool(request.purpose)
    worst = min(estimate(request, config, t)[1] for t in types)
    remaining = stats.remaining_usd
    if remaining is None:
        pressure = worst / REFERENCE_USD
    else:
        pressure = worst / remaining if remaining > 0 else 10.0
    pool = config.pool(request.purpose)
    pool_total = sum(config.gpus_of_type(t) for t in pool)
    training = set(config.pool(Purpose.TRAINING))
    mismatch = (
        request.purpose is not Purpose.TRAINING
        and request.gpu_type is not None
        and request.gpu_type in training
    )
    return RequestFeatures(
        count=request.count,
        hours=request.duration_hours,
        priority=PRIORITY_FACTOR[request.priority],
        worst_case_usd=worst,
        cost_pressure=min(pressure, 10.0),
        budgeted=remaining is not None,
        usage_share=stats.usage_share,
        fair_share=stats.fair_share,
        pool_share=request.count / pool_total,
        pool_busy=sum(held.get(t, 0) for t in pool) / pool_total,
        hoarding_rate=_weighted(stats.recent, {ReleaseReason.IDLE}),
        overrun_rate=_weighted(stats.recent, {ReleaseReason.BUDGET}),
        recent_util=_recent_util(stats.recent),
        history_len=len(stats.recent),
        purpose_mismatch=1.0 if mismatch else 0.0,
    )


def is_critical(request: GPURequest) -> bool:
    return request.priority is Priority.CRITICAL
