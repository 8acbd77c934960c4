"""Trace jobs made into requests and workloads by a documented, seeded rule.

A trace row says when a team submitted a job, how many GPUs it held and for how long. It does
not say what the job was for, which GPU it wanted, how long its owner asked for, what budget
the team had, or how busy the GPUs were. Each of these is drawn here, from a generator seeded
by (seed, trace line), so a job's synthetic half does not change when other jobs are added or
removed:

- purpose: jobs on 2+ GPUs train; a 1-GPU job under 30 minutes is research (a debug run or a
  notebook); other 1-GPU jobs are batch inference with probability `inference_share`, else
  training.
- named type: a training job names the fastest training type with probability
  `name_fastest_share` ("give me H100s"); an inference job names the training pool's reference
  type with probability `inference_on_training_share` (inference on training hardware, the
  waste the project exists to stop); all others leave the type to the router. The trace
  duration is time on the named type, or on the pool's first (reference) type.
- memory: a job's work needs the memory of its pool's reference type (the type it is sized
  on; a type named out of habit is no need). A request that may run on another pool's GPUs
  (`borrows`: a loan, fleet.borrowing) asks for that memory (`min_memory_gb`), so that a
  training job sized on an 80 GB A100 borrows no 24 GB card.
- requested duration: users pad, and pick round values (Tsafrir, Etsion & Feitelson,
  "Modeling User Runtime Estimates", JSSPP 2005: estimates are modal and mostly far above
  the run time). The duration times a log-normal factor (median `pad_median`, sigma
  `pad_sigma`), rounded up to the next of ROUND_HOURS; with probability `under_share` the
  user asks for less than the job needs (factor 0.5-1) and the lease ends first.
- utilisation: the trace duration splits into work (at a per-job SM utilisation), idle time in
  the middle of the job and an idle tail after the work (a notebook or a finished script that
  keeps its GPUs). The idle share of a job is Beta-distributed around 49 % for jobs under 6 h
  and 25 % for jobs over 24 h (allocated-but-idle GPU time on Philly, ../shared/traces/README
  and research/scheduling.md), 65 % of it mid-job (most idle periods are mid-job). Of the
  mid-job idle time, a few pauses are long enough for a monitor to see (about one per
  `1 / pauses_per_hour` hours); the rest is stalls shorter than a tick, which lower the work
  phases' utilisation. What is published bounds the pauses' total (the idle shares above,
  65 % of idle periods mid-job) but not their lengths, and the lengths decide what an idle
  timeout kills; durations in GPU clusters are heavy-tailed wherever they were measured (Hu
  et al., "Characterization and Prediction of Deep Learning Workloads in Large-Scale GPU
  Datacenters", SC'21, on Helios; Jeon et al., ATC'19, on Philly). So `pause_model` is
  log-normal by default (median `pause_minutes`, shape `pause_sigma` = 1.5: a mean of about
  31 minutes, one pause in ten over 68 minutes, one in a hundred over 5.5 hours), and the
  sensitivity benchmark (benchmarks/sensitivity.py) compares it with an exponential (mean
  `pause_minutes`, the light tail) and a Pareto (minimum `pause_minutes`, index
  `pause_alpha` = 1.2, the heaviest tail), so that no conclusion hangs on one of them. Work
  runs at about 81 % (the H200 recording's training phase) for three jobs in four and at
  10-40 % (under-used) for the rest. `calibration()` prints what this gives against Philly's
  ~32 % of samples at 0 % and mean utilisation of 47-52 %.
- budget: each project gets `budget_factor` (a seeded draw per project) times the list price
  of its trace work on the types the jobs reference.
- supervised: with probability `supervised_share` the owner runs the job's work through
  `gpu-agent run`, whose command exits when the last work phase ends (the idle tail is then
  GPUs kept after the command: a shell or a notebook left open); the others give the monitor
  nothing but utilisation. Drawn from a generator of its own, so the rest of a job does not
  change with it.
- compliance: an approval with guardrails (council.guardrails) asks for the work to run
  under `gpu-agent run`, and releases it after a short idle spell where no command runs.
  Whether owners who do not use `gpu-agent run` of their own accord start to when told is
  not published anywhere; `run_compliance` is the chance that one does (a job's own draw,
  from a generator of its own), 0 by default: every unsupervised job approved with
  guardrails then stays unsupervised, and the guardrail's idle release is the whole of
  what it does, kills in pauses included (`gpu-agent simulate --run-compliance` shows how
  the figures move with it).
- project habits (`habit_sigma` > 0; off by default, so the figures quoted for the whole
  trace are those of projects alike): projects differ by orders of magnitude in how well
  they use what they hold (research/scheduling.md, "How much projects differ": allocation
  utilisation per virtual cluster from 0.8 % to 91 % on Helios Earth; 98 % of PAI tasks use
  less GPU than they asked for), and a workload that gives every job the same idle
  distribution gives a council that reads a project's record nothing to learn. No published
  figure gives the spread of idle *held* time between projects itself, so the model is the
  plainest that reaches that range: each project draws a shift, normal with sd
  `habit_sigma`, added to the logit of its jobs' mean idle share (sd 1.5 takes the idle
  share of a 2 h job, 49 % for everyone, to 11-89 % at +-1.5 sd and beyond at the tails:
  a notebook that holds its GPUs for days is a project far out), and whether its jobs run
  under `gpu-agent run` at `supervised_share` or, with probability `unsupervised_projects`,
  never. Habits drift: with probability `drift_share` a project's habits are drawn again
  once, at a uniform time in its span in the trace (a team that mends its ways, one that
  stops using `gpu-agent run`, one that starts leaving notebooks open), so that its recent
  record says more than its old one. Each project's draws come from a generator keyed by
  its name; `calibration()` prints the spread this gives between projects. The council's
  training and evaluation worlds (council/dataset.py) give their projects habits calibrated
  to the same figure (one care level on the logit scale of their chances to hoard, burst and
  overrun), documented there.

The pure workload (`pure=True`, `gpu-agent simulate --workload pure`) keeps the purpose and
named type of each job (the same draws) and drops the rest of the synthetic half, so that a
policy can be compared with a pure-work scheduler such as Gavel's simulator, whose jobs do
nothing but work: the trace duration is all work (one phase at PURE_UTIL %, no pause, no
stall, no idle tail), the lease is not padded (exactly the work on the slowest type the job
may run on, so no lease ends before the work on any allowed type; at least the fleet's
shortest lease), every job runs under
`gpu-agent run` (a lease's end comes with notice under every policy alike), and no project
has a budget (nothing is refused or cut for money).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from fleet.config import FleetConfig
from fleet.models import Purpose
from fleet.speeds import table_speed
from fleet.trace import Job

ROUND_HOURS = (
    0.25,
    0.5,
    1,
    2,
    3,
    4,
    6,
    8,
    12,
    24,
    48,
    72,
    96,
    120,
    168,
    240,
    336,
    504,
    720,
    1080,
    1440,
    2160,
)
MIN_PHASE_HOURS = 1 / 60  # a pause shorter than a minute is part of the work around it
PAUSE_MODELS = ("lognormal", "exponential", "pareto")
PURE_UTIL = 100.0  # a pure-work job's SM utilisation: all of its time is work


@dataclass(frozen=True)
class Phase:
    """Work runs `hours` on the reference type at `util` % (faster types finish it sooner);
    an idle phase (util 0, memory held) lasts `hours` of wall time on any type."""

    hours: float
    util: float
    stall: float = 0.0  # share of a work phase spent in stalls too short for a tick to see

    @property
    def work(self) -> bool:
        return self.util > 0


@dataclass(frozen=True)
class SimJob:
    id: int
    project: str
    submit: float
    count: int
    purpose: Purpose
    named_type: str | None  # the type the request names; None: the router chooses
    reference: str  # the type the phases' work hours are measured on
    requested_hours: float  # the lease asked for, on the reference type
    pad: float  # requested / needed, kept when the user asks again
    phases: tuple[Phase, ...]  # work and pauses, then the idle tail
    line: int = 0
    supervised: bool = False  # its work runs under `gpu-agent run`
    # told by the council's guardrails to run its work under `gpu-agent run`, its owner does
    complies: bool = False
    workload: str | None = None  # its row of the fleet's [speeds] table; None: type averages
    pure: bool = False  # of the pure workload: all work, checkpointed whatever its purpose
    memory_gb: float | None = None  # what its work needs: its pool's reference type's memory

    @property
    def checkpoints(self) -> bool:
        """Whether it resumes from checkpoints: a training job does; in the pure workload
        every job does, as each of Philly's jobs is a training job (the inference and research
        purposes are this workload's draws) and a pure-work scheduler's jobs all resume."""
        return self.purpose is Purpose.TRAINING or self.pure

    @property
    def trace_hours(self) -> float:
        return sum(p.hours for p in self.phases)

    @property
    def work_hours(self) -> float:
        return sum(p.hours for p in self.phases if p.work)

    @property
    def work_gpu_hours(self) -> float:
        """Useful work, in GPU-hours of the reference type."""
        return self.count * self.work_hours


@dataclass(frozen=True)
class WorkloadSettings:
    seed: int = 0
    inference_share: float = 0.2
    research_under_hours: float = 0.5
    name_fastest_share: float = 0.3
    inference_on_training_share: float = 0.3
    pad_median: float = 2.0
    pad_sigma: float = 0.6
    under_share: float = 0.05
    idle_short: float = 0.49  # mean idle share of jobs under 6 h
    idle_long: float = 0.25  # ... and of jobs over 24 h
    idle_concentration: float = 4.0
    pause_share: float = 0.65  # of idle time, in the middle of the job
    pauses_per_hour: float = 0.25  # pauses long enough for the monitor to see
    pause_model: str = "lognormal"  # one of PAUSE_MODELS
    pause_minutes: float = 10.0  # the median (log-normal), mean (exponential), minimum (Pareto)
    pause_sigma: float = 1.5  # the log-normal's shape
    pause_alpha: float = 1.2  # the Pareto's tail index
    max_pauses: int = 12
    dense_share: float = 0.75
    dense_util: tuple[float, float] = (81.0, 8.0)  # mean, sd (H200 training phase)
    sparse_util: tuple[float, float] = (10.0, 40.0)  # uniform range
    budget_factor: tuple[float, float] = (0.8, 1.6)
    supervised_share: float = 0.8
    habit_sigma: float = 0.0  # sd of the projects' idle shift (logit); 0: projects alike
    unsupervised_projects: float = 0.2  # with habits: projects that never use gpu-agent run
    drift_share: float = 0.5  # with habits: projects whose habits change once
    run_compliance: float = 0.0  # owners told to use `gpu-agent run` who do (see the docstring)
    pure: bool = False  # trace durations are all work: no idle, no pad, no budget
    models: bool = False  # each job is one of the fleet's [speeds] workloads (per-job speeds)


@dataclass(frozen=True)
class Habit:
    """How a project uses what it holds, for a stretch of its time."""

    idle_shift: float  # added to the logit of its jobs' mean idle share
    supervised: float  # the chance a job's work runs under `gpu-agent run`


@dataclass(frozen=True)
class ProjectHabits:
    before: Habit
    after: Habit
    switch_at: float  # when `after` begins (inf: never)

    def at(self, t: float) -> Habit:
        return self.after if t >= self.switch_at else self.before


@dataclass
class Workload:
    jobs: list[SimJob]
    budgets: dict[str, float] = field(default_factory=dict)


def candidate_types(job: SimJob, config: FleetConfig) -> tuple[str, ...]:
    """The types a job may use: the one its request names, else its purpose's pool."""
    return (job.named_type,) if job.named_type is not None else tuple(config.pool(job.purpose))


def borrows(job: SimJob) -> bool:
    """Whether a fleet that lends (fleet.borrowing) may lend the job another pool's GPUs: it
    names no type and runs under `gpu-agent run`, checkpointing, so a reclaim loses nothing
    (its request carries a checkpoint notice, sim.agent_replay)."""
    return job.named_type is None and job.supervised and job.checkpoints


def loan_types(job: SimJob, config: FleetConfig) -> tuple[str, ...]:
    """The other pools' types a fleet that lends could run the job on: those with the memory
    its work needs, where it `borrows`; none otherwise."""
    if not borrows(job):
        return ()
    own = candidate_types(job, config)
    need = job.memory_gb or 0.0
    return tuple(t for t in config.catalog if t not in own and config.catalog[t].memory_gb >= need)


def _rng(seed: int, *key: object) -> random.Random:
    return random.Random(zlib.crc32(":".join(map(str, (seed, *key))).encode()))


def complies(s: WorkloadSettings, key: int) -> bool:
    """Whether the owner of job `key` follows a guardrail that asks for `gpu-agent run`: a
    draw of its own (none made where nobody does: half a second on the whole trace)."""
    return s.run_compliance > 0 and _rng(s.seed, "comply", key).random() < s.run_compliance


def _purpose(job: Job, s: WorkloadSettings, rng: random.Random) -> Purpose:
    if job.count >= 2:
        return Purpose.TRAINING
    if job.hours < s.research_under_hours:
        return Purpose.RESEARCH
    return Purpose.INFERENCE if rng.random() < s.inference_share else Purpose.TRAINING


def _named(
    purpose: Purpose, config: FleetConfig, s: WorkloadSettings, rng: random.Random
) -> str | None:
    draw = rng.random()
    if purpose is Purpose.TRAINING and draw < s.name_fastest_share:
        pool = config.pool(Purpose.TRAINING)
        return max(pool, key=lambda t: config.catalog[t].relative_throughput)
    if purpose is Purpose.INFERENCE and draw < s.inference_on_training_share:
        return config.pool(Purpose.TRAINING)[0]
    return None


def _model(config: FleetConfig, s: WorkloadSettings, line: int) -> str | None:
    """With `models`, the job's workload: one of the fleet's [speeds] rows, uniformly, from a
    generator of its own (the rest of the job does not change with it); else None."""
    if not s.models or not config.speeds:
        return None
    return _rng(s.seed, "model", line).choice(sorted(config.speeds))


def requested(hours: float, pad: float, max_hours: float) -> float:
    """What a user asks for: the need times their pad, rounded up to a round value."""
    want = hours * pad
    for r in ROUND_HOURS:
        if r >= want - 1e-9:
            return float(min(r, max_hours))
    return max_hours


def _pad(s: WorkloadSettings, rng: random.Random) -> float:
    if rng.random() < s.under_share:
        return rng.uniform(0.5, 1.0)
    return max(1.0, s.pad_median * math.exp(rng.gauss(0.0, s.pad_sigma)))


def _idle_mean(hours: float, s: WorkloadSettings, shift: float = 0.0) -> float:
    if hours <= 6:
        mean = s.idle_short
    elif hours >= 24:
        mean = s.idle_long
    else:
        mean = s.idle_short + (s.idle_long - s.idle_short) * (hours - 6) / 18
    if shift == 0.0:
        return mean
    shifted = 1.0 / (1.0 + math.exp(-(math.log(mean / (1 - mean)) + shift)))
    return min(0.99, max(0.01, shifted))  # the Beta's parameters stay positive


def _habit(s: WorkloadSettings, rng: random.Random) -> Habit:
    supervised = 0.0 if rng.random() < s.unsupervised_projects else s.supervised_share
    return Habit(rng.gauss(0.0, s.habit_sigma), supervised)


def project_habits(trace: Sequence[Job], s: WorkloadSettings) -> dict[str, ProjectHabits]:
    """Each project's habits (see the module docstring), from a generator keyed by its
    name: none where `habit_sigma` is 0."""
    if s.habit_sigma <= 0:
        return {}
    span: dict[str, tuple[float, float]] = {}
    weight: dict[str, float] = {}
    for job in trace:
        first, last = span.get(job.project, (job.submit, job.submit))
        span[job.project] = (min(first, job.submit), max(last, job.submit))
        weight[job.project] = weight.get(job.project, 0.0) + job.count * job.hours
    drawn: dict[str, tuple[Habit, Habit, float, bool]] = {}
    for project, (first, last) in sorted(span.items()):
        rng = _rng(s.seed, "habit", project)
        before, after = _habit(s, rng), _habit(s, rng)
        drifts = rng.random() < s.drift_share
        drawn[project] = (before, after, first + rng.random() * (last - first), drifts)
    # shifts centred on the GPU-hour-weighted mean, so that the trace's idle share stays
    # near what Philly published while the projects spread around it
    total = sum(weight.values()) or 1.0
    centre = [
        sum(weight[p] * d[0].idle_shift for p, d in drawn.items()) / total,
        sum(weight[p] * d[1].idle_shift for p, d in drawn.items()) / total,
    ]
    return {
        p: ProjectHabits(
            replace(before, idle_shift=before.idle_shift - centre[0]),
            replace(after, idle_shift=after.idle_shift - centre[1]),
            at if drifts else math.inf,
        )
        for p, (before, after, at, drifts) in drawn.items()
    }


def _split(total: float, parts: int, rng: random.Random) -> list[float]:
    cuts = [rng.expovariate(1.0) for _ in range(parts)]
    scale = total / sum(cuts)
    return [c * scale for c in cuts]


def phases(
    hours: float, s: WorkloadSettings, rng: random.Random, idle_shift: float = 0.0
) -> tuple[Phase, ...]:
    """Work segments with pauses between them, then the idle tail; sums to `hours`.

    Mid-job idle time the monitor can see is a few explicit pauses (exponential lengths);
    the rest is stalls shorter than a tick, folded into the work phases' utilisation.
    `idle_shift` is the project's habit (added to the logit of the mean idle share).
    """
    mean = _idle_mean(hours, s, idle_shift)
    k = s.idle_concentration
    idle = hours * rng.betavariate(mean * k, (1 - mean) * k)
    busy_util = (
        min(99.0, max(40.0, rng.gauss(*s.dense_util)))
        if rng.random() < s.dense_share
        else rng.uniform(*s.sparse_util)
    )
    mid = idle * s.pause_share
    n = min(s.max_pauses, _poisson(hours * s.pauses_per_hour, rng))
    gaps = [pause_hours(s, rng) for _ in range(n)]
    gaps = [g for g in gaps if g >= MIN_PHASE_HOURS]
    if sum(gaps) > mid:  # the pauses cannot outlast the job's mid-job idle time
        gaps = [g * mid / sum(gaps) for g in gaps]
    busy = hours - idle
    stalls = mid - sum(gaps)
    work_hours = busy + stalls
    util = round(busy_util * busy / work_hours, 1) if work_hours > 0 else 0.0
    stall = stalls / work_hours if work_hours > 0 else 0.0
    out: list[Phase] = []
    for i, w in enumerate(_split(work_hours, len(gaps) + 1, rng)):
        out.append(Phase(w, max(util, 0.1), stall))
        if i < len(gaps):
            out.append(Phase(gaps[i], 0.0))
    tail = idle - mid
    if tail > 0:
        out.append(Phase(tail, 0.0))
    return tuple(out)


def pause_hours(s: WorkloadSettings, rng: random.Random) -> float:
    """One visible pause's length under `s.pause_model` (see the module docstring)."""
    scale = s.pause_minutes / 60.0
    if s.pause_model == "exponential":
        return rng.expovariate(1.0 / scale)
    if s.pause_model == "pareto":
        return scale * rng.paretovariate(s.pause_alpha)
    if s.pause_model == "lognormal":
        return scale * math.exp(s.pause_sigma * rng.gauss(0.0, 1.0))
    raise ValueError(f"unknown pause model {s.pause_model!r} (one of {', '.join(PAUSE_MODELS)})")


def _poisson(lam: float, rng: random.Random) -> int:
    """Knuth's method for small means, a rounded normal beyond (the pause count only)."""
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def synthesize(
    trace: Sequence[Job], config: FleetConfig, settings: WorkloadSettings = WorkloadSettings()
) -> Workload:
    """The requests and workloads of `trace` on `config`'s catalog; same seed, same jobs."""
    s = settings
    max_hours = config.limits.max_duration_hours
    jobs: list[SimJob] = []
    list_cost: dict[str, float] = {}
    habits = project_habits(trace, s)
    alike = Habit(0.0, s.supervised_share)
    for i, job in enumerate(trace):
        habit = habits[job.project].at(job.submit) if habits else alike
        rng = _rng(s.seed, "job", job.line or i)
        purpose = _purpose(job, s, rng)
        named = _named(purpose, config, s, rng)  # drawn in both, so later draws stay the same
        if s.pure:
            named = None  # pure work names no type: a habit of the synthetic half
        reference = named or config.pool(purpose)[0]
        memory = config.catalog[config.pool(purpose)[0]].memory_gb
        hours = max(job.hours, 1 / 3600)  # a zero-second job still took a moment
        model = _model(config, s, job.line or i)
        base = SimJob(
            id=i,
            project=job.project,
            submit=job.submit,
            count=job.count,
            purpose=purpose,
            named_type=named,
            reference=reference,
            requested_hours=hours,
            pad=1.0,
            phases=(Phase(hours, PURE_UTIL),),
            line=job.line,
            supervised=True,
            workload=model,
            memory_gb=memory,
        )
        if s.pure:  # no budget either: its project's list cost is not counted
            jobs.append(replace(base, requested_hours=pure_lease(base, config), pure=True))
            continue
        pad = _pad(s, rng)
        jobs.append(
            replace(
                base,
                requested_hours=requested(hours, pad, max_hours),
                pad=pad,
                phases=phases(hours, s, rng, habit.idle_shift),
                supervised=_rng(s.seed, "run", job.line or i).random() < habit.supervised,
                complies=complies(s, job.line or i),
            )
        )
        list_cost[job.project] = (
            list_cost.get(job.project, 0.0)
            + job.count * hours * config.catalog[reference].price_per_hour
        )
    budgets = {
        p: round(cost * _rng(s.seed, "budget", p).uniform(*s.budget_factor), 2)
        for p, cost in sorted(list_cost.items())
    }
    return Workload(jobs, budgets)


def pure_lease(job: SimJob, config: FleetConfig) -> float:
    """A pure job's lease: its work on the slowest type it may use (no pad, no rounding),
    within the fleet's shortest and longest leases (a job of seconds asks for the shortest
    lease: a shorter request is refused)."""
    ref = table_speed(config, job.workload, job.reference)
    slowest = min(table_speed(config, job.workload, t) for t in candidate_types(job, config))
    hours = job.work_hours * max(1.0, ref / slowest)
    limits = config.limits
    return min(max(hours, limits.min_duration_minutes / 60), limits.max_duration_hours)


def calibration(jobs: Sequence[SimJob]) -> dict[str, float]:
    """The synthetic workload's utilisation as held on the trace, GPU-time weighted."""
    held = work_util = idle = 0.0
    short_idle = short_held = long_idle = long_held = 0.0
    for j in jobs:
        gh = j.count * j.trace_hours
        held += gh
        work_util += j.count * sum(p.hours * p.util for p in j.phases)
        i = j.count * sum(p.hours if not p.work else p.hours * p.stall for p in j.phases)
        idle += i
        if j.trace_hours < 6:
            short_idle, short_held = short_idle + i, short_held + gh
        elif j.trace_hours > 24:
            long_idle, long_held = long_idle + i, long_held + gh
    return {
        "jobs": len(jobs),
        **project_spread(jobs),
        "gpu_hours": held,
        "mean_util_pct": work_util / held if held else 0.0,
        "idle_share": idle / held if held else 0.0,
        "idle_share_under_6h": short_idle / short_held if short_held else 0.0,
        "idle_share_over_24h": long_idle / long_held if long_held else 0.0,
    }


def project_spread(jobs: Sequence[SimJob], least: float = 0.001) -> dict[str, float]:
    """How differently projects use what they hold: the idle share of each project's held
    GPU-hours (idle phases and stalls), its lowest, median and highest over the projects
    that hold at least `least` of all GPU-hours (a project of a few minutes says nothing)."""
    held: dict[str, float] = {}
    idle: dict[str, float] = {}
    for j in jobs:
        held[j.project] = held.get(j.project, 0.0) + j.count * j.trace_hours
        idle[j.project] = idle.get(j.project, 0.0) + j.count * sum(
            p.hours if not p.work else p.hours * p.stall for p in j.phases
        )
    total = sum(held.values())
    shares = sorted(idle[p] / held[p] for p in held if total and held[p] >= least * total)
    if not shares:
        return {}
    return {
        "project_idle_share_min": shares[0],
        "project_idle_share_median": shares[len(shares) // 2],
        "project_idle_share_max": shares[-1],
    }
