"""Every record the graph state and the ledger exchange.

This module is the stable home of the checkpointed types: LangGraph stores module and class
names with each checkpoint, so renaming or moving anything here breaks resumption of old
threads. Add fields with defaults; never rename.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet import names


class Purpose(StrEnum):
    TRAINING = "training"
    INFERENCE = "inference"
    RESEARCH = "research"


PURPOSE_ALIASES: dict[str, Purpose] = {
    "training": Purpose.TRAINING,
    "train": Purpose.TRAINING,
    "model_training": Purpose.TRAINING,
    "model-training": Purpose.TRAINING,
    "fine_tuning": Purpose.TRAINING,
    "fine-tuning": Purpose.TRAINING,
    "finetuning": Purpose.TRAINING,
    "pretraining": Purpose.TRAINING,
    "inference": Purpose.INFERENCE,
    "model_inference": Purpose.INFERENCE,
    "model-inference": Purpose.INFERENCE,
    "serving": Purpose.INFERENCE,
    "batch_inference": Purpose.INFERENCE,
    "research": Purpose.RESEARCH,
    "experiment": Purpose.RESEARCH,
    "experimentation": Purpose.RESEARCH,
    "development": Purpose.RESEARCH,
    "dev": Purpose.RESEARCH,
}


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


class RouteMode(StrEnum):
    BUDGET = "budget"
    PERFORMANCE = "performance"


class Status(StrEnum):
    """Where a request stands; the CLI's JSON `status` field carries these values."""

    PENDING = "pending"
    INVALID = "invalid"
    DENIED = "denied"
    PENDING_REVIEW = "pending_review"
    QUEUED = "queued"
    ALLOCATED = "allocated"
    RELEASED = "released"
    TIMED_OUT = "timed_out"


class ReleaseReason(StrEnum):
    LEASE_EXPIRED = "lease-expired"
    IDLE = "idle"
    BUDGET = "budget"
    EXPLICIT = "explicit"
    CONTEXT_EXIT = "context-exit"
    EXPIRED_WHILE_DOWN = "expired-while-down"
    CANCELLED = "cancelled"
    UNHEALTHY = "unhealthy"  # a GPU reported an XID error or was lost
    COMMAND_EXIT = "command-exit"  # `gpu-agent run`'s command ended
    # the cluster's scheduler ended its job, not gpu-agent: an administrator's scancel,
    # a preemption, or a job gone with no record of how (Slurm)
    CANCELLED_OUTSIDE = "cancelled-outside"
    # asked to yield its GPUs, after its checkpoint notice (fleet.preemption): its work goes
    # on from the checkpoint in a request that resumes it
    PREEMPTED = "preempted"

    @property
    def cut_by_budget(self) -> bool:
        """The project's budget ended the work before its lease. What counts against the
        project: its used share is the whole lease (fleet.budget.used_share, so its next
        leases are expected to run whole), and the council's record counts the hours as cut
        by the budget. An idle release is not a mark by its reason: the record counts only
        the hours held with no work (hoarded hours), whatever ended the allocation."""
        return self is ReleaseReason.BUDGET

    @property
    def with_notice(self) -> bool:
        """The holder knew the end was coming (the lease's end, the budget's cut deadline or a
        preemption's yield, all in the ledger beforehand; `gpu-agent run --notice` signals
        it): a job can checkpoint and lose no work. Other ends come without warning."""
        return self in (ReleaseReason.LEASE_EXPIRED, ReleaseReason.BUDGET, ReleaseReason.PREEMPTED)


# the values of the reasons cut_by_budget, for rows read as plain strings
CUT_BY_BUDGET = frozenset(r.value for r in ReleaseReason if r.cut_by_budget)

# What a caller may say ended an allocation (by hand, a `with` block, a start given up, a
# command's exit); the others (idle, budget, lease, health...) are the monitor's findings
CALLER_REASONS = (
    ReleaseReason.EXPLICIT,
    ReleaseReason.CONTEXT_EXIT,
    ReleaseReason.CANCELLED,
    ReleaseReason.COMMAND_EXIT,
)

# The signals a checkpoint notice may be (GPURequest.notice_signal, `gpu-agent run
# --notice-signal`): those a job can catch to checkpoint and go on, as Slurm's --signal sends.
NOTICE_SIGNALS = ("USR1", "USR2", "HUP", "INT", "TERM")


class Verdict(StrEnum):
    APPROVE = "approve"
    DENY = "deny"
    ABSTAIN = "abstain"


class CouncilOutcome(StrEnum):
    """What the council concluded (a request's own outcome is graph.outcome.RequestOutcome)."""

    APPROVED = "approved"
    GUARDED = "approved_with_guardrails"  # approved, with the decision's guardrails
    DENIED = "denied"
    SPLIT = "split"
    AUTO_APPROVED = "auto_approved"


# its name before 2026-12-03: checkpoints written then store the class by that name, and the
# serializer (graph/checkpoint.py) allows every name this module binds to a model or enum
Outcome = CouncilOutcome


class EventKind(StrEnum):
    QUEUED = "queued"
    PLACED = "placed"
    LOW_UTILIZATION = "low_utilization"
    THROTTLE = "throttle"
    IDLE = "idle"
    HUMAN_DECISION = "human_decision"
    RELEASED = "released"
    UNHEALTHY = "unhealthy"
    SCHEDULER = "scheduler"  # the cluster's scheduler (Slurm) ended the allocation's job
    LEASE = "lease"  # a lease held a term at a time renewed, or not, at the term's end
    COMMAND = "command"  # a command a dead `gpu-agent run` left: its notice, its end


def utc(ts: float) -> datetime:
    """A POSIX timestamp as an aware UTC datetime (the clock speaks floats, records datetimes)."""
    return datetime.fromtimestamp(ts, tz=UTC)


def check_project(name: str) -> str:
    """A project name (fleet.names), or ValueError (pydantic turns it into one line)."""
    return _named("project", name)


# The largest amount of money gpu-agent accepts anywhere (a budget, a request's limit): far
# above any real budget, far below where float arithmetic on cents goes wrong.
MAX_USD = 1e9
MAX_GPUS = 100_000  # the most GPUs one request may ask for
# The longest checkpoint notice a request may ask: an hour, where clouds give 30 s to 2 min.
# A guarded lease's term is at least twice its notice (fleet.monitoring.term_hours), so a
# notice of days would have held the council's one-hour term for the whole lease.
MAX_NOTICE_S = 3600.0


def budget_problem(usd: object) -> str | None:
    """Why `usd` is no budget (None: it is one): a number (no bool) from $0 to MAX_USD,
    compared as given, never converted, as math.isfinite converts an int (one past a float's
    range overflows; NaN and the infinities fail the comparison)."""
    if isinstance(usd, bool) or not isinstance(usd, int | float) or not 0 <= usd <= MAX_USD:
        return f"budget must be an amount from $0 to ${MAX_USD:,.0f}, not {_shown_amount(usd)}"
    return None


def _shown_amount(value: object) -> str:
    """A refused budget as its message quotes it: an int of many digits by its magnitude
    (past 4300 digits Python will not print it), another number as written, else by type."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**16:
        return f"about {'-' if value < 0 else ''}1e{math.log10(abs(value)):.0f}"
    return str(value) if isinstance(value, int | float) else names.shown(value)


def _named(kind: str, value: str) -> str:
    why = names.problem(kind, value)
    if why is not None:
        raise ValueError(why)
    return value


class GPURequest(BaseModel):
    """What a user asks for. Field-level checks here; fleet-level checks in fleet.validation."""

    # every float finite, also when given as a string ("inf"); an attribute set on a request
    # is checked as the field's value is (a request the caller changed reaches the ledger)
    model_config = ConfigDict(
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        allow_inf_nan=False,
        validate_assignment=True,
    )

    project: str = "default"
    purpose: Purpose = Purpose.TRAINING
    gpu_type: str | None = Field(default=None, alias="type")
    count: int = Field(default=1, ge=1, le=MAX_GPUS)
    duration_hours: float = Field(gt=0)
    priority: Priority = Priority.NORMAL
    budget_limit: float | None = Field(default=None, gt=0, le=MAX_USD)
    min_memory_gb: float | None = Field(default=None, gt=0)
    mode: RouteMode = RouteMode.BUDGET
    max_wait_minutes: float | None = Field(default=None, ge=0)
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    # Who asked: stamped by the entry that authenticated the caller (the Orchestrator, the
    # LangGraph server), whatever the caller sent; None where nobody could tell.
    requested_by: str | None = None
    # The released allocation of the same project whose work this request goes on with: its
    # release was a pause, not hoarding, and its pause bounds this one's idle release.
    resumes: str | None = None
    # A checkpoint notice: `notice_seconds` before the allocation's deadline its work is sent
    # `notice_signal`, to checkpoint. Where a cluster's scheduler holds the GPUs (Slurm), the
    # holder job carries it as --signal, so the scheduler sends it even while no gpu-agent
    # process runs; `gpu-agent run --notice` sets it.
    notice_seconds: float | None = Field(default=None, gt=0, le=MAX_NOTICE_S)
    notice_signal: str = "USR1"
    # What the job is (e.g. "resnet50"), for its speed on each type: the fleet file's
    # [speeds] table, or what the project's earlier runs of it measured (fleet.speeds).
    # None: every type at its average speed.
    workload: str | None = None

    def give_up_at(self, enqueued_at: float) -> float | None:
        """When the request stops waiting for GPUs (`max_wait_minutes` from when it was asked
        for): in gpu-agent's queue, and for a cluster's scheduler to start its job; None: never."""
        if self.max_wait_minutes is None:
            return None
        return enqueued_at + self.max_wait_minutes * 60.0

    @field_validator("project")
    @classmethod
    def _project_name(cls, v: str) -> str:
        return check_project(v)

    @field_validator("request_id")
    @classmethod
    def _request_id(cls, v: str) -> str:
        return _named("request id", v)

    @field_validator("requested_by")
    @classmethod
    def _requester(cls, v: str | None) -> str | None:
        return None if v is None else _named("identity", v)

    @field_validator("resumes")
    @classmethod
    def _resumed(cls, v: str | None) -> str | None:
        return None if v is None else _named("allocation id", v)

    @field_validator("workload")
    @classmethod
    def _workload(cls, v: str | None) -> str | None:
        return None if v is None else _named("workload", v)

    @field_validator("notice_signal", mode="before")
    @classmethod
    def _notice_signal(cls, v: Any) -> Any:
        if isinstance(v, str):
            name = v.strip().upper().removeprefix("SIG")
            if name in NOTICE_SIGNALS:
                return name
        raise ValueError(f"notice_signal must be one of {', '.join(NOTICE_SIGNALS)}")

    @field_validator("purpose", mode="before")
    @classmethod
    def _purpose_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            key = v.strip().lower().replace(" ", "_")
            if key in PURPOSE_ALIASES:
                return PURPOSE_ALIASES[key]
            raise ValueError(f"unknown purpose {v!r} (use training, inference or research)")
        return v

    @field_validator("gpu_type", mode="before")
    @classmethod
    def _gpu_type_name(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            return v.upper() if v else None
        return v

    @field_validator("count", mode="before")
    @classmethod
    def _no_bool_count(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("count must be an integer")
        return v

    @field_validator(
        "duration_hours",
        "budget_limit",
        "min_memory_gb",
        "max_wait_minutes",
        "notice_seconds",
        mode="before",
    )
    @classmethod
    def _no_bool(cls, v: Any) -> Any:  # finite: allow_inf_nan=False
        if isinstance(v, bool):
            raise ValueError("must be a number")
        return v


class Reason(BaseModel):
    """One feature's pull on a vote: `effect` > 0 pushed towards approval."""

    feature: str
    value: float
    effect: float
    text: str


class MemberVote(BaseModel):
    member: str
    verdict: Verdict
    probability: float
    weight: float = 1.0
    reasons: list[Reason] = Field(default_factory=list)


class Guardrails(BaseModel):
    """What an approval with guardrails changes, chosen from the council's predicted waste
    (council.guardrails): its work is to run under `gpu-agent run` (a pause of a running
    command never releases it, and its GPUs go when the command exits); where nothing says
    its work goes on, it is released after `idle_minutes` idle (with `idle_stream`, sooner
    where its utilisation stream reads as ended); with `cheaper_type`, it is
    routed by price per unit of work even where the request asked for speed; with
    `lease_hours`, it holds its GPUs that long at a time, renewed while they work, up to
    the lease asked (fleet.monitoring.renews)."""

    predicted_waste: float  # the chance it ends wasteful, 1 - the council's probability
    idle_minutes: float
    cheaper_type: bool = False
    # where the fleet guards by size (`[council] guard_gpu_hours`): predicted_waste x the
    # GPU-hours asked, what the guardrails are there for
    at_risk_gpu_hours: float | None = None
    # the fleet's term; once placed, the term as placed (Allocation.term_hours: none where the
    # lease is no longer, at least twice the renewal decision's lead)
    lease_hours: float | None = None
    # where the fleet says so (`[council] guard_idle_release = "stream"`): the idle release
    # comes sooner where the stream model reads the work as ended
    idle_stream: bool = False

    def describe(self) -> str:
        sooner = ", sooner where its utilisation reads as ended" if self.idle_stream else ""
        parts = [
            f"`gpu-agent run` required (else idle release after {self.idle_minutes:g} min{sooner})"
        ]
        if self.cheaper_type:
            parts.append("the cheapest type per unit of work")
        if self.lease_hours is not None:
            parts.append(f"a {round(self.lease_hours, 2):g} h lease, renewed while its GPUs work")
        return "; ".join(parts)

    def outlook(self) -> str:
        """The guardrails and the waste predicted, as the CLI and the page show them."""
        risk = "" if self.at_risk_gpu_hours is None else f" ({self.at_risk_gpu_hours:.1f} GPU-h)"
        return f"{self.describe()}; predicted to end wasteful: {self.predicted_waste:.0%}{risk}"


class Priced(BaseModel):
    """The route the council priced a request on: the type, count, lease and worst case (the
    route it would take when the council voted, else the cheapest type that does the work)."""

    gpu_type: str
    count: int
    price_per_hour: float
    hours: float
    cost_usd: float

    def describe(self) -> str:
        return (
            f"{self.count} x {self.gpu_type} at ${self.price_per_hour:.2f}/GPU-h "
            f"for {self.hours:.2f} h"
        )


class CouncilDecision(BaseModel):
    outcome: CouncilOutcome
    probability: float
    votes: list[MemberVote] = Field(default_factory=list)
    quorum: int = 0
    policy: str = ""
    summary: str = ""
    # GUARDED: what the approval carries; SPLIT: what a human's approval would carry
    guardrails: Guardrails | None = None
    priced: Priced | None = None  # what the cost member judged (None before 2026-12-04)


class HumanDecision(BaseModel):
    # a key misspelt ("guardrail") is refused, not dropped: the decision would stand without it
    model_config = ConfigDict(extra="forbid")

    approve: bool
    by: str = "human"
    comment: str = ""
    # an approval keeps the guardrails the council chose (where it chose any) unless the
    # human drops them: a reviewer who knows the team may grant the lease as asked
    guardrails: bool = True


class RouteOption(BaseModel):
    gpu_type: str
    price_per_hour: float
    relative_throughput: float  # the request's speed on this type (fleet.speeds)
    est_hours: float
    est_cost_usd: float
    feasible: bool
    why_not: str | None = None
    asked_hours: float | None = None  # the lease on this type, where the budget shortened it
    lent_by: Purpose | None = None  # the pool whose free GPUs it borrows (fleet.borrowing)
    # where relative_throughput came from: "table", "history" or "type average"
    speed_source: str | None = None


class RouteDecision(BaseModel):
    gpu_type: str
    pool: Purpose
    mode: RouteMode
    price_per_hour: float
    est_hours: float
    est_cost_usd: float
    reason: str
    alternatives: list[RouteOption] = Field(default_factory=list)
    asked_hours: float | None = None  # the lease on this type, where the budget shortened it
    lent_by: Purpose | None = None  # the pool whose free GPUs it borrows (fleet.borrowing)
    # the request's speed on the chosen type and where it came from (fleet.speeds)
    speed: float | None = None
    speed_source: str | None = None


class Allocation(BaseModel):
    id: str
    request_id: str
    thread_id: str
    project: str
    gpu_type: str
    count: int
    gpu_ids: list[str]
    node: str
    nodes: list[str]
    price_per_hour: float
    started_at: datetime
    lease_end: datetime  # the end of its lease, or of the term under way
    cuda_visible_devices: str
    # held a term at a time (an approval's guardrails, fleet.ledger.renewing): the term, and
    # the end it is renewed up to while its GPUs work
    term_hours: float | None = None
    renewed_up_to: datetime | None = None
    # where the ledger will not renew or lengthen its lease any more (fleet.ledger.rows.Lease.held):
    # why, "preempted" (its lease cut to the yield) or "not-renewed" (its monitor let its term
    # end); its term is then gone and `lease_end` is where the lease ends
    lease_cut: str | None = None


class GPUInfo(BaseModel):
    uuid: str
    gpu_type: str
    node: str
    index: int
    memory_gb: float
    model_name: str | None = None  # the driver's name (NVML), e.g. "NVIDIA H200"
    pci_bus_id: str | None = None
    mig: bool = False  # MIG mode on: NVML reports no utilisation for the whole GPU


class GPUProcess(BaseModel):
    """A compute process on a GPU, as the driver reports it (host PIDs, even in containers)."""

    pid: int
    used_gb: float | None = None


class GPUSample(BaseModel):
    """One reading of one GPU; a field the device could not report is None, never a failed read.

    Memory is in GiB. `processes` is None where the backend cannot list them (the simulated
    fleet). `health` names why the GPU is unusable (an XID error, lost), None when healthy."""

    gpu_id: str
    at: datetime
    util_pct: float | None = None
    mem_used_gb: float | None = None
    mem_total_gb: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    throttled: bool = False
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    processes: list[GPUProcess] | None = None
    health: str | None = None


class MonitorState(BaseModel):
    """What the monitor carries from tick to tick (bounded, so checkpoints stay small)."""

    ticks: int = 0
    last_tick_at: datetime | None = None
    util_sum: float = 0.0
    util_n: int = 0
    window: list[tuple[float, float]] = Field(default_factory=list)  # (time, mean util)
    idle_since: datetime | None = None
    longest_pause_s: float = 0.0  # the longest idle spell the work came back from
    # it resumes work that went on while its GPUs looked idle (fleet.ledger.rows.Resumed): idling
    # is no evidence here, as under a running command
    works_while_idle: bool = False
    # it resumes work an idle release or a term not renewed ended (fleet.ledger.rows.Resumed):
    # the council's stricter idle release and the stream's are spared it, the purpose's
    # timeout applies, and its terms are renewed whatever its GPUs do
    guard_spared: bool = False
    low_util_warned: bool = False
    throttled: list[str] = Field(default_factory=list)
    # the utilisation stream so far, for a release that reads it (`[monitor] idle_release =
    # "stream"`, fleet.monitoring): the stretches that ended, (mean utilisation %, seconds),
    # idle ones at 0, at most fleet.monitoring.STREAM_STRETCHES (the oldest merged); the working
    # stretch under way since `stretch_since` (its readings' sum and count); and when the
    # idle stretch under way is to be released, as the stream model said (once in it)
    stream: list[tuple[float, float]] = Field(default_factory=list)
    stretch_since: float | None = None
    stretch_util_sum: float = 0.0
    stretch_n: int = 0
    stream_limit_s: float | None = None
    # when the next tick is due (epoch s, exact: it may be the ledger's deadline), planned at
    # the end of this one; None: not planned yet
    wake_at: float | None = None
    # the end of the last term whose renewal it decided (a lease held a term at a time,
    # fleet.monitoring.renews): decided once per term, also where the tick re-runs
    renewal_for: float | None = None

    @property
    def mean_util(self) -> float | None:
        return self.util_sum / self.util_n if self.util_n else None


class Event(BaseModel):
    at: datetime
    kind: EventKind
    message: str
    gpu_id: str | None = None


class Release(BaseModel):
    allocation_id: str
    reason: ReleaseReason
    released_at: datetime
    hours: float
    cost_usd: float
    mean_util_pct: float | None = None

    @property
    def said(self) -> str:
        """A released thread's reason, as its outcome says it."""
        return f"released: {self.reason.value}"


class HistoryRecord(BaseModel):
    allocation_id: str
    thread_id: str
    project: str
    purpose: Purpose
    gpu_type: str
    count: int
    gpu_ids: list[str]
    started_at: datetime
    ended_at: datetime
    hours: float
    cost_usd: float
    reason: ReleaseReason
    mean_util_pct: float | None = None
    hoarded_hours: float = 0.0  # held idle at the end, with no work left (fleet.ledger)
    priority: Priority = Priority.NORMAL
    requested_hours: float = 0.0
    request: GPURequest | None = None


class RecordSummary(BaseModel):
    """A project's older history (beyond the events the council reads one by one), as sums
    of GPU-hours decayed to `at`, the end of the oldest event read one by one."""

    events: int = 0
    at: datetime
    gpu_hours: float = 0.0
    hoarded_gpu_hours: float = 0.0  # held idle at the end with no work left
    budget_gpu_hours: float = 0.0  # stopped by the budget
    rated_gpu_hours: float = 0.0  # with a utilisation reading
    util_gpu_hours: float = 0.0  # sum of utilisation (%) x GPU-hours over rated events


class ProjectStats(BaseModel):
    """A project's standing as the ledger sees it now: what the council and fair share read."""

    project: str
    budget_usd: float | None
    spent_usd: float
    committed_usd: float
    active_gpus: int
    decayed_gpu_hours: float
    usage_share: float
    fair_share: float
    recent: list[HistoryRecord] = Field(default_factory=list)
    # share of the fleet's GPUs others held when each recent allocation started (same order)
    fleet_busy: list[float] = Field(default_factory=list)
    older: RecordSummary | None = None

    @property
    def remaining_usd(self) -> float | None:
        if self.budget_usd is None:
            return None
        return self.budget_usd - self.spent_usd - self.committed_usd
