"""What a policy's attempts come to: cost, utilisation, completion times, fairness, waste.

Every policy replays the same `SimJob`s; `metrics(jobs, attempts, config, budgets)` turns its
attempts (`sim.lifecycle.Attempt`) into one JSON-ready dict. Definitions (GPU-hours are GPUs x
hours; times are from the job's first submit; "span" is the first submit of any job to the last
end of any attempt; the fleet is `sum(node.gpus)` GPUs):

- **Job status**: a job is *completed* when one of its attempts completed; otherwise its last
  attempt (highest attempt number) decides: *denied* (refused by policy, e.g. budget), *failed*
  (killed and not asked again: MAX_ATTEMPTS kills or nothing left worth rerunning) or
  *unplaced* (never got GPUs; a job with no attempt at all counts here too).
- **total_cost_usd**: sum of the attempts' `cost_usd` (what the ledger charged).
- **gpu_hours_held**: sum of the attempts' held GPU-hours, busy or not.
- **useful_gpu_hours**: `SimJob.work_gpu_hours` (work in GPU-hours of the job's reference type)
  summed over completed jobs; work of a job that did not complete is worth nothing. This adds
  T4-hours to H100-hours; the figures below in work units do not.
- **work_units_completed**: the work of completed jobs in hours of the unit type
  (`sim.accounting.work_units`: A100-hours of work on the trace fleet); **work_share**: that
  over the work units of all of the trace's jobs; **cost_per_work_unit**: total_cost_usd /
  work_units_completed; **cost_vs_floor**: total_cost_usd / the run's floor (all of the
  trace's work at the cheapest type each job may use, with its unavoidable pauses:
  `sim.accounting.floor`). A policy that does all the work at the floor's price scores
  work_share 1 and cost_vs_floor 1.
- **cost_breakdown_usd** {work, pause, tail, killed}: the total cost split by what the GPUs
  were doing (`sim.accounting.breakdown`).
- **cost_per_useful_gpu_hour**: total_cost_usd / useful_gpu_hours (null when nothing completed).
- **allocation_util**: gpu_hours_held / (fleet GPUs x span hours); the share of the fleet that
  was allocated, whatever the GPUs did.
- **sm_util**: utilised GPU-hours (sum of SM utilisation x GPU-hours / 100) / gpu_hours_held;
  how busy the allocated GPUs were (DCGM-style SM utilisation, kept apart from allocation).
- **sm_util_fleet**: utilised GPU-hours / (fleet GPUs x span hours).
- **jct_hours** {mean, p50, p99}: over completed jobs, the completing attempt's `done_at` (when
  the work finished, not when the GPUs were let go) minus the job's submit.
- **slowdown_mean**: over completed jobs with work, the mean of each job's bounded slowdown
  max(1, JCT / max(alone, 10 s)), where alone is the job's time on its own on the fastest type
  it may use (`sim.accounting.fastest_hours`: its work at that type's speed plus its mid-job
  pauses; its named type, else its pool's types the fleet has enough GPUs of). No policy
  finishes a job sooner than alone, so a job's slowdown is 1 when it started at once on the
  fastest type and ran without a break, 2 when it took twice that; the 10 s bound
  (SLOWDOWN_BOUND_S; Feitelson et al., "Theory and Practice in Parallel Job Scheduling",
  JSSPP 1997) keeps a one-second job that waited a minute from weighing as 60 jobs. Jobs
  that did not complete are not in it (as in JCT): read it beside work_share.
- **queue_hours** {mean, p50, p99}: over jobs that got GPUs at least once, the start of their
  first placed attempt minus the job's submit (first start - arrival).
- Percentiles are numpy's default (linear interpolation between closest ranks: the q-th
  percentile of sorted x[0..n-1] sits at rank q/100 x (n - 1)). Empty sets give null.
- **jain_fairness**: Jain's index J = (sum x)^2 / (n sum x^2) (research/scheduling.md section
  3) over the n projects with at least one job with work, of finish-time ratios that see
  refusals: x_p is the mean over all of p's jobs with work of min(1, isolated / JCT) for a
  completed job and 0 for a job that was denied, failed or never placed. isolated is the
  job's time to finish its work on the trace (its phases up to the end of the last work
  phase, i.e. `trace_hours` less the idle tail, which JCT does not include either). x = 1 is
  a project whose every job finished as soon as on its own trace GPUs, x = 1/2 one whose
  jobs took twice as long or half of whose jobs were refused (the inverse of Themis'
  finish-time fairness rho); a job sped up by a faster type is capped at 1. J is 1 when
  every project is served alike and 1/n when one project alone is served; null when no
  project has work or every x is 0. **jain_work_share**: the same index over the projects'
  work shares (below).
- **budget_violations** {count, usd}: projects whose total cost exceeds their budget, and the
  sum over them of cost - budget. A project without a budget never violates.
- **work_share_in_budget**: work_share counting only the jobs that finished their work before
  their project's spend passed its budget (each attempt's cost accrued evenly over its
  holding): the work a policy did with money the project had. Equal to work_share for a
  policy without violations; the fair measure of a baseline that overruns budgets.
- **hoarded_gpu_hours**: GPU-hours held after the job's work was done (idle tail, lease left).
- **paused_gpu_hours**: GPU-hours held at 0 % before the work was done (pauses).
- **jobs** {total, completed, failed, denied, unplaced}: the job statuses above.
- **work**: *completed_gpu_hours* = useful_gpu_hours; *failed_gpu_hours* = work of the jobs
  that did not complete (failed, denied or unplaced); *run_gpu_hours* = sum of the attempts'
  `work_gpu_hours` (reference GPU-hours of work actually run, re-runs included);
  *lost_gpu_hours* = run_gpu_hours - useful_gpu_hours, the work that ran and did not end up
  in a completed job = *redone_gpu_hours* (completed jobs: work run in all their attempts
  minus the job's work, i.e. work killed before a checkpoint and run again) +
  *abandoned_gpu_hours* (all work run by jobs that never completed); *lost_work_units*, the
  lost work in work units (hours of the unit type, as work_share counts it: reference-type
  hours of T4 and A100 jobs are not the same work, and added up they compared policies that
  lose different work in different units; the report's "Lost work" row); *preempted_attempts*
  (attempts told to go with notice that checkpointed and were asked for again: their work is
  kept, so they are neither killed nor lost work; sim/borrowing.py); *killed_attempts*,
  *kill_reasons* {reason: count} and *wasted_cost_usd* (what killed attempts cost for work
  that was lost: sim.accounting.parts).
- **per_project** {project: {cost_usd, budget_usd, gpu_hours_held, useful_gpu_hours,
  share_of_gpu_hours (of all GPU-hours held), jobs, jobs_completed, finish_ratio (x_p),
  work_share (the project's completed work units over its trace work units), slowdown_mean
  (the mean slowdown of the project's completed jobs, as above: how soon its jobs finished,
  so that each project's can be compared across policies)}}.
- **series** (for plots, not the table): `t_hours` (GRID_POINTS points over the span, from the
  first submit), `cost_usd` (cumulative cost, each attempt's cost accrued evenly over its
  holding), `gpus_held` (GPUs allocated at each t, an attempt holding [start, end)) and
  `jct_cdf` {pct: 0..100, hours: the JCT percentiles}: the JCT distribution in 101 numbers,
  whatever the number of jobs.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet.budget import Running, reaches_at
from fleet.config import FleetConfig
from sim.accounting import Floor, breakdown, fastest_hours, floor, parts, work_units
from sim.lifecycle import Attempt
from sim.workload import SimJob

HOUR = 3600.0
GRID_POINTS = 200
SLOWDOWN_BOUND_S = 10.0  # a job shorter than this counts as this long in its slowdown
CHUNK = 8192  # attempts per block when sampling the series (bounds memory on 100k attempts)
STATUSES = ("completed", "failed", "denied", "unplaced")
_FAILED_BY = {"killed": "failed", "denied": "denied", "unplaced": "unplaced"}


def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal, 1/n when one has all."""
    if not xs:
        raise ValueError("Jain's index of no values")
    square = sum(x * x for x in xs)
    if square <= 0:
        raise ValueError("Jain's index of all zeros")
    return sum(xs) ** 2 / (len(xs) * square)


def percentiles(xs: Sequence[float], qs: Sequence[float]) -> list[float]:
    """numpy's default (linear) percentiles, so p50 of [1, 2, 6] is 2 and p99 is 5.92."""
    if not xs:
        raise ValueError("percentiles of no values")
    return [float(v) for v in np.percentile(np.asarray(xs, dtype=float), list(qs))]


def summary(xs: Sequence[float], digits: int = 4) -> dict[str, float | None]:
    """{mean, p50, p99}, null for an empty set (no completed job is not zero hours)."""
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    p50, p99 = percentiles(xs, (50, 99))
    return {"mean": _r(sum(xs) / len(xs), digits), "p50": _r(p50, digits), "p99": _r(p99, digits)}


def isolated_hours(job: SimJob) -> float:
    """Time the job needed on its trace GPUs to finish its work: phases to the last work one."""
    ends = [i for i, p in enumerate(job.phases) if p.work]
    return sum(p.hours for p in job.phases[: ends[-1] + 1]) if ends else 0.0


def slowdown(result: JobResult, config: FleetConfig) -> float | None:
    """The job's bounded slowdown (module docstring); None when it did not complete or had
    no work."""
    alone = fastest_hours(result.job, config)
    if result.jct_hours is None or alone <= 0:
        return None
    return max(1.0, result.jct_hours / max(alone, SLOWDOWN_BOUND_S / HOUR))


def _mean(xs: Sequence[float]) -> float | None:
    return _r(sum(xs) / len(xs)) if xs else None


@dataclass(frozen=True)
class JobResult:
    """One job under one policy: what became of it and when."""

    job: SimJob
    status: str  # completed | failed | denied | unplaced
    jct_hours: float | None  # completed jobs only
    queue_hours: float | None  # jobs that got GPUs at least once
    run_gpu_hours: float  # work run over all attempts (reference GPU-hours)

    @property
    def finish_ratio(self) -> float | None:
        """min(1, isolated / JCT), 0 when not completed; None when the job had no work."""
        isolated = isolated_hours(self.job)
        if isolated <= 0:
            return None
        if self.jct_hours is None:
            return 0.0
        return 1.0 if self.jct_hours <= isolated else isolated / self.jct_hours


def job_results(jobs: Sequence[SimJob], attempts: Sequence[Attempt]) -> list[JobResult]:
    """Each job's status, JCT and queueing delay from its attempts (in attempt order)."""
    by_job: dict[int, list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_job[a.job].append(a)
    out = []
    for job in jobs:
        tries = sorted(by_job.get(job.id, []), key=lambda a: a.attempt)
        done = next((a for a in tries if a.outcome == "completed"), None)
        if done is not None:
            status = "completed"
        else:
            status = _FAILED_BY.get(tries[-1].outcome, "failed") if tries else "unplaced"
        starts = [a.start for a in tries if a.start is not None]
        end = done.done_at if done is not None and done.done_at is not None else None
        out.append(
            JobResult(
                job=job,
                status=status,
                jct_hours=(end - job.submit) / HOUR if end is not None else None,
                queue_hours=(starts[0] - job.submit) / HOUR if starts else None,
                run_gpu_hours=sum(a.work_gpu_hours for a in tries),
            )
        )
    return out


def _r(x: float, digits: int = 4) -> float:
    """Rounded, and -0.0 made 0.0, so that equal results print the same."""
    return round(x, digits) + 0.0


def _ratio(num: float, den: float, digits: int = 6) -> float | None:
    return _r(num / den, digits) if den > 0 else None


def _span(jobs: Sequence[SimJob], attempts: Sequence[Attempt]) -> tuple[float, float]:
    """(first submit, last attempt end) in epoch seconds; an empty run spans nothing."""
    submits = [j.submit for j in jobs] or [a.submit for a in attempts]
    if not submits:
        return 0.0, 0.0
    first = min(submits)
    ends = [a.end for a in attempts if a.end is not None]
    return first, max([first, *ends])


def _budgets(cost: Mapping[str, float], budgets: Mapping[str, float]) -> dict[str, float | int]:
    over = [cost.get(p, 0.0) - b for p, b in budgets.items() if cost.get(p, 0.0) > b + 1e-9]
    return {"count": len(over), "usd": _r(sum(over), 2)}


def overrun_at(attempts: Sequence[Attempt], budget: float) -> float:
    """When the attempts' spend, each attempt's cost accrued evenly over its holding, passes
    `budget` (inf if it never does): fleet.budget.reaches_at, the ledger's own sweep."""
    items = [
        Running(str(i), a.cost_usd / (end - start), start, end)
        for i, a in enumerate(attempts)
        if (start := a.start) is not None
        and (end := a.end) is not None
        and end > start
        and a.cost_usd > 0
    ]
    return reaches_at(items, budget, min((r.started_at for r in items), default=0.0))


def _in_budget_units(
    results: Sequence[JobResult],
    attempts: Sequence[Attempt],
    budgets: Mapping[str, float],
    config: FleetConfig,
) -> float:
    """The work units of completed jobs whose work finished before their project's spend
    passed its budget."""
    by_project: dict[str, list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_project[a.project].append(a)
    cutoff = {p: overrun_at(by_project[p], b) for p, b in budgets.items()}
    done_at = {a.job: a.done_at or a.end or 0.0 for a in attempts if a.outcome == "completed"}
    return sum(
        work_units(r.job, config)
        for r in results
        if r.status == "completed" and done_at[r.job.id] <= cutoff.get(r.job.project, math.inf)
    )


def _work(
    results: Sequence[JobResult], attempts: Sequence[Attempt], useful: float, config: FleetConfig
) -> dict[str, Any]:
    killed = [a for a in attempts if a.outcome == "killed"]
    run = sum(a.work_gpu_hours for a in attempts)
    # the same in work units (hours of the unit type): each job's reference-type hours
    # scaled as its work is, so that work lost on T4s and on A100s adds up
    unit = {r.job.id: work_units(r.job, config) / r.job.work_gpu_hours for r in results
            if r.job.work_gpu_hours > 0}  # fmt: skip
    run_units = sum(a.work_gpu_hours * unit.get(a.job, 0.0) for a in attempts)
    done_units = sum(work_units(r.job, config) for r in results if r.status == "completed")
    redone = sum(r.run_gpu_hours - r.job.work_gpu_hours for r in results if r.status == "completed")
    abandoned = sum(r.run_gpu_hours for r in results if r.status != "completed")
    return {
        "completed_gpu_hours": _r(useful),
        "failed_gpu_hours": _r(
            sum(r.job.work_gpu_hours for r in results if r.status != "completed")
        ),
        "run_gpu_hours": _r(run),
        "lost_gpu_hours": _r(max(0.0, run - useful)),
        "lost_work_units": _r(max(0.0, run_units - done_units)),
        "redone_gpu_hours": _r(max(0.0, redone)),
        "abandoned_gpu_hours": _r(abandoned),
        "killed_attempts": len(killed),
        "preempted_attempts": sum(1 for a in attempts if a.outcome == "preempted"),
        "kill_reasons": dict(sorted(Counter(a.reason for a in killed).items())),
        "wasted_cost_usd": _r(sum(parts(a, config)["killed"] for a in killed), 2),
    }


def _per_project(
    results: Sequence[JobResult],
    attempts: Sequence[Attempt],
    budgets: Mapping[str, float],
    held: float,
    config: FleetConfig,
    slowdowns: Mapping[int, float],
) -> dict[str, dict[str, Any]]:
    cost: dict[str, float] = defaultdict(float)
    hours: dict[str, float] = defaultdict(float)
    for a in attempts:
        cost[a.project] += a.cost_usd
        hours[a.project] += a.held_gpu_hours
    by_project: dict[str, list[JobResult]] = defaultdict(list)
    for r in results:
        by_project[r.job.project].append(r)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted({*cost, *budgets, *by_project}):
        done = [r for r in by_project[p] if r.status == "completed"]
        ratios = [x for r in by_project[p] if (x := r.finish_ratio) is not None]
        work = sum(work_units(r.job, config) for r in by_project[p])
        out[p] = {
            "cost_usd": _r(cost[p], 2),
            "budget_usd": budgets.get(p),
            "gpu_hours_held": _r(hours[p]),
            "useful_gpu_hours": _r(sum(r.job.work_gpu_hours for r in done)),
            "share_of_gpu_hours": _ratio(hours[p], held),
            "jobs": len(by_project[p]),
            "jobs_completed": len(done),
            "finish_ratio": _r(sum(ratios) / len(ratios), 6) if ratios else None,
            "work_share": _ratio(sum(work_units(r.job, config) for r in done), work),
            "slowdown_mean": _mean([slowdowns[r.job.id] for r in done if r.job.id in slowdowns]),
        }
    return out


def _fairness(projects: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    """Jain's index over the projects' `key` (those that have one)."""
    xs = [v[key] for v in projects.values() if v[key] is not None]
    return _r(jain(xs), 6) if xs and any(x > 0 for x in xs) else None


def worst_project(policy: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any] | None:
    """The project whose mean slowdown under `policy` is the largest multiple of its mean
    slowdown under `base` (both metrics() dicts), over the projects both completed jobs of:
    {project, ratio}; a ratio over 1 is a project served worse than under `base`."""
    mine, theirs = policy.get("per_project", {}), base.get("per_project", {})
    ratios = {
        p: v["slowdown_mean"] / theirs[p]["slowdown_mean"]
        for p, v in mine.items()
        if v.get("slowdown_mean") and (theirs.get(p) or {}).get("slowdown_mean")
    }
    if not ratios:
        return None
    project = max(sorted(ratios), key=lambda p: ratios[p])
    return {"project": project, "ratio": _r(ratios[project], 6)}


def series(
    attempts: Sequence[Attempt],
    first: float,
    last: float,
    jcts: Sequence[float],
    points: int = GRID_POINTS,
) -> dict[str, Any]:
    """Cumulative cost and GPUs held on a fixed grid over the span, and the JCT CDF."""
    grid = np.linspace(first, last, points)
    cost = np.zeros(points)
    held = np.zeros(points)
    placed = [a for a in attempts if a.start is not None and a.end is not None]
    for i in range(0, len(placed), CHUNK):
        block = placed[i : i + CHUNK]
        s = np.array([a.start for a in block], dtype=float)[:, None]
        e = np.array([a.end for a in block], dtype=float)[:, None]
        c = np.array([a.cost_usd for a in block], dtype=float)[:, None]
        n = np.array([a.count for a in block], dtype=float)[:, None]
        length = np.where(e > s, e - s, 1.0)
        frac = np.where(e > s, np.clip((grid - s) / length, 0.0, 1.0), grid >= s)
        cost += (c * frac).sum(axis=0)
        held += (n * ((grid >= s) & (grid < e))).sum(axis=0)
    pct = list(range(101))
    return {
        "t_hours": [_r((t - first) / HOUR) for t in grid.tolist()],
        "cost_usd": [_r(v, 2) for v in cost.tolist()],
        "gpus_held": [_r(v, 2) for v in held.tolist()],
        "jct_cdf": {"pct": pct, "hours": [_r(v) for v in percentiles(jcts, pct)] if jcts else []},
    }


def metrics(
    jobs: Sequence[SimJob],
    attempts: Sequence[Attempt],
    config: FleetConfig,
    budgets: Mapping[str, float],
    bound: Floor | None = None,
) -> dict[str, Any]:
    """One policy's figures on `jobs` (see the module docstring for each definition);
    `bound` is the run's floor when the caller has it already (it is the same for every
    policy)."""
    results = job_results(jobs, attempts)
    first, last = _span(jobs, attempts)
    span = (last - first) / HOUR
    fleet = sum(n.gpus for n in config.nodes)
    cost = sum(a.cost_usd for a in attempts)
    held = sum(a.held_gpu_hours for a in attempts)
    util = sum(a.util_gpu_hours for a in attempts)
    useful = sum(r.job.work_gpu_hours for r in results if r.status == "completed")
    jcts = [r.jct_hours for r in results if r.jct_hours is not None]
    queues = [r.queue_hours for r in results if r.queue_hours is not None]
    project_cost: dict[str, float] = defaultdict(float)
    for a in attempts:
        project_cost[a.project] += a.cost_usd
    slowdowns = {r.job.id: x for r in results if (x := slowdown(r, config)) is not None}
    projects = _per_project(results, attempts, budgets, held, config, slowdowns)
    statuses = Counter(r.status for r in results)
    bound = bound or floor(jobs, config)
    units = sum(work_units(r.job, config) for r in results if r.status == "completed")
    return {
        "fleet_gpus": fleet,
        "span_hours": _r(span),
        "total_cost_usd": _r(cost, 2),
        "gpu_hours_held": _r(held),
        "useful_gpu_hours": _r(useful),
        "cost_per_useful_gpu_hour": _ratio(cost, useful, 4),
        "work_units_completed": _r(units),
        "work_share": _ratio(units, bound.work_units),
        "cost_per_work_unit": _ratio(cost, units, 4),
        "cost_vs_floor": _ratio(cost, bound.usd),
        "cost_breakdown_usd": {k: _r(v, 2) for k, v in breakdown(attempts, config).items()},
        "allocation_util": _ratio(held, fleet * span),
        "sm_util": _ratio(util, held),
        "sm_util_fleet": _ratio(util, fleet * span),
        "jct_hours": summary(jcts),
        "slowdown_mean": _mean(list(slowdowns.values())),
        "queue_hours": summary(queues),
        "jain_fairness": _fairness(projects, "finish_ratio"),
        "jain_work_share": _fairness(projects, "work_share"),
        "budget_violations": _budgets(project_cost, budgets),
        "work_share_in_budget": _ratio(
            _in_budget_units(results, attempts, budgets, config), bound.work_units
        ),
        "hoarded_gpu_hours": _r(sum(a.hoarded_gpu_hours for a in attempts)),
        "paused_gpu_hours": _r(sum(a.paused_gpu_hours for a in attempts)),
        "jobs": {"total": len(results), **{s: statuses.get(s, 0) for s in STATUSES}},
        "work": _work(results, attempts, useful, config),
        "per_project": projects,
        "series": series(attempts, first, last, jcts),
    }
