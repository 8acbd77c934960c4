"""The placement decision, as a pure function of what the ledger sees inside its transaction.

Order of the hard rules: budget (deny), quota (wait), then the fair line of the type with EASY
backfill (fleet.backfill): in fair order, each request starts while GPUs are free for it; the
first that does not fit gets a reservation, and a later one starts now only if it fits in the
free GPUs left and does not delay that reservation. Then topology picks the GPUs. A waiting
request that stopped polling (its caller left with --no-wait) keeps its place in line but
blocks nobody until it is resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from fleet.backfill import Ending, Reservation, backfill, reserve
from fleet.budget import admissible_usd, admits, admitted_hours, even_shortened
from fleet.config import FleetConfig
from fleet.models import GPUInfo, Priority, utc
from fleet.scheduler import PRIORITY_FACTOR, fair_share_factors, scorer
from fleet.topology import Topology


@dataclass(frozen=True)
class Ticket:
    allocation_id: str
    project: str
    gpu_type: str
    count: int
    priority: Priority
    enqueued_at: float
    heartbeat_at: float
    hours: float  # its lease, once placed: when its GPUs come back
    resumes: bool = False  # it goes on with released work: it queues as if it had aged fully
    attained: float = 0.0  # effective hours its work received before (fleet.maxmin)


@dataclass(frozen=True)
class Snapshot:
    """The fleet as one transaction sees it."""

    now: float
    free: list[GPUInfo]  # free GPUs of the requested type
    waiting: list[Ticket]  # other queued requests for the same type
    endings: list[Ending]  # when the type's running allocations let their GPUs go
    usage: Mapping[str, float]  # decayed GPU-hours per project, active allocations included
    active_gpus: Mapping[str, int]  # GPUs held per project
    budget_usd: float | None  # the requesting project's budget
    spent_usd: float
    committed_usd: float  # expected cost of the project's active allocations
    usage_factor: float = 1.0  # the project's q (fleet.budget): expected cost / worst case


class Kind(StrEnum):
    PLACE = "place"
    QUEUE = "queue"
    DENY = "deny"
    GONE = "gone"  # the request's allocation already ended (cancelled or released)


@dataclass(frozen=True)
class Decision:
    kind: Kind
    reason: str
    gpus: list[GPUInfo] = field(default_factory=list)
    hours: float | None = None  # a placement's lease: the route's, or what the budget admits


def decide(
    me: Ticket,
    worst_case_usd: float,
    snap: Snapshot,
    config: FleetConfig,
    topology: Topology,
    work_hours: float | None = None,
) -> Decision:
    """Place, queue or deny `me`, whose lease (me.hours) costs at most `worst_case_usd`;
    `work_hours`: what its work is expected to take, where the lease is longer (a faster type
    than the hours asked): the budget may shorten the lease to min_lease_share of that, not
    of the lease."""
    asked = me.hours  # the route's lease
    share = config.limits.min_lease_share * min(1.0, (work_hours or asked) / asked)
    if snap.budget_usd is not None:
        rate = worst_case_usd / me.hours
        # the lease the budget less the spend admits: never more, and never shortened for
        # what the running allocations hold, which comes back when they end
        lease = admitted_hours(
            me.hours,
            rate,
            admissible_usd(snap.budget_usd, snap.spent_usd, 0.0, snap.usage_factor),
            share,
        )
        expected = (
            f"expected ${worst_case_usd * snap.usage_factor:.2f} (worst case ${worst_case_usd:.2f})"
        )
        if lease is None:
            left = max(snap.budget_usd - snap.spent_usd, 0)
            return Decision(
                Kind.DENY,
                f"budget: {expected} > the ${left:.2f} left of "
                f"{me.project}'s ${snap.budget_usd:.2f}" + even_shortened(share),
            )
        if not admits(
            lease * rate,
            admissible_usd(snap.budget_usd, snap.spent_usd, snap.committed_usd, snap.usage_factor),
        ):
            return Decision(
                Kind.QUEUE,
                f"budget: {expected} waits for the "
                f"${snap.committed_usd:.2f} {me.project}'s running allocations "
                "are expected to cost",
            )
        me = replace(me, hours=lease) if lease < asked else me
    quota = config.quotas.max_gpus(me.project)
    held = snap.active_gpus.get(me.project, 0)
    if quota is not None and held + me.count > quota:
        return Decision(Kind.QUEUE, f"quota: {me.project} holds {held} of its {quota} GPUs")

    line = line_order(snap, config, [me, *live(snap, config)])
    plan = plan_line(line, snap)
    if me not in plan.start:
        return Decision(Kind.QUEUE, _why_waiting(me, line, plan, snap))
    gpus = topology.choose(snap.free, me.count)
    assert gpus is not None  # it starts: its GPUs are among the free ones
    why = f"placed on {', '.join(sorted({g.node for g in gpus}))}"
    if me.hours < asked:
        why += f"; the project's budget shortens its lease to {me.hours:.2f} h"
    return Decision(Kind.PLACE, why, gpus, me.hours)


@dataclass(frozen=True)
class Plan:
    """One EASY-backfill pass over a line: who starts now, and who waits with a reservation."""

    start: list[Ticket]
    head: Ticket | None  # the first request that cannot start now
    reservation: Reservation | None  # the head's


def plan_line(line: list[Ticket], snap: Snapshot) -> Plan:
    """In fair order, each request starts while the free GPUs hold it; the first that does not
    fit gets the reservation, and each later one starts only if it fits in the free GPUs left
    and `backfill` says it does not delay the reservation."""
    free = len(snap.free)
    start: list[Ticket] = []
    head: Ticket | None = None
    reservation: Reservation | None = None
    for t in line:
        if t.count > free:
            if head is None:
                head = t
                started = [Ending(_ends_at(s, snap.now), s.count) for s in start]
                reservation = reserve(t.count, free, [*snap.endings, *started], snap.now)
            continue
        if reservation is not None:
            left = backfill(t.count, _ends_at(t, snap.now), reservation)
            if left is None:
                continue
            reservation = left
        free -= t.count
        start.append(t)
    return Plan(start, head, reservation)


def in_line(snap: Snapshot, config: FleetConfig) -> list[Ticket]:
    """The waiting requests that `decide` would place now, in fair order (backfilled ones
    included): whom to wake when GPUs are freed."""
    waiting = live(snap, config)
    if not waiting:
        return []
    return plan_line(line_order(snap, config, waiting), snap).start


def _ends_at(t: Ticket, now: float) -> float:
    return now + t.hours * 3600.0


def _why_waiting(me: Ticket, line: list[Ticket], plan: Plan, snap: Snapshot) -> str:
    ahead = line.index(me)
    why = f"capacity: {len(snap.free)} {me.gpu_type} free, {me.count} needed"
    why += f", {ahead} waiting request(s) ahead" if ahead else ""
    res = plan.reservation
    if res is None or res.at == math.inf:
        return why
    when = f"{utc(res.at):%Y-%m-%d %H:%M} UTC"
    if plan.head is me:
        return f"{why}; reserved for it from {when}"
    return f"{why}; the head of the line has GPUs reserved from {when}"


def live(snap: Snapshot, config: FleetConfig) -> list[Ticket]:
    """Waiting requests still polling and not held back by their quota."""
    settings = config.scheduler
    stale_after = settings.stale_after_polls * settings.poll_seconds
    return [
        t
        for t in snap.waiting
        if snap.now - t.heartbeat_at <= stale_after and not _over_quota(t, snap, config)
    ]


def line_order(snap: Snapshot, config: FleetConfig, tickets: list[Ticket]) -> list[Ticket]:
    """A type's line in the order [scheduler] policy serves it: "fair-share", the multifactor
    score; "max-min" or "least-attained" (fleet.maxmin), priority levels first, then the least
    served, then the multifactor score, then the earlier request."""
    fair = _fair_key(snap, config, tickets)
    if config.scheduler.policy == "fair-share":
        return sorted(tickets, key=fair, reverse=True)
    return sorted(
        tickets,
        key=lambda t: (-PRIORITY_FACTOR[t.priority], t.attained, -fair(t)[0], t.enqueued_at),
    )


def _fair_key(
    snap: Snapshot, config: FleetConfig, tickets: list[Ticket]
) -> Callable[[Ticket], tuple[float, float]]:
    """Multifactor score (then the earlier request) among the projects of `tickets`."""
    settings = config.scheduler
    factors = fair_share_factors(snap.usage, config.shares, [t.project for t in tickets])
    of, now, aged = scorer(settings), snap.now, settings.age_max_hours * 3600.0

    def key(t: Ticket) -> tuple[float, float]:
        waited = now - t.enqueued_at
        if t.resumes:  # released work goes back ahead of new work of its standing
            waited = max(waited, aged)
        return (of(t.priority, factors[t.project], waited), -t.enqueued_at)

    return key


def _over_quota(t: Ticket, snap: Snapshot, config: FleetConfig) -> bool:
    quota = config.quotas.max_gpus(t.project)
    return quota is not None and snap.active_gpus.get(t.project, 0) + t.count > quota
