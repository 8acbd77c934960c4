"""A project's record as the council reads it: past allocations in time order, and what they
say about hoarding, overruns and utilisation.

Rates are GPU-hour weighted and decay with a half-life, so a project that reformed is
forgiven as newer, better work outweighs the old; a prior of `prior_gpu_hours` neutral
GPU-hours (nothing wasted, 50 % utilisation) keeps a short record from deciding alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet.models import HistoryRecord, ProjectStats, RecordSummary, ReleaseReason

PRIOR_UTIL = 50.0


@dataclass(frozen=True)
class PastJob:
    """One finished allocation, placed in time by when it ended (when its outcome was known)."""

    ended_at: float  # epoch seconds
    count: int
    hours: float
    cost_usd: float
    util_pct: float | None
    reason: ReleaseReason
    fleet_busy: float = 0.0  # share of the fleet's GPUs others held when it started
    hoarded_hours: float = 0.0  # held idle at the end with no work left (never the whole)
    lease_hours: float = 0.0  # the lease it was granted (0: unknown); hours / this is its use

    @property
    def gpu_hours(self) -> float:
        return self.count * self.hours


@dataclass(frozen=True)
class Rates:
    hoarding: float  # share of decayed GPU-hours held idle with no work left (hoarded)
    overrun: float  # share of decayed GPU-hours stopped by the budget
    util: float  # decayed GPU-hour weighted mean utilisation, %


def past_jobs(stats: ProjectStats) -> tuple[PastJob, ...]:
    """The ledger's newest-first records as oldest-first PastJobs."""
    busy = stats.fleet_busy or [0.0] * len(stats.recent)
    jobs = [_job(r, b) for r, b in zip(stats.recent, busy, strict=True)]
    return tuple(sorted(jobs, key=lambda j: j.ended_at))


def _job(r: HistoryRecord, busy: float) -> PastJob:
    """PastJob(...) without the frozen dataclass's __setattr__ per field, which more than
    doubled the cost (a decision reads 32 of them; tests/test_council_record.py checks that
    it is the same PastJob)."""
    job = object.__new__(PastJob)
    job.__dict__.update(
        ended_at=r.ended_at.timestamp(),
        count=r.count,
        hours=r.hours,
        cost_usd=r.cost_usd,
        util_pct=r.mean_util_pct,
        reason=r.reason,
        fleet_busy=busy,
        hoarded_hours=r.hoarded_hours,
        lease_hours=r.requested_hours,
    )
    return job


def rates(
    past: Sequence[PastJob],
    older: RecordSummary | None,
    now: float,
    half_life_days: float,
    prior_gpu_hours: float,
) -> Rates:
    def decay(at: float) -> float:
        return float(2.0 ** (-max(0.0, now - at) / (half_life_days * 86400.0)))

    total = idle = budget = rated = util = 0.0
    if older is not None and older.events:
        k = decay(older.at.timestamp())
        total, idle, budget = (
            k * older.gpu_hours,
            k * older.hoarded_gpu_hours,
            k * older.budget_gpu_hours,
        )
        rated, util = k * older.rated_gpu_hours, k * older.util_gpu_hours
    for j in past:
        k = decay(j.ended_at)
        w = j.gpu_hours * k
        total += w
        idle += j.count * j.hoarded_hours * k
        budget += w if j.reason.cut_by_budget else 0.0
        if j.util_pct is not None:
            rated += w
            util += w * j.util_pct
    weight = total + prior_gpu_hours
    if weight <= 0:
        return Rates(0.0, 0.0, PRIOR_UTIL)
    return Rates(
        hoarding=idle / weight,
        overrun=budget / weight,
        util=(util + prior_gpu_hours * PRIOR_UTIL) / (rated + prior_gpu_hours)
        if rated + prior_gpu_hours > 0
        else PRIOR_UTIL,
    )
