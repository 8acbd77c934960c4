"""Training data for the neural council: project histories replayed on the simulated fleet.

A world is a set of projects submitting jobs over weeks, from a seeded synthetic workload or
from a real trace (submit time, duration, GPUs, team). Each job becomes a GPURequest; the hard
rules (fleet.validation.refusal) and the auto-approval rule run first, as in the graph; the
reference council labels every request it would vote on, and decides whether the job runs.
A job that runs is watched by the real monitor (fleet.monitoring.assess) on the simulated
fleet's readings, so idle releases happen where the monitor would make them, and its record
(hours held, cost, mean utilisation, release reason, fleet load) joins the project's history.

Project habits (how often they hoard, burst, overrun, pad durations, ask for the wrong
hardware) are drawn per project and redrawn once at a random time, so that recent behaviour
matters more than old: what the council's time constants are for.

How far projects differ is calibrated to what is published (../shared/research/
scheduling.md, "How much projects differ": allocation utilisation per virtual cluster from
0.8 % to 91 % on Helios Earth, 66.7 % in all). A project's care is one logit shift, normal
with sd HABIT_SIGMA, shared by its chances to hoard, burst and overrun (a team that leaves
notebooks open also lets jobs idle along), each with a spread of its own; the base logits
keep the mean chances the habits had before they were calibrated. `World.unmanaged_util()`
gives what each project's jobs would use of what they hold with no monitor (work at its
profile's mean, idle tails held to the lease, budget cuts where they fall), the figure the
published one is: on the evaluation worlds 0-4, 2 % to 81 % (81 % is the training profile's
own), 45 % to 55 % in all (`benchmarks/waste_ceiling.py` prints it per world; 57 % to 66 %
while a lease was the routed type's estimate of the work, before a hoarder's idle tail ran
to the hours asked on a faster type). Before the
calibration the habits were three hand-picked kinds of project (good citizens, hoarders,
the careless with money), and the same worlds spanned only 36 % to 81 %: a project's record
said little, because every project's jobs were coin flips near the middle.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from council.features import RequestFeatures, Standing, assemble
from council.record import PastJob
from council.rules import MEMBERS, member_vote, sigmoid
from council.stream_release import shipped
from council.voting import auto_approves
from fleet.config import FleetConfig, SimulationSettings
from fleet.errors import GPUAgentError
from fleet.models import (
    GPURequest,
    MonitorState,
    Priority,
    Purpose,
    RecordSummary,
    ReleaseReason,
)
from fleet.monitoring import (
    IdlePolicy,
    assess,
    decided_at,
    renewal_lead_s,
    renews,
    term_hours,
)
from fleet.routing import estimate, lease_on
from fleet.scheduler import decayed, fair_share_factors, summarise
from fleet.simulated import PROFILES, SimulatedFleet
from fleet.trace import Job
from fleet.validation import check_against_fleet, refusal

TARGETS = (*MEMBERS, "council")  # the reference's member probabilities, then its council's
EPOCH = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
BUDGET_PERIOD_DAYS = 30
TRAIN, THRESHOLDS = 0.6, 0.7  # ends of the training and threshold slices, as shares of a span
EXPLORE = 0.05  # learning from outcomes: the share of denied requests that run anyway
TICK_S = 600.0  # the worlds' monitor reads an allocation every 10 minutes (World._watch)
WASTE_UTIL_PCT = 20.0
WASTE_IDLE_SHARE = 0.1  # of the hours held, held idle with no work left
# Project habits, calibrated to how far projects are published to differ (see the module's
# docstring): a project's care is a logit shift, normal with this sd, shared by its chances
# to hoard, burst and overrun, each with a spread of its own; the base logits keep the mean
# chances (0.29, 0.15, 0.21) of the habits before the calibration.
HABIT_SIGMA = 3.0
HABIT_OWN_SIGMA = 0.5
HABIT_LOGITS = (-1.94, -3.65, -2.83)  # hoard, bursty, overrun at a care of 0


@dataclass(frozen=True)
class Habits:
    hoard: float  # chance a job keeps its GPUs idle after finishing
    bursty: float  # chance a job only bursts now and then
    overrun: float  # chance a job is stopped by the budget
    pad: float  # requested hours = true hours x up to this factor
    mismatch: float  # chance an inference job asks for training hardware
    priority: tuple[float, float, float, float]  # low, normal, high, critical weights


@dataclass(frozen=True)
class _Plan:
    """What a job does once placed, drawn before it runs."""

    gpu_type: str
    hours: float  # the lease
    work: float  # hours of work on that type
    phases: tuple[tuple[str, float], ...]  # (simulated profile, hours)
    cut: float | None  # hours until the budget cuts it, if it does


def wasteful(held: float, util: float, reason: ReleaseReason, work: float) -> float:
    """1 where an allocation ended wasteful: released by the monitor (an idle release, a
    term not renewed) or its budget before its work was done (the work is lost), held with
    no work left for WASTE_IDLE_SHARE of its time or more, or under WASTE_UTIL_PCT mean
    utilisation; else 0. The GPU-hours held idle, not the release's reason, make an idle
    tail wasteful: a guardrail that releases it sooner can turn a wasteful outcome into a
    good one."""
    lost = reason is not ReleaseReason.EXPLICIT and held < work - 1e-9
    tail = max(0.0, held - work)
    return float(lost or tail >= WASTE_IDLE_SHARE * held or util < WASTE_UTIL_PCT)


@dataclass
class Sample:
    features: RequestFeatures
    targets: tuple[float, ...]  # by TARGETS
    wasted: float | None  # the job's own outcome, when it ran (wasteful): 1 or 0
    world: int
    # what the job would have done had it run, also where it did not: known only because the
    # world is simulated (a real ledger has no outcome for a denied request), so it is for
    # evaluation (council.evaluate), never for training
    would_waste: float = math.nan
    # the chance the logging policy ran it (1 where it approved; the exploration share where
    # it denied and ran it anyway): training on outcomes weighs a ran request by 1 / this
    propensity: float = 1.0
    # the chance of a wasteful job from the project's habits at the time alone, which no model
    # sees (council.evaluate's habits heuristic, "oracle")
    habit_waste: float = math.nan
    # when the job that ran ended, and its outcome became known; None where it did not run
    ended_at: float | None = None
    # what the same job would have done approved with guardrails (a stricter idle release,
    # council.guardrails), on the same draws: for evaluation, as would_waste is
    would_waste_guarded: float = math.nan
    # when the project's habits changed (inf: never), which no record shows: for evaluation
    # (the habit-change figure, council.outcomes.CHANGE_DAYS)
    changed_at: float = math.inf
    # the project's habits when it asked, which no model sees (benchmarks/waste_ceiling.py)
    habits: Habits | None = None
    # whether the job's work itself runs under WASTE_UTIL_PCT (its only work phase bursts now
    # and then): waste no guardrail on idle tails, leases or budgets would remove, drawn per
    # job (benchmarks/waste_ceiling.py's bound on the human band)
    low_util: bool = False

    def outcome_at(self, cut: float) -> float | None:
        """`wasted` as a ledger knows it at time `cut`: None until the job has run and
        ended (a job still running at the cut has an outcome nobody knows yet)."""
        return self.wasted if self.ended_at is not None and self.ended_at <= cut else None


def _habits(rng: random.Random) -> Habits:
    """One project's habits: a care level shared by its hoarding, bursting and overrunning
    (a logit shift, normal with sd HABIT_SIGMA), each habit with a spread of its own."""
    care = rng.gauss(0.0, HABIT_SIGMA)
    hoard, bursty, overrun = (
        sigmoid(base + care + rng.gauss(0.0, HABIT_OWN_SIGMA)) for base in HABIT_LOGITS
    )
    w = [rng.gammavariate(a, 1.0) for a in (1.0, 4.0, 2.0, 0.3)]
    return Habits(
        hoard,
        bursty,
        overrun,
        rng.uniform(1.0, 3.0),
        rng.uniform(0, 0.4),
        (w[0] / sum(w), w[1] / sum(w), w[2] / sum(w), w[3] / sum(w)),
    )


def synthetic_jobs(seed: int, days: float = 60, projects: int = 24) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for p in range(projects):
        rate = math.exp(rng.uniform(math.log(0.3), math.log(6.0)))  # jobs per day
        t = EPOCH + rng.uniform(0, 2) * 86400
        while t < EPOCH + days * 86400:
            count = rng.choices((1, 2, 4, 8, 16), (25, 25, 25, 17, 8))[0]
            hours = min(200.0, max(0.1, rng.lognormvariate(math.log(4), 1.2)))
            jobs.append(Job(f"team-{p:02d}", t, count, hours))
            t += rng.expovariate(rate) * 86400
    return sorted(jobs, key=lambda j: (j.submit, j.project))


@dataclass
class _Project:
    habits: tuple[Habits, Habits]
    switch_at: float
    budget: float | None
    past: list[PastJob] = field(default_factory=list)
    spent: dict[int, float] = field(default_factory=dict)  # by budget period
    usage: float = 0.0
    usage_at: float = 0.0

    def at(self, t: float) -> Habits:
        return self.habits[t >= self.switch_at]


@dataclass(order=True)
class _Running:
    end: float
    project: str = field(compare=False)
    count: int = field(compare=False)
    gpu_type: str = field(compare=False)
    committed: float = field(compare=False)
    record: PastJob = field(compare=False)
    period: int = field(compare=False)


class World:
    """One replay. `run()` returns its samples."""

    def __init__(
        self, jobs: list[Job], config: FleetConfig, seed: int, world: int, explore: float = 0.0
    ) -> None:
        """`explore`: the share of the requests the reference denies that run anyway (each
        drawn on its own seed), so that outcomes are known where the logging policy says no."""
        self.jobs, self.world, self.explore = jobs, world, explore
        self.rng = random.Random(seed)
        sim = SimulationSettings(seed=seed, workloads={p: p for p in PROFILES})
        self.config = config.model_copy(update={"simulation": sim})
        self.fleet = SimulatedFleet(self.config)
        self.gpus = {
            t: [g.uuid for g in self.fleet.inventory() if g.gpu_type == t] for t in config.catalog
        }
        self.total = sum(len(v) for v in self.gpus.values())
        start = jobs[0].submit if jobs else EPOCH
        span = (jobs[-1].submit - start) if jobs else 1.0
        self.projects: dict[str, _Project] = {}
        for name in sorted({j.project for j in jobs}):
            budget = (
                None
                if self.rng.random() < 0.3
                else math.exp(self.rng.uniform(math.log(200), math.log(8000)))
            )
            self.projects[name] = _Project(
                (_habits(self.rng), _habits(self.rng)),
                start + self.rng.uniform(0.2, 0.8) * span if self.rng.random() < 0.7 else math.inf,
                budget,
            )
        self.running: list[_Running] = []
        self._unmanaged: dict[str, tuple[float, float]] = {}  # GPU-hours used, held

    def unmanaged_util(self) -> dict[str, float]:
        """Per project, the mean utilisation of what its jobs so far would hold with no
        monitor (GPU-hour weighted): the calibration figure (the module's docstring)."""
        return {p: used / held for p, (used, held) in sorted(self._unmanaged.items()) if held}

    def unmanaged_util_all(self) -> float | None:
        """The same over all projects (None before any job)."""
        held = sum(h for _, h in self._unmanaged.values())
        return sum(u for u, _ in self._unmanaged.values()) / held if held else None

    def run(self) -> list[Sample]:
        samples = []
        for job in self.jobs:
            self._finish(job.submit)
            sample = self._submit(job)
            if sample is not None:
                samples.append(sample)
        return samples

    def _finish(self, now: float) -> None:
        half_life = self.config.scheduler.half_life_hours
        while self.running and self.running[0].end <= now:
            r = heapq.heappop(self.running)
            p = self.projects[r.project]
            p.past.append(r.record)
            p.spent[r.period] = p.spent.get(r.period, 0.0) + r.record.cost_usd
            p.usage = decayed(p.usage, p.usage_at, r.end, half_life) + r.record.gpu_hours
            p.usage_at = r.end

    def _request(self, job: Job, habits: Habits) -> GPURequest | None:
        rng = self.rng
        training = job.count >= 2 or job.hours >= 4
        purpose = (
            Purpose.TRAINING
            if training and rng.random() < 0.85
            else rng.choice((Purpose.INFERENCE, Purpose.RESEARCH))
        )
        gpu_type = None
        if purpose is not Purpose.TRAINING and rng.random() < habits.mismatch:
            gpu_type = rng.choice(self.config.pool(Purpose.TRAINING))
        pad = rng.uniform(1.0, habits.pad)
        hours = min(
            self.config.limits.max_duration_hours, max(0.25, math.ceil(job.hours * pad * 4) / 4)
        )
        priority = rng.choices(list(Priority), habits.priority)[0]
        try:
            request = GPURequest.model_validate(
                {
                    "project": job.project,
                    "purpose": purpose,
                    "type": gpu_type,
                    "count": job.count,
                    "duration_hours": hours,
                    "priority": priority,
                    "request_id": f"w{self.world}-{job.submit:.0f}-{job.project}",
                }
            )
            check_against_fleet(request, self.config)
        except (GPUAgentError, ValueError):
            return None
        return request

    def _standing(self, name: str, now: float) -> Standing:
        p = self.projects[name]
        half_life = self.config.scheduler.half_life_hours
        usage = {n: decayed(q.usage, q.usage_at, now, half_life) for n, q in self.projects.items()}
        for r in self.running:
            usage[r.project] += r.count * max(0.0, now - (r.end - r.record.hours * 3600)) / 3600
        total = sum(usage.values())
        factors = fair_share_factors(usage, self.config.shares, [name])
        remaining = None
        if p.budget is not None:
            period = self._period(now)
            committed = sum(
                r.committed for r in self.running if r.project == name and r.period == period
            )
            remaining = p.budget - p.spent.get(period, 0.0) - committed
        return Standing(remaining, usage[name] / total if total > 0 else 0.0, factors[name])

    def _period(self, now: float) -> int:
        return int((now - EPOCH) // (BUDGET_PERIOD_DAYS * 86400))

    def _older(self, past: list[PastJob], keep: int) -> RecordSummary | None:
        if len(past) <= keep:
            return None
        at = past[-keep].ended_at
        half_life_h = self.config.council.record_half_life_days * 24
        out = summarise(
            (
                (j.count, j.hours, j.hoarded_hours, j.ended_at, j.reason, j.util_pct)
                for j in past[: len(past) - keep]
            ),
            at,
            half_life_h,
        )
        return out if out.events else None

    def _submit(self, job: Job) -> Sample | None:
        now, p = job.submit, self.projects[job.project]
        habits = p.at(now)
        request = self._request(job, habits)
        if request is None:
            return None
        standing = self._standing(job.project, now)
        if refusal(request, self.config, standing.remaining_usd):
            return None
        held: dict[str, int] = {}
        for r in self.running:
            held[r.gpu_type] = held.get(r.gpu_type, 0) + r.count
        keep = self.config.council.history_events
        features = assemble(
            request,
            self.config,
            standing,
            tuple(p.past[-keep:]),
            self._older(p.past, keep),
            held,
            now,
        )
        voted = not auto_approves(
            features, request.priority is Priority.CRITICAL, self.config.council
        )
        targets = tuple(member_vote(m, features).probability for m in MEMBERS)
        council_p = sum(targets) / len(targets)
        runs = not voted or council_p > self.config.council.band("reference")[0]
        propensity = 1.0
        if not runs and self.explore > 0:
            runs = random.Random(f"explore:{self.world}:{request.request_id}").random() < (
                self.explore
            )
            propensity = self.explore
        # a job that does not run is drawn on its own seed, and recorded nowhere
        rng = self.rng if runs else random.Random(f"{self.world}:{request.request_id}")
        plan = self._plan(job, request, habits, rng)
        self._tally(request, plan)
        wasted, ended_at = self._run(plan, request, now) if runs else (None, None)
        if not voted:
            return None
        would = self._play(plan, request, now)[1] if wasted is None else wasted
        guarded = self._play(plan, request, now, self.config.council.guard_idle_minutes)[1]
        habit_waste = 1 - (1 - habits.hoard) * (1 - habits.bursty) * (1 - habits.overrun)
        return Sample(
            features,
            (*targets, council_p),
            wasted,
            self.world,
            would,
            propensity,
            habit_waste,
            ended_at,
            guarded,
            p.switch_at,
            habits,
            plan.phases[0][0] == "bursty",
        )

    def _tally(self, request: GPURequest, plan: _Plan) -> None:
        """Adds what the planned job would use and hold with no monitor to its project's."""
        held = sum(hours for _, hours in plan.phases)
        if plan.cut is not None:
            held = min(held, plan.cut)
        used = PROFILES[plan.phases[0][0]].mean_util * min(plan.work, held)
        before = self._unmanaged.get(request.project, (0.0, 0.0))
        self._unmanaged[request.project] = (
            before[0] + request.count * used,
            before[1] + request.count * held,
        )

    def _run(self, plan: _Plan, request: GPURequest, now: float) -> tuple[float, float]:
        """Runs the job on the simulated fleet under the monitor; records its history.
        Whether it was wasted, and when it ended."""
        record, wasted = self._play(plan, request, now)
        price = self.config.catalog[plan.gpu_type].price_per_hour
        heapq.heappush(
            self.running,
            _Running(
                record.ended_at,
                request.project,
                request.count,
                plan.gpu_type,
                price * request.count * plan.hours,
                record,
                self._period(now),
            ),
        )
        return wasted, record.ended_at

    def _plan(self, job: Job, request: GPURequest, habits: Habits, rng: random.Random) -> _Plan:
        """What the job will do once placed, drawn from `rng`: the type it is routed to, its
        lease (as placed: fleet.routing.lease_on), its work (the job's own duration, scaled
        to the type's speed) and its phases; a hoarder holds the GPUs to the lease's end."""
        types = [request.gpu_type] if request.gpu_type else self.config.pool(request.purpose)
        gpu_type = min(types, key=lambda t: estimate(request, self.config, t)[1])
        hours, _ = estimate(request, self.config, gpu_type)
        lease = lease_on(hours, request)
        work = min(hours, job.hours * hours / request.duration_hours)
        phases = [("bursty" if rng.random() < habits.bursty else "train", work)]
        if rng.random() < habits.hoard:
            phases.append(("hoard", lease - work))
        cut = rng.uniform(0.1, 1.0) * lease if rng.random() < habits.overrun else None
        return _Plan(gpu_type, lease, work, tuple(phases), cut)

    def _play(
        self, plan: _Plan, request: GPURequest, now: float, guard_minutes: float | None = None
    ) -> tuple[PastJob, float]:
        """What the planned job does under the monitor (with an approval's stricter idle
        release where `guard_minutes` is given): its record, and whether it was wasted."""
        held, util, reason = self._watch(request, plan, now, guard_minutes)
        price = self.config.catalog[plan.gpu_type].price_per_hour
        busy = min(1.0, sum(r.count for r in self.running) / self.total)
        record = PastJob(
            now + held * 3600,
            request.count,
            held,
            price * request.count * held,
            util,
            reason,
            busy,  # an idle release here: idle throughout
            hoarded_hours=held if reason is ReleaseReason.IDLE else 0.0,
            lease_hours=plan.hours,
        )
        return record, wasteful(held, util, reason, plan.work)

    def _term(self, lease: float) -> float | None:
        """The term an approval with guardrails holds its lease for, in hours, where the
        fleet sets one and the lease is longer (as nodes.allocate places it); no command
        runs in these worlds, so its monitor decides a tick before each term ends."""
        hours = self.config.council.guard_lease_hours
        if hours is None:
            return None
        term = term_hours(hours, renewal_lead_s(self.config.monitor, None, False))
        return term if term < lease else None

    def _watch(
        self, request: GPURequest, plan: _Plan, start: float, guard_minutes: float | None
    ) -> tuple[float, float, ReleaseReason]:
        """What the monitor makes of the plan: hours held, mean utilisation, why it ended.
        With `guard_minutes` (an approval with guardrails), its stricter idle release (by
        the stream too, where the fleet's guardrails read it) and, where the fleet sets one,
        its lease held a term at a time (fleet.monitoring.renews decides each term, as
        nodes.monitor does; a term not renewed ends at its end)."""
        settings, cut, lease = self.config.monitor, plan.cut, plan.hours
        stream = guard_minutes is not None and self.config.council.guard_idle_release == "stream"
        after = functools.partial(shipped().after, lease_hours=lease) if stream else None
        policy = IdlePolicy(guard_minutes=guard_minutes, release_after=after)
        gpus = self.gpus[plan.gpu_type][: min(2, request.count)]
        state, t, util_time = MonitorState(), 0.0, 0.0
        term = None if guard_minutes is None else self._term(lease)
        lead = renewal_lead_s(settings, None, False)
        # idling that began within a tick of a term's start read as idle all of it, the
        # worlds' tick where it is the longer (fleet.monitoring.renews)
        coarse = settings.model_copy(update={"tick_seconds": max(settings.tick_seconds, TICK_S)})
        began, ends = 0.0, term or lease  # the term under way, hours from the start
        for profile, length in plan.phases:
            if length <= 0:
                continue
            # the monitor ticks every 10 min where it can conclude something; a training
            # phase needs fewer readings to give its mean
            tick = max(TICK_S, length * 3600 / 6) if profile == "train" else TICK_S
            end, grid = t + length, t  # grid: the last of the ticks every `tick`
            while t < end:
                step = min(tick / 3600, end - t) if t == grid else min(grid + tick / 3600, end) - t
                decide = math.inf
                if term is not None and ends < lease:
                    decide = decided_at(ends * 3600, term, lead) / 3600
                # a tick more where a term is decided on, the others where they were
                extra = 1e-9 < decide - t < step - 1e-9
                step = decide - t if extra else step
                t += step
                grid = grid if extra else t
                if cut is not None and t >= cut:
                    return cut, util_time / cut if cut > 0 else 0.0, ReleaseReason.BUDGET
                clock = start + t * 3600
                samples = self.fleet.sample(gpus, clock, dict.fromkeys(gpus, profile))
                result = assess(samples, state, settings, clock, start, policy)
                state = result.state
                util_time += (result.mean_util or 0.0) * step
                if result.release is not None:
                    return t, util_time / t, result.release
                while term is not None and ends < lease and t >= decide - 1e-9:
                    if not renews(state, coarse, clock, start + began * 3600):
                        if cut is not None and cut < ends:  # its budget ends it first
                            return cut, util_time / cut, ReleaseReason.BUDGET
                        return ends, util_time / ends, ReleaseReason.LEASE_EXPIRED
                    began, ends = ends, min(ends + term, lease)
                    decide = decided_at(ends * 3600, term, lead) / 3600
        reason = ReleaseReason.EXPLICIT if t < lease - 1e-9 else ReleaseReason.LEASE_EXPIRED
        return t, util_time / t if t > 0 else 0.0, reason


def replay(
    worlds: Iterable[tuple[int, list[Job]]], config: FleetConfig, seed: int, explore: float = 0.0
) -> list[Sample]:
    out: list[Sample] = []
    for world, jobs in worlds:
        out.extend(World(jobs, config, seed * 1000 + world, world, explore).run())
    return out


def cuts(samples: Sequence[Sample]) -> tuple[float, float]:
    """When the training and threshold slices end: 60 and 70 % of the span from the first
    request judged to the last."""
    start = min(s.features.now for s in samples)
    span = max(s.features.now for s in samples) - start
    return start + TRAIN * span, start + THRESHOLDS * span


def time_split(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Training, threshold and test slices by when each request was judged: 60/10/30 % of the
    span from the first to the last."""
    if not samples:
        return [], [], []
    a, b = cuts(samples)
    return (
        [s for s in samples if s.features.now < a],
        [s for s in samples if a <= s.features.now < b],
        [s for s in samples if s.features.now >= b],
    )


def known(samples: Sequence[Sample], cut: float) -> list[Sample]:
    """What a real ledger knows of `samples` at time `cut`: the requests that ran and ended
    by then (Sample.outcome_at)."""
    return [s for s in samples if s.outcome_at(cut) is not None]
