"""What a job does with the GPUs it gets, the same under every policy.

Placed on a type at a time, a job's phases become a timeline: work runs `hours x reference
throughput / throughput of the type` (a faster GPU finishes the same work sooner), idle phases
take their wall time on any type. The work is done at the end of the last work phase; the idle
tail after it is GPUs held with no work (hoarding) until the user lets go.

When an allocation ends before the work is done (released for idling, a lease that ran out),
the job is killed. Killed work is not a saving: the user asks again (at once, or when a pause
it was killed in is over: `returns_at`). A job that checkpoints (`SimJob.checkpoints`: a
training job, or any job of the pure workload) does so at the end of each work phase and
resumes from the last checkpoint; the others start over. A supervised one also checkpoints
when it is given notice: a lease or a budget ends it at a deadline known ahead (`gpu-agent run
--notice`, or Slurm's `--signal`, under every policy alike), so it loses none of its work
(NOTICED). The second request pads the
rest of the job as the first did, twice as much after a lease ran out. After MAX_ATTEMPTS the
job counts as failed work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleet.config import FleetConfig
from fleet.models import Purpose, ReleaseReason
from fleet.speeds import table_speed
from sim.workload import Phase, SimJob, candidate_types, loan_types, requested

MAX_ATTEMPTS = 3
RESTORE_S = 60.0  # a preempted job's next allocation first loads its checkpoint: no work
NOTICED = frozenset(r.value for r in ReleaseReason if r.with_notice)


@dataclass(frozen=True)
class Segment:
    start: float  # epoch seconds
    end: float
    util: float  # SM utilisation %, 0 when idle
    work: float  # reference hours of work this segment does


def speed(job: SimJob, gpu_type: str, config: FleetConfig) -> float:
    """How much faster than on its reference type the job works on `gpu_type`: by its
    workload's speeds where the fleet file has them, else by the types' averages."""
    return table_speed(config, job.workload, gpu_type) / table_speed(
        config, job.workload, job.reference
    )


def timeline(job: SimJob, gpu_type: str, start: float, config: FleetConfig) -> list[Segment]:
    v = speed(job, gpu_type, config)
    out, t = [], start
    for p in job.phases:
        seconds = (p.hours / v if p.work else p.hours) * 3600.0
        out.append(Segment(t, t + seconds, p.util, p.hours if p.work else 0.0))
        t += seconds
    return out


def work_done_at(segments: list[Segment]) -> float:
    """When the last work segment ends (the start when the job has no work left)."""
    ends = [s.end for s in segments if s.util > 0]
    return max(ends) if ends else segments[0].start


@dataclass(frozen=True)
class Attempt:
    """One allocation of one job, or a request that never got GPUs."""

    job: int
    attempt: int  # 1 for the first request
    project: str
    purpose: Purpose
    gpu_type: str | None
    count: int
    submit: float  # when this attempt was requested
    start: float | None
    end: float | None
    outcome: str  # completed | killed | preempted (checkpointed, asked again) | denied | unplaced
    reason: str  # the release reason, or why it was denied
    cost_usd: float = 0.0
    held_gpu_hours: float = 0.0
    util_gpu_hours: float = 0.0  # sum of utilisation x GPU-hours / 100
    paused_gpu_hours: float = 0.0  # held at 0 % before the work was done
    hoarded_gpu_hours: float = 0.0  # held after the work was done
    work_gpu_hours: float = 0.0  # reference GPU-hours of work run (lost work included)
    done_at: float | None = None  # the job's work finished in this attempt
    # of a killed attempt: the reference GPU-hours of its work that its rerun does not redo
    # (a checkpointing job's, up to its checkpoint: with_kept); the rest was lost
    kept_gpu_hours: float = 0.0


def _work_hours(job: SimJob) -> float:
    return sum(p.hours for p in job.phases if p.work)


def with_kept(attempt: Attempt, job: SimJob, again: SimJob | None) -> Attempt:
    """The killed `attempt` of `job`, with the work its rerun `again` does not redo: what a
    killed attempt cost for work that was kept is work, not waste (sim.accounting.parts).
    Without a rerun (the job gave up) none of it counts as kept."""
    if attempt.outcome != "killed" or again is None:
        return attempt
    kept = max(0.0, _work_hours(job) - _work_hours(again))
    return replace(attempt, kept_gpu_hours=job.count * kept)


def account(
    job: SimJob,
    attempt: int,
    gpu_type: str,
    submit: float,
    segments: list[Segment],
    end: float,
    reason: ReleaseReason | str,
    cost_usd: float,
) -> Attempt:
    """The attempt's figures for an allocation held from the timeline's start until `end`."""
    start = segments[0].start
    done = work_done_at(segments)
    held = util = idle = hoard = work = 0.0
    for s in segments:
        a, b = s.start, min(s.end, end)
        if b <= a:
            continue
        hours = (b - a) / 3600.0
        held += hours
        util += hours * s.util / 100.0
        work += s.work * (b - a) / (s.end - s.start) if s.end > s.start else 0.0
        if s.util == 0:
            if a >= done:
                hoard += hours
            else:
                idle += hours
    if end > segments[-1].end:  # held past the timeline (a lease with nothing left to run)
        extra = (end - max(segments[-1].end, start)) / 3600.0
        held += extra
        hoard += extra
    completed = end >= done - 1e-6
    n = job.count
    return Attempt(
        job=job.id,
        attempt=attempt,
        project=job.project,
        purpose=job.purpose,
        gpu_type=gpu_type,
        count=n,
        submit=submit,
        start=start,
        end=end,
        outcome="completed" if completed else "killed",
        reason=str(reason),
        cost_usd=cost_usd,
        held_gpu_hours=n * held,
        util_gpu_hours=n * util,
        paused_gpu_hours=n * idle,
        hoarded_gpu_hours=n * hoard,
        work_gpu_hours=n * work,
        done_at=done if completed else None,
    )


def returns_at(segments: list[Segment], end: float) -> float:
    """When the user of a job killed at `end` asks again: at once, unless the job was paused
    then (an idle segment with work after it): then when the pause ends and they come back."""
    done = work_done_at(segments)
    for s in segments:
        if s.util == 0 and s.start <= end < s.end and s.end <= done:
            return s.end
    return end


def rerun(
    job: SimJob,
    segments: list[Segment],
    end: float,
    reason: ReleaseReason | str,
    attempt: int,
    config: FleetConfig,
) -> SimJob | None:
    """The job its user asks for again after a kill at `end`, or None when it gives up."""
    if attempt >= MAX_ATTEMPTS:
        return None
    rest: tuple[Phase, ...] = job.phases
    if job.checkpoints:
        kept = 0  # phases up to the last work phase finished by `end` are checkpointed
        for i, s in enumerate(segments):
            if s.util > 0 and s.end <= end:
                kept = i + 1
            elif (
                s.util > 0 and s.start < end < s.end and job.supervised and str(reason) in NOTICED
            ):  # noticed mid-phase: checkpointed at `end`
                left = (s.end - end) / (s.end - s.start)
                rest = (
                    replace(job.phases[i], hours=job.phases[i].hours * left),
                    *job.phases[i + 1 :],
                )
                break
        else:
            rest = job.phases[kept:]
        while rest and not rest[0].work:
            rest = rest[1:]
    if not any(p.work for p in rest):
        return None
    pad = job.pad * (2.0 if str(reason) == ReleaseReason.LEASE_EXPIRED.value else 1.0)
    hours = sum(p.hours for p in rest)
    return replace(
        job,
        phases=rest,
        pad=pad,
        requested_hours=requested(hours, pad, config.limits.max_duration_hours),
    )


def restored(job: SimJob, config: FleetConfig) -> SimJob:
    """The rest of a job that yielded (preempted or reclaimed, its work checkpointed), as its
    next allocation runs it: RESTORE_S loading the checkpoint, GPUs held with no work, then the
    work; its lease that much longer on the fastest type it may get, a loan included where
    the fleet lends (a lease is asked in the reference type's hours, and loading takes its
    wall time on any type: counted on its own pool's types alone, a loan to a faster type
    ran out of lease before its work, on the whole trace 207 times with research and
    inference borrowing idle H100s). The cost of a preemption beside the notice."""
    hours = RESTORE_S / 3600.0
    loans = loan_types(job, config) if config.preemption.borrow else ()
    fastest = max(speed(job, t, config) for t in candidate_types(job, config) + loans)
    return replace(
        job,
        phases=(Phase(hours, 0.0), *job.phases),
        requested_hours=min(
            job.requested_hours + hours * fastest, config.limits.max_duration_hours
        ),
    )


def refused(job: SimJob, attempt: int, submit: float, outcome: str, reason: str) -> Attempt:
    return Attempt(
        job=job.id,
        attempt=attempt,
        project=job.project,
        purpose=job.purpose,
        gpu_type=None,
        count=job.count,
        submit=submit,
        start=None,
        end=None,
        outcome=outcome,
        reason=reason,
    )
