"""Fair scheduling: Slurm-style multifactor priority with fair share and aging.

score = w_p * P + w_f * F + w_a * A, where P is the priority level (0.25 .. 1), F = 2^(-U/S)
is the fair-share factor (U: the project's share of half-life-decayed GPU-hours, S: its
normalised share), and A grows from 0 to 1 over `age_max_hours` of waiting, so nothing starves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from fleet.config import SchedulerSettings
from fleet.models import CUT_BY_BUDGET, Priority, RecordSummary, utc

# (GPUs, hours held, ended at (epoch s), release reason, mean utilisation % or None)
Record = tuple[int, float, float, float, str, float | None]  # count, hours, hoarded h, ...

PRIORITY_FACTOR: dict[Priority, float] = {
    Priority.LOW: 0.25,
    Priority.NORMAL: 0.5,
    Priority.HIGH: 0.75,
    Priority.CRITICAL: 1.0,
}


def decayed(value: float, since: float, now: float, half_life_hours: float) -> float:
    return value * float(2.0 ** (-max(0.0, now - since) / (half_life_hours * 3600.0)))


def summarise(records: Iterable[Record], at: float, half_life_hours: float) -> RecordSummary:
    """A project's older history as GPU-hour sums, each record decayed from its end to `at`."""
    out = RecordSummary(at=utc(at))
    for count, hours, hoarded_hours, ended_at, reason, util in records:
        w = decayed(count * hours, ended_at, at, half_life_hours)
        out.events += 1
        out.gpu_hours += w
        out.hoarded_gpu_hours += decayed(count * hoarded_hours, ended_at, at, half_life_hours)
        out.budget_gpu_hours += w if reason in CUT_BY_BUDGET else 0.0
        if util is not None:
            out.rated_gpu_hours += w
            out.util_gpu_hours += w * util
    return out


def fair_share_factors(
    usage: Mapping[str, float], shares: Mapping[str, float], projects: Iterable[str]
) -> dict[str, float]:
    """F = 2^(-U/S) for each project, over the projects that compete now."""
    names = sorted(set(projects) | set(usage))
    total_usage = sum(usage.get(p, 0.0) for p in names)
    total_shares = sum(shares.get(p, 1.0) for p in names)
    factors = {}
    for p in names:
        u = usage.get(p, 0.0) / total_usage if total_usage > 0 else 0.0
        s = shares.get(p, 1.0) / total_shares
        factors[p] = 2.0 ** (-u / s)
    return factors


def score(
    priority: Priority, fair_share: float, waited_seconds: float, settings: SchedulerSettings
) -> float:
    return scorer(settings)(priority, fair_share, waited_seconds)


def scorer(settings: SchedulerSettings) -> Callable[[Priority, float, float], float]:
    """`score` with the settings read once: placement scores every waiting request at every
    decision."""
    w_p, w_f, w_a = settings.weight_priority, settings.weight_fairshare, settings.weight_age
    age_max = settings.age_max_hours * 3600.0

    def of(priority: Priority, fair_share: float, waited_seconds: float) -> float:
        age = min(1.0, max(0.0, waited_seconds) / age_max)
        return w_p * PRIORITY_FACTOR[priority] + w_f * fair_share + w_a * age

    return of
