"""Work in one unit, the physical floor of a run, and where one policy's dollars go.

GPU-hours of different types are not the same work: an H100-hour does twice an A100-hour's
work on the trace fleet. So work is counted in hours of one unit type (the catalog's type of
relative throughput 1.0, else the training pool's reference: A100 on the trace fleet), through
the throughput table, for every policy alike:

    work_units(job) = GPUs x work hours on the job's reference type
                      x throughput(reference) / throughput(unit)

The **floor** of a job is what its work costs at the cheapest type it may use (its named
type, else its pool's types and the other pools' types it could borrow with the memory it
needs, less types the fleet has fewer GPUs of than it needs), held for
its work at that type's speed plus its mid-job pauses (which no policy can avoid: the job is
paused, not done), and not one minute of idle tail:

    floor_usd(job) = min over allowed t of price(t) x GPUs
                     x (work hours x throughput(reference) / throughput(t) + pause hours)

The floor of a run is the sum over all of the trace's jobs, done or not: no policy can do
all of the work for less. A policy's `cost_vs_floor` is its total cost over that sum, and its
`work_share` the work units it completed over the trace's.

A policy's cost splits by what the GPUs were doing (`breakdown`), each part at the held type's
price: **tail** (held after the work was done: the idle tail and a lease with nothing left),
**pause** (held at 0 % before the work was done), **killed** (the work of killed attempts that
was lost: redone by a rerun, or never done where the job gave up) and **work** (the rest: the
work of completed and preempted attempts, and the work a killed attempt kept, up to the
checkpoint its rerun resumed from, `Attempt.kept_gpu_hours`). The four add up to the total
cost. (Until 2026-12-07 a killed attempt's kept work counted as killed, which showed it as a
routing saving of the policy that killed it.)

`savings(base, other)` explains base's cost minus other's in dollars, in parts that add up:
hoarding cut (tail), pauses cut (pause), kills avoided (killed), routing (the work cost on
the jobs both completed) and work not done (the work cost of jobs that base completed and
other did not, less the converse). A saving in the last part is not a saving.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet.config import FleetConfig
from fleet.models import Purpose
from sim.lifecycle import Attempt, speed
from sim.workload import SimJob, candidate_types, loan_types

PARTS = ("work", "pause", "tail", "killed")
SAVINGS = ("tail", "pause", "killed", "routing", "work_not_done")


def unit_type(config: FleetConfig) -> str:
    """The type whose hours measure work: throughput 1.0, else the training reference."""
    for name, spec in config.catalog.items():
        if spec.relative_throughput == 1.0:
            return name
    return config.pool(Purpose.TRAINING)[0]


def work_units(job: SimJob, config: FleetConfig) -> float:
    """The job's work in hours of the unit type."""
    return job.work_gpu_hours / speed(job, unit_type(config), config)


def allowed_types(job: SimJob, config: FleetConfig) -> tuple[str, ...]:
    """The named type, else the pool's types and those it could borrow from other pools (where
    a policy lends: sim.workload.loan_types), less those the fleet has too few GPUs of (all of
    them when none has enough: the floor is then a bound nobody reaches)."""
    types = candidate_types(job, config) + loan_types(job, config)
    fits = tuple(t for t in types if config.gpus_of_type(t) >= job.count)
    return fits or types


def pause_hours(job: SimJob) -> float:
    """Idle time between the first and the last work phase: a paused job is not done."""
    last = max((i for i, p in enumerate(job.phases) if p.work), default=-1)
    return sum(p.hours for p in job.phases[:last] if not p.work)


def _held_usd(job: SimJob, gpu_type: str, config: FleetConfig) -> float:
    """The job's work and pauses held on `gpu_type`, at its price."""
    hours = job.work_hours / speed(job, gpu_type, config) + pause_hours(job)
    return config.catalog[gpu_type].price_per_hour * job.count * hours


def floor_type(job: SimJob, config: FleetConfig) -> str:
    """The cheapest type the job may use for its work and pauses: where the floor prices it."""
    return min(allowed_types(job, config), key=lambda t: _held_usd(job, t, config))


def floor_usd(job: SimJob, config: FleetConfig) -> float:
    """The job's work and pauses on the cheapest type it may use."""
    if not any(p.work for p in job.phases):
        return 0.0
    return _held_usd(job, floor_type(job, config), config)


def fastest_hours(job: SimJob, config: FleetConfig) -> float:
    """The job alone on the fastest type it may use: its work at that type's speed and its
    mid-job pauses, from its start to the end of its work (0 for a job with no work). No
    policy finishes the job sooner after its submit."""
    if not any(p.work for p in job.phases):
        return 0.0
    fastest = max(speed(job, t, config) for t in allowed_types(job, config))
    return job.work_hours / fastest + pause_hours(job)


@dataclass(frozen=True)
class Floor:
    unit: str  # the type whose hours measure work
    usd: float
    work_units: float


def floor(jobs: Iterable[SimJob], config: FleetConfig) -> Floor:
    usd = units = 0.0
    for j in jobs:
        usd += floor_usd(j, config)
        units += work_units(j, config)
    return Floor(unit_type(config), usd, units)


def parts(attempt: Attempt, config: FleetConfig) -> dict[str, float]:
    """The attempt's cost split into PARTS (see the module docstring)."""
    out = dict.fromkeys(PARTS, 0.0)
    if attempt.gpu_type is None:
        return out
    price = config.catalog[attempt.gpu_type].price_per_hour
    out["tail"] = attempt.hoarded_gpu_hours * price
    out["pause"] = attempt.paused_gpu_hours * price
    rest = attempt.cost_usd - out["tail"] - out["pause"]  # held while working, on one type
    kept = 1.0
    if attempt.outcome == "killed":  # its work up to the checkpoint its rerun resumed from
        run = attempt.work_gpu_hours
        kept = min(1.0, attempt.kept_gpu_hours / run) if run > 0 else 0.0
    out["work"] = rest * kept
    out["killed"] = rest - out["work"]
    return out


def breakdown(attempts: Iterable[Attempt], config: FleetConfig) -> dict[str, float]:
    total = dict.fromkeys(PARTS, 0.0)
    for a in attempts:
        for k, v in parts(a, config).items():
            total[k] += v
    return total


def completed_jobs(attempts: Iterable[Attempt]) -> set[int]:
    return {a.job for a in attempts if a.outcome == "completed"}


def work_cost_by_job(attempts: Iterable[Attempt], config: FleetConfig) -> dict[int, float]:
    """The `work` part of each job's attempts (its killed attempts' kept work included)."""
    out: dict[int, float] = defaultdict(float)
    for a in attempts:
        out[a.job] += parts(a, config)["work"]
    return out


def savings(
    base: Sequence[Attempt], other: Sequence[Attempt], config: FleetConfig
) -> dict[str, float]:
    """base's cost minus other's, explained in SAVINGS parts that add up to `total`."""
    b, o = breakdown(base, config), breakdown(other, config)
    done_b, done_o = completed_jobs(base), completed_jobs(other)
    work_b, work_o = work_cost_by_job(base, config), work_cost_by_job(other, config)
    not_done = sum(work_b[j] for j in done_b - done_o) - sum(work_o[j] for j in done_o - done_b)
    out = {
        "tail": b["tail"] - o["tail"],
        "pause": b["pause"] - o["pause"],
        "killed": b["killed"] - o["killed"],
        "routing": b["work"] - o["work"] - not_done,
        "work_not_done": not_done,
    }
    out["total"] = sum(out.values())
    return out


def same_work(
    jobs: Sequence[SimJob], runs: Mapping[str, Sequence[Attempt]], config: FleetConfig
) -> dict[str, object]:
    """Each policy's cost on the jobs that every policy completed, against their floor."""
    common = set.intersection(*(completed_jobs(a) for a in runs.values())) if runs else set()
    floor_common = sum(floor_usd(j, config) for j in jobs if j.id in common)
    policies: dict[str, dict[str, float | None]] = {}
    for name, attempts in runs.items():
        cost = sum(a.cost_usd for a in attempts if a.job in common)
        policies[name] = {
            "cost_usd": round(cost, 2),
            "cost_vs_floor": round(cost / floor_common, 6) if floor_common else None,
        }
    return {"jobs": len(common), "floor_usd": round(floor_common, 2), "policies": policies}
