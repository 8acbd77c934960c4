"""The fleet file: GPU catalog, pools, nodes and every policy knob, read from TOML.

Unknown keys are errors, so a typo in a threshold never silently falls back to a default.
"""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet import names
from fleet.errors import ConfigError, one_line
from fleet.models import GPUInfo, Purpose, budget_problem

# A number in a fleet file: an integer or a float, not TOML's true or false, nor a string,
# which pydantic's lax mode would read as 1, 0 or the string's number
Number = Annotated[float, Field(strict=True)]


class _Strict(BaseModel):
    # no infinities or NaN anywhere in a fleet file: `inf` is valid TOML, and a price, a
    # speed, a budget or a clock's scale of inf or nan would reach the ledger and the votes
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# How fast a type, or a job on a type, may be said to run against the fleet's reference type
# (1): beyond a thousandfold either way a figure is a typo, and its leases would round to
# nothing (fleet.routing.estimate divides the work by it).
SPEED_MIN, SPEED_MAX = 0.001, 1000.0
# The dearest GPU-hour a catalog may price, in USD: far above any card's, and far enough
# below a float's limit that a whole fleet's worst case never overflows.
PRICE_MAX = 10_000.0
# A project's [shares] weight against the others' (a project not named weighs 1): beyond a
# millionfold either way a weight is a typo, and within it the fair-share factor's sums and
# ratios stay finite and non-zero (fleet.scheduler.fair_share_factors divides by them).
SHARE_MIN, SHARE_MAX = 0.001, 1_000_000.0


class GPUTypeSpec(_Strict):
    memory_gb: Number = Field(gt=0)
    price_per_hour: Number = Field(gt=0, le=PRICE_MAX)
    relative_throughput: Number = Field(ge=SPEED_MIN, le=SPEED_MAX)  # of the reference type
    tdp_watts: Number = Field(default=400, gt=0)


class NodeSpec(_Strict):
    name: str
    gpu_type: str
    gpus: int = Field(ge=1, le=64, strict=True)
    rack: str = "rack-0"
    nvlink: bool = Field(default=True, strict=True)
    ambient_c: Number = 30.0


class MonitorSettings(_Strict):
    tick_seconds: Number = Field(default=60, ge=0.1)
    low_util_pct: Number = Field(default=20, ge=0, le=100)
    low_util_window_minutes: Number = Field(default=10, gt=0)
    idle_util_pct: Number = Field(default=5, ge=0, le=100)
    idle_timeout_minutes: Number = Field(default=30, gt=0)
    # Where no command is known to run on the GPUs: a timeout per purpose (the one above where
    # none is given), never shorter than pause_factor x the longest pause the allocation has
    # already come back from; while a command runs under `gpu-agent run`, idling is a pause
    # and never ends the allocation (its lease and budget bound a hung command). Once
    # the command has exited, the work is done: the idle tail goes after
    # idle_timeout_done_minutes, 0 by default (the first tick that reads the GPUs idle: no
    # work is lost by it, the next command asks again; raise it to keep GPUs between
    # commands, as SkyPilot's autostop waits 5) (fleet.monitoring.idle_limit_s).
    idle_timeout_done_minutes: Number = Field(default=0, ge=0)
    idle_timeout_by_purpose: dict[Purpose, Annotated[Number, Field(gt=0)]] = Field(
        default_factory=dict
    )
    pause_factor: Number = Field(default=1.5, ge=1)
    # "stream": where no command is known, when to release an idle allocation is read from its
    # utilisation stream by a model that tells a pause from an ending (council.stream_release),
    # instead of the timeout and the pause factor; opt-in: trained on the simulator's jobs
    idle_release: Literal["timeout", "stream"] = "timeout"
    throttle_temp_c: Number = Field(default=85, gt=0)
    sample_window: int = Field(default=10, ge=1, le=1000, strict=True)
    # Wall-clock seconds, whatever the clock's time_scale: how often a process that monitors
    # allocations says it is alive, and how long a silence means it is gone (fleet.monitors).
    heartbeat_seconds: Number = Field(default=5, gt=0, le=3600)
    heartbeat_stale_seconds: Number = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _stale_after_beats(self) -> MonitorSettings:
        if self.heartbeat_stale_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                "heartbeat_stale_seconds must be at least twice heartbeat_seconds "
                "(one late beat must not look like a dead monitor)"
            )
        return self


class SchedulerSettings(_Strict):
    # Who goes first in a type's line (fleet.placement): "fair-share", Slurm's multifactor
    # score (priority, fair share, age); or "max-min", the request whose work has received the
    # least effective service first, with running allocations that have received more asked to
    # yield (fleet.maxmin: max-min fairness over effective throughput, losing no work);
    # "least-attained" the same with service counted per GPU, not per job (Tiresias).
    policy: Literal["fair-share", "max-min", "least-attained"] = "fair-share"
    half_life_hours: Number = Field(default=24, gt=0)
    poll_seconds: Number = Field(default=60, gt=0)
    age_max_hours: Number = Field(default=2, gt=0)
    weight_priority: Number = Field(default=1000, ge=0)
    weight_fairshare: Number = Field(default=1000, ge=0)
    weight_age: Number = Field(default=500, ge=0)
    stale_after_polls: Number = Field(default=3, gt=1)
    # A queued request that names no type moves, when it wakes, to another type of its pool
    # that routing now prefers and that could start it now (nodes/wait.py), rather than wait
    # for the type it was first routed to. On by default: it cut mean JCT on the whole trace
    # and on a queued slice (docs/evaluation.md); false keeps a queued request on its first type.
    move_queued: bool = Field(default=True, strict=True)
    # On PostgreSQL, a release wakes the queued requests of every process at once (LISTEN/
    # NOTIFY, fleet/ledger/notify.py); false: they try again at their next poll.
    notify: bool = Field(default=True, strict=True)


# Each policy's (deny at or below, approve at or above) on its own probability. The neural
# council's is wider: calibration makes its probability sharp, and the errors it still makes
# sit in (0.25, 0.75), where a human then decides (council/weights/MODEL_CARD.md).
POLICY_BANDS: dict[str, tuple[float, float]] = {"neural": (0.25, 0.75), "reference": (0.4, 0.6)}


class CouncilSettings(_Strict):
    auto_approve_max_gpus: int = Field(default=1, ge=0, strict=True)
    auto_approve_max_usd: Number = Field(default=25, ge=0)
    # On the council's probability; between the two a human decides. Unset: the policy's
    # own (neural: 0.25 / 0.75 on its calibrated probability; reference: 0.4 / 0.6).
    approve_threshold: Number | None = Field(default=None, gt=0, lt=1)
    deny_threshold: Number | None = Field(default=None, gt=0, lt=1)
    # Approval with guardrails (council.guardrails), opt-in: from this share of the way from
    # the deny to the approve threshold (0.5: the upper half of the human band), and above
    # approve without a quorum of approvers. None: every uncertain request goes to a human.
    guard_share: Number | None = Field(default=None, gt=0, le=1, allow_inf_nan=False, strict=True)
    # False: the council denies nothing on its own; what it would deny (at or below the deny
    # threshold) goes to a human, as the human band does.
    auto_deny: bool = Field(default=True, strict=True)
    # The idle release an approval with guardrails carries where nothing says the work goes
    # on (no `gpu-agent run` command running): stricter than the monitor's own timeouts.
    guard_idle_minutes: Number = Field(default=10, gt=0, allow_inf_nan=False)
    # With guard_share, "stream": that release comes sooner where the allocation's utilisation
    # stream reads as ended (the model `[monitor] idle_release = "stream"` uses, on the
    # guarded allocations only, never later than guard_idle_minutes). "timeout": the clock.
    guard_idle_release: Literal["timeout", "stream"] = "timeout"
    # With guard_share: guardrails only where they are worth their burden, where the GPU-hours
    # at risk, (1 - p) x the GPU-hours asked, reach this; an approval below it goes without
    # them (council.voting.combine). None: by the probability alone.
    guard_gpu_hours: Number | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)
    # With guard_share: an approval with guardrails holds its GPUs this many hours at a time,
    # renewed by its monitor while they work (fleet.monitoring.renews), up to the lease asked;
    # what its budget commits, its scheduler's time limit and the backfill's view of when its
    # GPUs free follow the term (at least 15 minutes). None: the lease asked for, whole.
    guard_lease_hours: Number | None = Field(
        default=None, ge=0.25, allow_inf_nan=False, strict=True
    )
    quorum: int = Field(default=3, ge=1, le=100, strict=True)
    history_events: int = Field(default=32, ge=1, le=64, strict=True)
    record_half_life_days: Number = Field(default=7, gt=0)
    record_prior_gpu_hours: Number = Field(default=4, ge=0)
    policy: Literal["neural", "reference"] = "neural"
    # A weights file from `gpu-agent council train`; None: the shipped council (trained to the
    # reference rules); "outcome": the shipped council trained on outcomes, with its own band
    # (council/weights/outcome/MODEL_CARD.md)
    weights: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> CouncilSettings:
        deny, approve = self.band()
        if deny >= approve:
            raise ValueError(f"deny_threshold ({deny}) must be below approve_threshold ({approve})")
        if self.guard_gpu_hours is not None and self.guard_share is None:
            raise ValueError("guard_gpu_hours needs guard_share: it chooses whom to guard")
        if self.guard_lease_hours is not None and self.guard_share is None:
            raise ValueError("guard_lease_hours needs guard_share: it is one of the guardrails")
        if self.guard_idle_release != "timeout" and self.guard_share is None:
            raise ValueError("guard_idle_release needs guard_share: it is one of the guardrails")
        return self

    def band(self, policy: str | None = None) -> tuple[float, float]:
        """(deny at or below, approve at or above): the thresholds set, else the policy's."""
        default = POLICY_BANDS[policy or self.policy]
        deny = default[0] if self.deny_threshold is None else self.deny_threshold
        approve = default[1] if self.approve_threshold is None else self.approve_threshold
        return deny, approve

    def guard(self, policy: str | None = None) -> float:
        """Approve with guardrails at or above this: `guard_share` of the way from deny to
        approve; without a share, approve itself (no guarded band)."""
        deny, approve = self.band(policy)
        return approve if self.guard_share is None else deny + self.guard_share * (approve - deny)


class LimitSettings(_Strict):
    max_duration_hours: Number = Field(default=720, gt=0)
    min_duration_minutes: Number = Field(default=1, gt=0)
    # A budget that cannot take a whole lease shortens it down to this share of the hours
    # asked rather than refuse the request (fleet.budget.admitted_hours); 1: never shortens.
    min_lease_share: Number = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _a_request_fits(self) -> LimitSettings:
        if self.min_duration_minutes > 60 * self.max_duration_hours:
            raise ValueError(
                "min_duration_minutes is longer than max_duration_hours: every request would "
                "be refused"
            )
        return self


class PreemptionSettings(_Strict):
    """When a running allocation may be asked to yield its GPUs (fleet.preemption)."""

    # It has run at least this long when it yields, so that nobody thrashes.
    min_run_minutes: Number = Field(default=30, ge=0, allow_inf_nan=False)
    # A project's allocations yield at most this many times in any 24 hours.
    max_per_project_per_day: int = Field(default=4, ge=0, strict=True)
    # Borrowing between pools (fleet.borrowing): a request with a checkpoint notice whose own
    # pool cannot start it now may run on another pool's free GPUs, which that pool reclaims
    # (the loan yields after its notice) when its own work queues for them. Off by default.
    borrow: bool = Field(default=False, strict=True)
    # With borrow: a loan, and a move up to another pool's idle type (fleet.maxmin.moves_up),
    # may cost more a unit of work than the request's own pool would, where it finishes the
    # work sooner (research on idle A100s and H100s rather than its RTX 4090s), where the
    # project's budget pays for the whole lease there: people wait less and their projects
    # pay the dearer type. Off by default: loans no dearer a unit.
    borrow_dearer: bool = Field(default=False, strict=True)

    @model_validator(mode="after")
    def _dearer_borrows(self) -> PreemptionSettings:
        if self.borrow_dearer and not self.borrow:
            raise ValueError("borrow_dearer needs borrow = true")
        return self


class QuotaSettings(_Strict):
    default_max_gpus: int | None = Field(default=None, ge=1, strict=True)
    projects: dict[str, Annotated[int, Field(ge=1, strict=True)]] = Field(default_factory=dict)

    def max_gpus(self, project: str) -> int | None:
        return self.projects.get(project, self.default_max_gpus)


class SimulationSettings(_Strict):
    seed: int = Field(default=0, strict=True)
    default_workload: str = "train"
    workloads: dict[str, str] = Field(default_factory=dict)


class SlurmSettings(_Strict):
    """How `--backend slurm` submits its holder jobs (fleet/slurm/backend.py)."""

    # The partition each pool's jobs go to; a pool not named here uses the cluster's default
    # partition. Only the nodes of these partitions are placed on.
    partitions: dict[Purpose, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict)
    # A placed job that Slurm has not started within this long (a request with a max wait: by
    # its end instead) is cancelled, and so is its allocation (charged nothing).
    start_timeout_seconds: Number = Field(default=60, gt=0)
    # Added to every holder job's sbatch line: what the site requires (--account, --qos).
    sbatch_args: list[str] = Field(default_factory=list)
    # How long one Slurm command may take before Slurm counts as not answering.
    command_timeout_seconds: Number = Field(default=30, gt=0)


class CheckpointSettings(_Strict):
    # What a thread run by gpu-agent keeps of its checkpoints (graph.checkpoint.prune):
    # "latest", its latest alone, pruned every few monitor ticks and when its run stops (all a
    # resume reads; a tick's checkpoint is about 7.6 KB, and a monitored allocation writes one
    # a tick); "all", every step's, for stepping back through a run's history
    keep: Literal["latest", "all"] = "latest"


class ClockSettings(_Strict):
    # A state directory's ledger runs at the scale it first ran at (fleet.ledger.time_scale)
    time_scale: Number = Field(default=1.0, gt=0, le=1e7)  # at most 116 days a second


# A job's speed on one type, in relative_throughput's unit (the fleet's reference type = 1).
Speed = Annotated[float, Field(ge=SPEED_MIN, le=SPEED_MAX, allow_inf_nan=False, strict=True)]

SHIPPED_CATALOG = "catalog.toml"  # the GPU types a fleet file may name (fleet/data/)


@functools.cache
def shipped_catalog() -> dict[str, GPUTypeSpec]:
    """The shipped GPU catalog (fleet/data/catalog.toml), the one copy of its types' prices."""
    text = resources.files("fleet").joinpath("data", SHIPPED_CATALOG).read_text("utf-8")
    return {name: GPUTypeSpec.model_validate(spec) for name, spec in tomllib.loads(text).items()}


class FleetConfig(_Strict):
    # A list of names from the shipped catalog, or a table per type (a type of its own, or
    # a price of its own): see _named_types.
    catalog: dict[str, GPUTypeSpec]
    pools: dict[Purpose, list[str]]
    # The simulated fleet's machines. With a hardware backend (NVML, replay) the GPUs the
    # driver reports take their place (`with_inventory`), and the list may be empty.
    nodes: list[NodeSpec] = Field(default_factory=list)
    monitor: MonitorSettings = MonitorSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    council: CouncilSettings = CouncilSettings()
    limits: LimitSettings = LimitSettings()
    quotas: QuotaSettings = QuotaSettings()
    preemption: PreemptionSettings = PreemptionSettings()
    shares: dict[str, Number] = Field(default_factory=dict)
    budgets: dict[str, Number] = Field(default_factory=dict)
    simulation: SimulationSettings = SimulationSettings()
    clock: ClockSettings = ClockSettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    slurm: SlurmSettings = SlurmSettings()
    # Per-workload speeds, `[speeds.resnet50] A100 = 1.0, T4 = 0.2`: a request naming the
    # workload runs this fast on these types; a type not listed runs at its average
    # (relative_throughput). What a project's own runs measured may refine it (fleet.speeds).
    speeds: dict[str, dict[str, Speed]] = Field(default_factory=dict)

    @field_validator("speeds", mode="before")
    @classmethod
    def _speed_types(cls, value: Any) -> Any:
        """Type names as requests write them: a GPU type is upper case (GPURequest.gpu_type)."""
        if not isinstance(value, dict):
            return value
        upper = {}
        for w, row in value.items():
            if isinstance(row, dict):
                if len({str(t).upper() for t in row}) < len(row):
                    raise ValueError(f"{w} names a GPU type twice (names are upper case)")
                row = {str(t).upper(): v for t, v in row.items()}
            upper[w] = row
        return upper

    @field_validator("catalog", mode="before")
    @classmethod
    def _named_types(cls, value: Any) -> Any:
        """`catalog = ["A100", ...]` takes those types from the shipped catalog, in order."""
        if not isinstance(value, list):
            return value
        shipped = shipped_catalog()
        unknown = [v for v in value if not isinstance(v, str) or v not in shipped]
        if unknown:
            raise ValueError(
                f"catalog names {unknown[0]!r}, not a type of the shipped "
                f"catalog ({', '.join(shipped)}); give a [catalog.NAME] table "
                "for a type of your own"
            )
        if len(set(value)) != len(value):
            raise ValueError("catalog names a type twice")
        return {name: shipped[name] for name in value}

    @model_validator(mode="after")
    def _consistent(self) -> FleetConfig:
        for t in self.catalog:  # printed in every table and route (pools and nodes name these)
            why = names.problem("GPU type", t)
            if why is not None:
                raise ValueError(f"catalog: {why}")
            if t != t.upper():  # a request's type is read in upper case (GPURequest.gpu_type)
                raise ValueError(
                    f"catalog: GPU type {t!r} must be upper case, {t.upper()!r}, as requests "
                    "name it"
                )
        for purpose in Purpose:
            if not self.pools.get(purpose):
                raise ValueError(f"pools.{purpose.value} must list at least one GPU type")
        for purpose, types in self.pools.items():
            for t in types:
                if t not in self.catalog:
                    raise ValueError(f"pools.{purpose.value} names unknown GPU type {t!r}")
        seen: set[str] = set()
        for node in self.nodes:  # a file's names, printed and sent to schedulers: a host's
            why = names.problem("node", node.name) or names.problem("rack", node.rack)
            if why is not None:  # (a backend's inventory names its own: with_inventory)
                raise ValueError(f"nodes: {why}")
            if node.gpu_type not in self.catalog:
                raise ValueError(f"node {node.name!r} has unknown GPU type {node.gpu_type!r}")
            if node.name in seen:
                raise ValueError(f"node name {node.name!r} appears twice")
            seen.add(node.name)
        for table, projects in (
            ("shares", self.shares),
            ("budgets", self.budgets),
            ("quotas.projects", self.quotas.projects),
            ("simulation.workloads", self.simulation.workloads),
        ):
            for project in projects:
                why = names.problem("project", project)
                if why is not None:
                    raise ValueError(f"{table}: {why}")
        for project, share in self.shares.items():
            if not SHARE_MIN <= share <= SHARE_MAX:
                raise ValueError(
                    f"shares.{project} must be from {SHARE_MIN:g} to {SHARE_MAX:,.0f} "
                    f"(a weight against the others', 1 for a project not named), not {share:g}"
                )
        for project, budget in self.budgets.items():
            why = budget_problem(budget)
            if why is not None:
                raise ValueError(f"budgets.{project}: {why}")
        self._check_speeds()
        return self

    def _check_speeds(self) -> None:
        """Each [speeds] table is a valid workload name over types of the catalog."""
        for workload, row in self.speeds.items():
            why = names.problem("workload", workload)
            if why is not None:
                raise ValueError(f"speeds: {why}")
            for t in row:
                if t not in self.catalog:
                    raise ValueError(
                        f"speeds.{workload} names unknown GPU type {t!r} "
                        f"(known: {', '.join(self.catalog)})"
                    )

    def with_inventory(self, inventory: list[GPUInfo]) -> FleetConfig:
        """This policy over the GPUs a hardware backend found: one node per host (and type)."""
        counts: dict[tuple[str, str], int] = {}
        for g in inventory:
            counts[(g.node, g.gpu_type)] = counts.get((g.node, g.gpu_type), 0) + 1
        nodes = [NodeSpec(name=n, gpu_type=t, gpus=k) for (n, t), k in counts.items()]
        return self.model_copy(update={"nodes": nodes})

    def gpus_of_type(self, gpu_type: str) -> int:
        return _gpu_counts(self.nodes).get(gpu_type, 0)

    def pool(self, purpose: Purpose) -> list[str]:
        return self.pools[purpose]


_COUNTS: dict[int, tuple[list[NodeSpec], dict[str, int]]] = {}


def _gpu_counts(nodes: list[NodeSpec]) -> dict[str, int]:
    """GPUs per type of a node list, counted once per list (routing asks at every request);
    the list is kept with its counts, so a reused id() can never return stale ones."""
    hit = _COUNTS.get(id(nodes))
    if hit is None or hit[0] is not nodes:
        counts: dict[str, int] = {}
        for n in nodes:
            counts[n.gpu_type] = counts.get(n.gpu_type, 0) + n.gpus
        hit = _COUNTS[id(nodes)] = (nodes, counts)
    return hit[1]


DEFAULT_FLEET = "default_fleet.toml"
HOST_FLEET = "host_fleet.toml"  # the default policy over real GPUs (no simulated nodes)


def parse_fleet(text: str, source: str = "fleet file") -> FleetConfig:
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return FleetConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, prefix=f"{source}: ")) from None


def load_fleet(path: str | Path | None = None, *, hardware: bool = False) -> FleetConfig:
    """The fleet at `path`, or the one shipped with the package: the simulated default fleet,
    or for real GPUs (`hardware`) the host policy, whose nodes are the GPUs found."""
    if path is None:
        name = HOST_FLEET if hardware else DEFAULT_FLEET
        text = resources.files("fleet").joinpath("data", name).read_text("utf-8")
        return parse_fleet(text, source=f"default fleet ({name})")
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"fleet file {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"fleet file {p}: cannot read it ({exc})") from None
    return parse_fleet(text, source=f"fleet file {p}")
