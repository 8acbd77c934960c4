"""What the ledger hands out: an allocation's row (and how it is read), its lease, an audit
entry, a placement's result, a project's cost, and the id a thread's request is placed under."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from fleet.budget import Moved
from fleet.models import Allocation, Purpose, Release, ReleaseReason, utc
from fleet.placement import Decision

EPS_S = 0.001  # a lease end within this of the one expected is the same
NOT_RENEWED = "not-renewed"  # the audit action (and key prefix) of a term its monitor let end


def allocation_id(thread_id: str, request_id: str) -> str:
    """Deterministic, so that a re-run of the allocate node finds its own allocation."""
    return "a-" + hashlib.sha1(f"{thread_id}:{request_id}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LedgerRow:
    """An allocation as the ledger stores it: queued, active or released."""

    id: str
    thread_id: str
    request_id: str
    project: str
    purpose: Purpose
    priority: str
    gpu_type: str
    count: int
    price_per_hour: float
    hours: float
    state: str
    enqueued_at: float
    heartbeat_at: float
    started_at: float | None
    lease_end: float | None
    deadline: float | None
    deadline_reason: ReleaseReason | None
    released_at: float | None
    release_reason: ReleaseReason | None
    cost_usd: float | None
    util_sum: float
    util_n: int
    gpu_ids: list[str]
    nodes: list[str]
    ticks: int = 0
    util_last: float | None = None  # the last tick's mean utilisation
    busy_at_start: float | None = None  # share of the fleet held by others when it started
    renew_hours: float | None = None  # its term, while it is held a term at a time

    @property
    def rate_usd_per_s(self) -> float:
        return self.price_per_hour * self.count / 3600.0

    @property
    def mean_util(self) -> float | None:
        return self.util_sum / self.util_n if self.util_n else None

    def to_allocation(self) -> Allocation:
        assert self.started_at is not None and self.lease_end is not None
        return Allocation(
            id=self.id,
            request_id=self.request_id,
            thread_id=self.thread_id,
            project=self.project,
            gpu_type=self.gpu_type,
            count=self.count,
            gpu_ids=self.gpu_ids,
            node="+".join(self.nodes),
            nodes=self.nodes,
            price_per_hour=self.price_per_hour,
            started_at=utc(self.started_at),
            lease_end=utc(self.lease_end),
            cuda_visible_devices=",".join(self.gpu_ids),
            term_hours=self.renew_hours,
            renewed_up_to=(
                None if self.renew_hours is None else utc(self.started_at + self.hours * 3600.0)
            ),
        )

    def to_release(self) -> Release:
        assert self.released_at is not None and self.release_reason is not None
        held = (self.released_at - self.started_at) if self.started_at is not None else 0.0
        return Release(
            allocation_id=self.id,
            reason=self.release_reason,
            released_at=utc(self.released_at),
            hours=held / 3600.0,
            cost_usd=self.cost_usd or 0.0,
            mean_util_pct=self.mean_util,
        )

    @property
    def budget_cuts(self) -> bool:
        """Its project's budget runs out before its lease ends (Budgets moves the deadline,
        never the lease): it is released then, reason budget, unless the budget is raised."""
        return (
            self.deadline is not None
            and self.lease_end is not None
            and self.deadline < self.lease_end - EPS_S
        )


@dataclass(frozen=True)
class Resumed:
    """What a request that resumes released work learns from the release (Ledger.resume)."""

    pause_s: float  # the longest pause the work has come back from
    working: bool  # it went on at once after an idle release: it works while looking idle
    # the allocation it resumes, or one before it along the chain of resumes, was released
    # for idling or its term not renewed: its idleness misled once, so the council's stricter
    # idle release (council.guardrails), the stream's and a term's refusal do not apply again
    idle_released: bool = False


@dataclass(frozen=True)
class Lease:
    """Where an allocation's lease stands: what a monitor reads at every tick."""

    state: str
    deadline: float | None
    deadline_reason: ReleaseReason | None
    released_at: float | None
    release_reason: ReleaseReason | None
    # its latest command under `gpu-agent run` (fleet.commands.work reads these)
    command_owner: str | None = None
    command_ended_at: float | None = None
    # where it is held a term at a time (Ledger.renew): its term's end and length
    lease_end: float | None = None
    renew_hours: float | None = None
    asked_end: float | None = None  # where the lease asked ends (its start and hours)
    command_beat_at: float | None = None  # wall clock: its `run` last said it lives

    @property
    def yields(self) -> bool:
        """A preemption cut its lease (fleet.ledger.preempting): no term left, and an end
        before the lease asked (what Budgets._fit_deadlines reads as a yield)."""
        return (
            self.renew_hours is None
            and self.lease_end is not None
            and self.asked_end is not None
            and self.lease_end < self.asked_end - EPS_S
        )

    def held(self, allocation: Allocation, declined: bool = False) -> Allocation:
        """`allocation` (a thread's) as the ledger holds it now, so that the thread describes
        the lease that applies: its lease's (or term's) end; where a preemption cut it, or
        its monitor let its term end (`declined`: Renewing.decline), no term any more, and
        why (a cut stands: nothing renews it again)."""
        if self.lease_end is None:
            return allocation
        cut = (
            (  # a caller's release waits for its command (Ledger.end_now), or a preemption
                ReleaseReason.EXPLICIT.value
                if self.deadline_reason is ReleaseReason.EXPLICIT
                else ReleaseReason.PREEMPTED.value
            )
            if self.yields
            else NOT_RENEWED
            if declined
            else allocation.lease_cut
        )
        update: dict[str, Any] = {}
        if abs(self.lease_end - allocation.lease_end.timestamp()) > EPS_S:
            update["lease_end"] = utc(self.lease_end)
        if cut != allocation.lease_cut:
            update |= {"term_hours": None, "renewed_up_to": None, "lease_cut": cut}
        # the same object where nothing changed: the monitor asks at every tick
        return allocation.model_copy(update=update) if update else allocation

    @property
    def renewable(self) -> bool:
        """Whether it holds a term its monitor has to decide on renewing (term_open)."""
        return term_open(
            self.state, self.renew_hours, self.lease_end, self.deadline, self.deadline_reason
        )


def term_open(
    state: str,
    renew_hours: float | None,
    lease_end: float | None,
    deadline: float | None,
    deadline_reason: ReleaseReason | None,
) -> bool:
    """Whether an allocation holds a term still to be renewed or not: active, held a term at
    a time, and ending with its term (not where its lease runs whole, or a budget or a
    preemption set its end)."""
    return (
        state == "active"
        and renew_hours is not None
        and lease_end is not None
        and deadline == lease_end
        and deadline_reason is ReleaseReason.LEASE_EXPIRED
    )


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log: who did what to which request or project, and why."""

    key: str  # what makes it happen once: a re-run of the same step appends nothing
    at: float
    who: str
    action: str  # approve, deny, decide, release, cancel, budget, preempt, reclaim, renew, ...
    project: str
    target: str  # an allocation id, a thread id or a project
    detail: str

    def row(self) -> tuple[str, float, str, str, str, str, str]:
        """Its values in AUDIT's order (dataclasses.astuple copies each deeply)."""
        return (self.key, self.at, self.who, self.action, self.project, self.target, self.detail)


AUDIT = (
    "INSERT INTO audit (key, at, who, action, project, target, detail) "
    "VALUES (?,?,?,?,?,?,?) ON CONFLICT (key) DO NOTHING"
)


@dataclass(frozen=True)
class PlaceResult:
    decision: Decision
    row: LedgerRow | None  # None only when a fresh request is denied
    moved: list[Moved] = field(default_factory=list)  # others' deadlines the placement moved


@dataclass(frozen=True)
class ProjectCost:
    project: str
    spent_usd: float
    accrued_usd: float  # active allocations, so far
    committed_usd: float  # active allocations, worst case
    budget_usd: float | None


ROW = "SELECT " + ", ".join(f.name for f in fields(LedgerRow)) + " FROM allocations"
_AT = {f.name: i for i, f in enumerate(fields(LedgerRow))}


def read_row(r: Any) -> LedgerRow:
    """A row selected with ROW (its columns in LedgerRow's order)."""
    v = list(r)
    v[_AT["purpose"]] = Purpose(v[_AT["purpose"]])
    for name in ("deadline_reason", "release_reason"):
        v[_AT[name]] = ReleaseReason(v[_AT[name]]) if v[_AT[name]] else None
    for name in ("gpu_ids", "nodes"):
        v[_AT[name]] = json.loads(v[_AT[name]])
    return LedgerRow(*v)
