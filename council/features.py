"""What the council reads about a request: the request itself, its project's standing and
recent record, and how busy the pool is. The neural council reads the same record."""

from __future__ import annotations

from dataclasses import dataclass, replace

from council.record import PastJob, past_jobs, rates
from fleet.config import FleetConfig
from fleet.models import (
    GPURequest,
    Priced,
    Priority,
    ProjectStats,
    Purpose,
    RecordSummary,
    RouteDecision,
)
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
    priced: Priced | None = None  # the route worst_case_usd is priced on
    # the record itself, which the neural council reads event by event
    past: tuple[PastJob, ...] = ()
    older: RecordSummary | None = None
    now: float = 0.0  # epoch seconds when the request was judged


def cheapest(request: GPURequest, config: FleetConfig) -> Priced:
    """The request priced on the cheapest type it may run on (its named type, if any)."""
    types = [request.gpu_type] if request.gpu_type else config.pool(request.purpose)
    t = min(types, key=lambda t: estimate(request, config, t)[1])
    hours, cost = estimate(request, config, t)
    return Priced(
        gpu_type=t,
        count=request.count,
        price_per_hour=config.catalog[t].price_per_hour,
        hours=hours,
        cost_usd=cost,
    )


def routed(route: RouteDecision, count: int) -> Priced:
    """The request priced on the route it would take: what the council judges, on the whole
    lease it asked for (not one the budget shortened: the training worlds price it so, and
    a request the budget cannot take whole is not a small one)."""
    hours = route.asked_hours or route.est_hours
    return Priced(
        gpu_type=route.gpu_type,
        count=count,
        price_per_hour=route.price_per_hour,
        hours=hours,
        cost_usd=route.price_per_hour * count * hours,
    )


def cost_pressure(worst_usd: float, remaining_usd: float | None) -> float:
    """Worst case over the remaining budget (over REFERENCE_USD without one), capped at 10."""
    if remaining_usd is None:
        return min(worst_usd / REFERENCE_USD, 10.0)
    return min(worst_usd / remaining_usd, 10.0) if remaining_usd > 0 else 10.0


def build_features(
    request: GPURequest,
    config: FleetConfig,
    stats: ProjectStats,
    held: dict[str, int],
    now: float,
    remaining_usd: float | None = None,
    priced: Priced | None = None,
) -> RequestFeatures:
    """`held` maps GPU type to GPUs held now; `remaining_usd` is the largest worst case the
    budget admits now (Ledger.remaining_usd: the rule placement applies), by default the
    budget less spend and the active allocations' worst cases; `priced` the route the request
    would take (default: the cheapest type). A record that ended after
    `now` (written by a host whose clock runs ahead) counts as ending now."""
    remaining = stats.remaining_usd if remaining_usd is None else remaining_usd
    return assemble(
        request,
        config,
        Standing(remaining, stats.usage_share, stats.fair_share),
        tuple(replace(j, ended_at=now) if now < j.ended_at else j for j in past_jobs(stats)),
        stats.older,
        held,
        now,
        priced,
    )


@dataclass(frozen=True)
class Standing:
    remaining_usd: float | None  # None: no budget
    usage_share: float
    fair_share: float


def assemble(
    request: GPURequest,
    config: FleetConfig,
    standing: Standing,
    past: tuple[PastJob, ...],
    older: RecordSummary | None,
    held: dict[str, int],
    now: float,
    priced: Priced | None = None,
) -> RequestFeatures:
    """The features from their parts; the training replay calls this without a ledger.
    `priced`: the route the request would take (default: the cheapest type)."""
    record = rates(
        past,
        older,
        now,
        config.council.record_half_life_days,
        config.council.record_prior_gpu_hours,
    )
    priced = priced or cheapest(request, config)
    worst = priced.cost_usd
    remaining = standing.remaining_usd
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
        cost_pressure=cost_pressure(worst, remaining),
        budgeted=remaining is not None,
        usage_share=standing.usage_share,
        fair_share=standing.fair_share,
        pool_share=request.count / pool_total,
        pool_busy=sum(held.get(t, 0) for t in pool) / pool_total,
        hoarding_rate=record.hoarding,
        overrun_rate=record.overrun,
        recent_util=record.util,
        history_len=len(past) + (older.events if older else 0),
        purpose_mismatch=1.0 if mismatch else 0.0,
        priced=priced,
        past=past,
        older=older,
        now=now,
    )


def is_critical(request: GPURequest) -> bool:
    return request.priority is Priority.CRITICAL
