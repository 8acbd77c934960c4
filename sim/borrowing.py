"""slurm-cheapest-borrow: slurm-cheapest with borrowing between pools, as Kueue's cohorts do.

Each purpose's pool is a partition of its own under slurm-cheapest (sim/baselines.py), so
on the whole Philly trace the inference pool's GPUs sit idle while training work queues.
Here the GPUs of a partition with nobody waiting lend to another partition's queue, and are
reclaimed, with notice, when their own partition's work arrives. Everything else is
slurm-cheapest's. This measures the lever in the simulator only; gpu-agent's own routing
does not borrow yet.

- Who borrows: a waiting training request that leaves the type to the router (a job that
  names its type keeps it) and runs under `gpu-agent run`, so that it can checkpoint when
  told to go. After each scheduling pass, the waiting requests of each partition are taken in
  priority order (at most LOOK of them per partition and pass); one borrows a type of
  another partition when that partition has no request waiting, the type has enough free
  GPUs, and the job would finish its work there (at the type's speed) before it would on
  its own pool: its own start estimated by slurm-cheapest's reservation (running
  allocations end at their walltimes, nobody ahead of it counted: the estimate errs towards
  not borrowing). Of the types that qualify, the one that finishes it soonest. Its walltime
  on the borrowed type is its lease scaled to the type's speed, so that a slower type does
  not end it at the lease.
- Reclaim: after each pass in a partition, its first waiting request (priority order) that
  cannot start takes back borrowed GPUs of one of its types: the youngest loans first, as
  many as it needs beyond the free GPUs and those already coming back. A reclaimed loan gets
  NOTICE_S seconds of notice; it checkpoints and lets go at the end of the notice (or ends
  sooner if its work is done first). The reclaiming request starts when they are free.
- No work lost, nothing charged twice: a reclaimed attempt is charged for what it held,
  from its start to the end of the notice, and counted with outcome "preempted" (its work
  done counted as run); the rest of the job, its phases from where it stopped, is asked for
  again at once in its own partition with the rest of its lease, and that attempt is
  charged for its own holding. A preemption is never a kill: it does not count towards
  MAX_ATTEMPTS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import islice

from fleet.config import FleetConfig
from sim.baselines import _Alloc, _Request, _SlurmCheapest
from sim.lifecycle import (
    Attempt,
    Segment,
    account,
    restored,
    speed,
    timeline,
    work_done_at,
)
from sim.workload import SimJob, Workload, borrows, loan_types

NOTICE_S = 60.0  # a reclaimed loan's notice: it checkpoints and lets go this long after
LOOK = 32  # waiting requests considered for a loan per partition and pass (bounds the work)
PREEMPTED = "preempted"


def resumed(job: SimJob, segments: list[Segment], end: float) -> SimJob:
    """The rest of a job checkpointed at `end`: the phases not yet over, the one running then
    cut where it stopped, with the same share of its lease."""
    rest = []
    for phase, s in zip(job.phases, segments, strict=True):
        if s.end <= end:
            continue
        if s.start < end:
            phase = replace(phase, hours=phase.hours * (s.end - end) / (s.end - s.start))
        rest.append(phase)
    share = sum(p.hours for p in rest if p.work) / job.work_hours if job.work_hours else 0.0
    return replace(job, phases=tuple(rest), requested_hours=job.requested_hours * share)


class BorrowingSlurm(_SlurmCheapest):
    """slurm-cheapest whose idle partitions lend GPUs to other partitions' queues."""

    def __init__(
        self, workload: Workload, config: FleetConfig, progress: Callable[[int], None] | None
    ) -> None:
        super().__init__(workload, config, progress)
        self.loans: dict[str, dict[int, _Alloc]] = {t: {} for t in config.catalog}
        self.lent: dict[int, SimJob] = {}  # a loan's job as it asked (its own lease)
        self.noticed: set[int] = set()  # loans told to go
        self.coming: dict[str, int] = dict.fromkeys(config.catalog, 0)  # GPUs given back soon
        self.preemptions = 0

    # ---- a pass: slurm-cheapest's, then reclaim, then lend -------------------------------

    def schedule(self, now: float) -> None:
        touched = sorted(self.dirty)
        super().schedule(now)
        for p in touched:
            self.reclaim(p, now)
        self.lend(now)

    def lend(self, now: float) -> None:
        """Loans of idle partitions' free GPUs to the requests that finish sooner on them."""
        for p, waiting in enumerate(self.waiting):
            if not waiting:
                continue
            lendable = [
                t
                for q, types in enumerate(self.types)
                if q != p and not self.waiting[q]
                for t in types
                if self.free[t] > 0
            ]
            if not lendable:
                continue
            for r in list(islice(self.ranked(waiting, now), LOOK)):  # borrow() edits waiting
                if not any(self.free[t] > 0 for t in lendable):
                    break
                if borrows(r.job):
                    self.borrow(r, lendable, p, now)

    def borrow(self, r: _Request, lendable: list[str], p: int, now: float) -> None:
        held = loan_types(r.job, self.config)  # those with the memory its work needs
        fits = [t for t in lendable if self.free[t] >= r.job.count and t in held]
        if not fits:
            return
        finish = {t: work_done_at(timeline(r.job, t, now, self.config)) for t in fits}
        best = min(fits, key=lambda t: (finish[t], t))
        own = self.reserve(r, now)
        if finish[best] >= work_done_at(timeline(r.job, own.gpu_type, own.at, self.config)):
            return
        queue = self.waiting[p][r.job.project]
        queue.remove(r)
        if not queue:
            del self.waiting[p][r.job.project]
        slower = max(1.0, 1.0 / speed(r.job, best, self.config))
        loan = _Request(
            replace(r.job, requested_hours=r.job.requested_hours * slower),
            r.attempt,
            r.submit,
            r.seq,
            r.types,
        )
        alloc = self.start(loan, best, now)
        self.loans[best][r.seq] = alloc
        self.lent[r.seq] = r.job

    def reclaim(self, p: int, now: float) -> None:
        """The partition's first waiting request that cannot start takes back loans."""
        waiting = self.waiting[p]
        if not waiting or not any(self.loans[t] for t in self.types[p]):
            return
        head = next(self.ranked(waiting, now))
        n = head.job.count
        for t in head.types:
            have = self.free[t] + self.coming[t]
            if have >= n:
                return  # it starts when what is coming back is free
            loans = [a for s, a in self.loans[t].items() if s not in self.noticed]
            if have + sum(a.count for a in loans) < n:
                continue
            for alloc in sorted(loans, key=lambda a: (-a.start, -a.request.seq)):
                if have >= n:
                    break
                self.notice(alloc, now)
                have += alloc.count
            return

    def notice(self, alloc: _Alloc, now: float) -> None:
        """Tell a loan to go: it ends at the end of the notice, or sooner when its work is."""
        self.noticed.add(alloc.request.seq)
        self.coming[alloc.gpu_type] += alloc.count
        if alloc.end > now + NOTICE_S:
            alloc.end = alloc.limit = now + NOTICE_S
            alloc.reason = PREEMPTED
            self.push(alloc.end, alloc)

    # ---- ends -----------------------------------------------------------------------------

    def end(self, alloc: _Alloc, now: float) -> int:
        seq = alloc.request.seq
        if now > alloc.end:
            return 0  # the loan's own end, after it was reclaimed
        if seq in self.noticed:
            self.noticed.discard(seq)
            self.coming[alloc.gpu_type] -= alloc.count
        if alloc.reason != PREEMPTED:
            return super().end(alloc, now)
        self.preemptions += 1
        r, job = alloc.request, alloc.request.job
        self.free[alloc.gpu_type] += job.count
        cost = self.config.catalog[alloc.gpu_type].price_per_hour * job.count
        cost *= (now - alloc.start) / 3600.0
        attempt = account(
            job, r.attempt, alloc.gpu_type, r.submit, alloc.segments, now, PREEMPTED, cost
        )
        done = attempt.outcome == "completed"  # only its idle tail was left: it is over
        self.attempts.append(attempt if done else replace(attempt, outcome=PREEMPTED))
        self.released(alloc, now)
        if done:
            self.lent.pop(seq, None)
            return 1
        rest = restored(resumed(self.lent.pop(seq, job), alloc.segments, now), self.config)
        self.push(now, _Request(rest, r.attempt + 1, now, self.seq))
        return 0

    def released(self, alloc: _Alloc, now: float) -> None:
        super().released(alloc, now)
        self.loans[alloc.gpu_type].pop(alloc.request.seq, None)
        if alloc.reason != PREEMPTED:
            self.lent.pop(alloc.request.seq, None)


def run_borrowing(
    workload: Workload, config: FleetConfig, progress: Callable[[int], None] | None = None
) -> tuple[list[Attempt], int]:
    """Every attempt of every job under slurm-cheapest-borrow, and how many loans it
    reclaimed."""
    sim = BorrowingSlurm(workload, config, progress)
    return sim.run(), sim.preemptions
