"""The placement decision, as a pure function of what the ledger sees inside its transaction.

Order of the hard rules: budget (deny), quota (wait), fair order (wait behind every waiting
request of the same type that scores higher), capacity (wait), then topology picks the GPUs.
A waiting request that stopped polling (its caller left with --no-wait) keeps its place in
line but blocks nobody until it is resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from fleet.budget import EPS
from fleet.config import FleetConfig
from fleet.models import GPUInfo, Priority
from fleet.scheduler import fair_share_factors, score
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


@dataclass(frozen=True)
class Snapshot:
    """The fleet as one transaction sees it."""

    now: float
    free: list[GPUInfo]  # free GPUs of the requested type
    waiting: list[Ticket]  # other queued requests for the same type
    usage: Mapping[str, float]  # decayed GPU-hours per project, active allocations included
    active_gpus: Mapping[str, int]  # GPUs held per project
    budget_usd: float | None  # the requesting project's budget
    spent_usd: float
    committed_usd: float  # worst case of the project's active allocations


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


def decide(
    me: Ticket,
    worst_case_usd: float,
    snap: Snapshot,
    config: FleetConfig,
    topology: Topology,
) -> Decision:
    if snap.budget_usd is not None:
        remaining = snap.budget_usd - snap.spent_usd - snap.committed_usd
        if worst_case_usd > remaining + EPS:
            return Decision(
                Kind.DENY,
                f"budget: worst case ${worst_case_usd:.2f} > remaining ${max(remaining, 0):.2f} "
                f"of {me.project}'s ${snap.budget_usd:.2f}",
            )
    quota = config.quotas.max_gpus(me.project)
    held = snap.active_gpus.get(me.project, 0)
    if quota is not None and held + me.count > quota:
        return Decision(Kind.QUEUE, f"quota: {me.project} holds {held} of its {quota} GPUs")

    ahead = ahead_of(me, snap, config)
    free = len(snap.free)
    available = free - sum(t.count for t in ahead)
    if me.count > available:
        line = f", {len(ahead)} waiting request(s) ahead" if ahead else ""
        return Decision(
            Kind.QUEUE, f"capacity: {free} {me.gpu_type} free, {me.count} needed{line}"
        )
    gpus = topology.choose(snap.free, me.count)
    assert gpus is not None  # me.count <= available <= free
    return Decision(Kind.PLACE, f"placed on {', '.join(sorted({g.node for g in gpus}))}", gpus)


def ahead_of(me: Ticket, snap: Snapshot, config: FleetConfig) -> list[Ticket]:
    """Live waiting requests for the same type that go before `me` in the fair order."""
    live = _live(snap, config)
    if not live:
        return []
    key = _fair_key(snap, config, [me, *live])
    mine = key(me)
    return [t for t in live if key(t) > mine]


def in_line(snap: Snapshot, config: FleetConfig) -> list[Ticket]:
    """The waiting requests that `decide` would place now, in fair order: the longest head of
    the line whose GPUs fit in the free ones (no backfill: one that does not fit holds up
    everyone behind it). Whom to wake when GPUs are freed."""
    live = _live(snap, config)
    if not live:
        return []
    free, out = len(snap.free), []
    for t in sorted(live, key=_fair_key(snap, config, live), reverse=True):
        if t.count > free:
            break
        free -= t.count
        out.append(t)
    return out


def _live(snap: Snapshot, config: FleetConfig) -> list[Ticket]:
    """Waiting requests still polling and not held back by their quota."""
    settings = config.scheduler
    stale_after = settings.stale_after_polls * settings.poll_seconds
    return [t for t in snap.waiting
            if snap.now - t.heartbeat_at <= stale_after and not _over_quota(t, snap, config)]


def _fair_key(snap: Snapshot, config: FleetConfig,
              tickets: list[Ticket]) -> Callable[[Ticket], tuple[float, float]]:
    """Multifactor score (then the earlier request) among the projects of `tickets`."""
    settings = config.scheduler
    factors = fair_share_factors(snap.usage, config.shares, [t.project for t in tickets])

    def key(t: Ticket) -> tuple[float, float]:
        return (score(t.priority, factors[t.project], snap.now - t.enqueued_at, settings),
                -t.enqueued_at)

    return key


def _over_quota(t: Ticket, snap: Snapshot, config: FleetConfig) -> bool:
    quota = config.quotas.max_gpus(t.project)
    return quota is not None and snap.active_gpus.get(t.project, 0) + t.count > quota
