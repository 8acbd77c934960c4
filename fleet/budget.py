"""Budget arithmetic that makes overspending impossible by construction.

Every active allocation has a deadline, and it is charged at most price x GPUs x (deadline -
start). The deadlines, not admission, enforce the cap: whenever a project's allocation starts
or ends or its budget changes, its active allocations get deadlines (cut_deadlines) at which
their combined worst-case spend reaches the budget at most, each ending at its lease end or at
the moment the project's spend would reach the budget, whichever is first; the monitor
releases each at its deadline (reason budget).

So admission can price a request at what it is expected to cost rather than its worst case,
which reserved the padded leases of everything running and refused work that would have fit:
spent + the expected cost of every active allocation + the new one's must fit the budget.
An allocation is expected to cost q x its worst case (price x GPUs x leased hours), never
more than its deadline allows, where q, the project's usage factor, is the mean of held /
leased hours over its last 20 finished allocations and PRIOR_LEASES leases held for the
fleet's share: a mean, because admission sums the expected costs of everything running, and
a sum comes to the sum of the means (a quantile per allocation would price every one of them
at its worst case: on the Philly workload, where users pad leases about twofold, the 90th
percentile is a whole lease). A project without a record is expected to hold its leases as
the fleet's last FLEET_RECORDS finished allocations did (a whole lease on a new fleet), and
that prior weighs until its own record outweighs it; an allocation the budget stopped counts
as a whole lease (it would have run on); q is never below 0.1. When q is too low the price
is work cut at the budget, never spend above it.

What the expected cost of the running allocations holds comes back when they end, so a
request that only they keep out waits for them (as Slurm's jobs pend on an association's
limits); one that the spend alone keeps out is refused. A lease whose worst case the budget
less the spend cannot take whole is shortened to what that buys, down to min_lease_share of
it (admitted_hours), rather than refused; never for what the running allocations hold (on
the Philly slice, a lease shortened for that ran out before the work and its rerun no longer
fitted the budget, where waiting for the whole lease did all of the work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EPS = 1e-9
RECORDS = 20  # the finished allocations the usage factor reads, newest first
PRIOR_LEASES = 2  # leases, held for the fleet's share, the usage factor starts from
FLEET_RECORDS = 200  # the fleet's finished allocations that share is the mean of
MIN_FACTOR = 0.1


@dataclass(frozen=True)
class Running:
    id: str
    rate_usd_per_s: float
    started_at: float
    ends_at: float


@dataclass(frozen=True)
class Active:
    """An active allocation as admission sees it."""

    id: str
    rate_usd_per_s: float
    started_at: float
    lease_end: float
    deadline: float

    def expected_usd(self, factor: float) -> float:
        """Its share `factor` of the lease, never past its deadline."""
        return self.rate_usd_per_s * min(
            factor * (self.lease_end - self.started_at), self.deadline - self.started_at
        )

    def charged(self) -> Running:
        """As it is charged at the latest: until its deadline."""
        return Running(self.id, self.rate_usd_per_s, self.started_at, self.deadline)

    def running(self, now: float) -> Running:
        """As cut_deadlines reads it: free to run to its lease end, unless its deadline has
        passed (it is being released there, at a cost already fixed)."""
        ends_at = self.lease_end if self.deadline > now else self.deadline
        return Running(self.id, self.rate_usd_per_s, self.started_at, ends_at)


@dataclass(frozen=True)
class Moved:
    """An allocation whose deadline a budget change, or a start or end in its project, moved."""

    id: str
    before: float | None  # the deadline it had
    after: float  # the deadline it has now (its lease end when the budget no longer binds)

    @property
    def earlier(self) -> bool:
        return self.before is None or self.after < self.before


def describe_moves(moves: list[Moved]) -> str:
    """What a budget change did to running allocations, in words ('' if nothing)."""
    earlier = sum(m.earlier for m in moves)
    later = len(moves) - earlier
    parts = [
        f"{n} running allocation{'s' if n != 1 else ''} now end{'s' if n == 1 else ''} {when}"
        for n, when in (
            (earlier, "earlier (the budget runs out before their lease)"),
            (later, "later (back towards their lease)"),
        )
        if n
    ]
    return "; ".join(parts)


def used_share(held_hours: float, leased_hours: float, stopped_by_budget: bool) -> float:
    """Held / leased time of a finished allocation, in [0, 1]; one the budget stopped counts
    as its whole lease, since it would have run on."""
    if stopped_by_budget or leased_hours <= 0:
        return 1.0
    return min(1.0, max(0.0, held_hours / leased_hours))


def usage_factor(shares: list[float], prior: float = 1.0) -> float:
    """q: the mean of the newest RECORDS shares (newest first) and PRIOR_LEASES leases held
    for the share `prior` (the fleet's: the mean used_share of its newest FLEET_RECORDS
    finished allocations, a whole lease on a fleet without any); at least MIN_FACTOR."""
    recent = shares[:RECORDS]
    return max(MIN_FACTOR, (sum(recent) + prior * PRIOR_LEASES) / (len(recent) + PRIOR_LEASES))


def committed(active: list[Active], factor: float) -> float:
    """The expected cost of the active allocations."""
    return sum(a.expected_usd(factor) for a in active)


def admissible_usd(
    budget_usd: float, spent_usd: float, committed_usd: float, factor: float
) -> float:
    """The largest worst case a new request may have: factor x it must fit in what the spend
    and the expected cost of the active allocations (`committed_usd`) leave of the budget."""
    return (budget_usd - spent_usd - committed_usd) / factor


def admits(worst_usd: float, admissible: float | None) -> bool:
    """The admission rule, for the ledger and the pre-checks alike (None: no budget)."""
    return admissible is None or worst_usd <= admissible + EPS


def admitted_hours(
    hours: float, usd_per_hour: float, admissible: float | None, min_share: float
) -> float | None:
    """The lease the budget admits for one asking `hours` at `usd_per_hour`: all of it when
    its worst case fits `admissible`; else the hours `admissible` buys, when that is at least
    `min_share` of the lease (leases are padded, about twofold on Philly, so a shorter one
    mostly still does the work, and its deadline and notice end it at the budget, never past
    it); else None, a refusal."""
    if admits(hours * usd_per_hour, admissible):
        return hours
    assert admissible is not None
    bought = max(admissible, 0.0) / usd_per_hour
    return bought if bought > 0 and bought >= min_share * hours - EPS else None


def even_shortened(min_share: float) -> str:
    """What a budget refusal adds where leases may be shortened: not even that fitted."""
    return f", even for {min_share:.0%} of the lease" if min_share < 1 else ""


def worst_case(items: list[Running]) -> float:
    """What the allocations cost if each runs to its deadline."""
    return sum(r.rate_usd_per_s * (r.ends_at - r.started_at) for r in items)


def accrued(items: list[Running], at: float) -> float:
    return sum(r.rate_usd_per_s * max(0.0, min(at, r.ends_at) - r.started_at) for r in items)


def reaches_at(items: list[Running], amount_usd: float, now: float) -> float:
    """When the spend of `items` (accrued, from `now`, where it is at most `amount_usd`)
    reaches `amount_usd`; inf if it never does."""
    if accrued(items, max((r.ends_at for r in items), default=now)) <= amount_usd + EPS:
        return math.inf
    # accrued() is piecewise linear and increasing in T: walk its breakpoints, its slope
    # changing by an allocation's rate where it starts and ends (one sort, one pass).
    points = sorted({now, *(t for r in items for t in (r.started_at, r.ends_at) if t > now)})
    change: dict[float, float] = {}
    for r in items:
        for t, d in ((r.started_at, r.rate_usd_per_s), (r.ends_at, -r.rate_usd_per_s)):
            if t > now:
                change[t] = change.get(t, 0.0) + d
    rate = sum(r.rate_usd_per_s for r in items if r.started_at <= now < r.ends_at)
    spent, lo = accrued(items, now), now
    for hi in points:
        at_hi = spent + rate * (hi - lo)
        if at_hi >= amount_usd:
            t = lo + (amount_usd - spent) / rate if rate > 0 else lo
            return max(now, min(hi, t))
        spent, lo = at_hi, hi
        rate += change.get(hi, 0.0)
    return math.inf


def cut_deadlines(items: list[Running], remaining_usd: float, now: float) -> dict[str, float]:
    """Deadlines so that the spend of `items` stays within `remaining_usd`.

    All allocations run until a common time T (or their own lease end, if earlier), where T
    solves accrued(T) = remaining (reaches_at); one that starts after T ends as it starts.
    The caller guarantees accrued(now) <= remaining.
    """
    cut = reaches_at(items, remaining_usd, now)
    return {
        r.id: r.ends_at if cut == math.inf else min(r.ends_at, max(cut, r.started_at))
        for r in items
    }
