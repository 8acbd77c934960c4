"""The policies gpu-agent is measured against, replayed on the same jobs in virtual time.

All are discrete-event simulations (one heap of arrivals and allocation ends, ties broken by
(time, sequence number), all events at one instant handled before one scheduling pass), so the
same workload always gives the same attempts. GPUs are counted per type: which GPU of a type a
job holds does not change what a baseline does. What a job does on the GPUs it gets is
`sim.lifecycle`'s, the same under every policy; budgets are not enforced (violations are
counted afterwards).

Common to all:

- Allowed types: the type the request names, else its purpose's pool, less the types the
  fleet has fewer GPUs of (in all) than the request needs. A request left with none is refused
  ("unplaced", "more GPUs than the fleet has"); it never waits.
- An allocation costs price_per_hour(type) x GPUs x held hours (end - start), charged when it
  ends. Its `Attempt` comes from `lifecycle.account`, with reason "explicit" when the user
  ended it at the end of its timeline (after the idle tail) and "lease-expired" when the lease
  or walltime ended it.
- An allocation that ends before the job's work is done kills the job; its user asks again at
  the kill time, or when the pause it was killed in ends (`lifecycle.returns_at`;
  `lifecycle.rerun`: training resumes from its last finished work phase, the
  rest start over, up to `MAX_ATTEMPTS`) as a new request with a new submit time.
- Attempts are returned in (end, or submit when never placed; job id; attempt) order.

naive (what an unmanaged shared cluster does):

- Type: the named type, else the most expensive type of the pool (by price_per_hour, ties in
  pool order) among those the fleet has enough GPUs of, "to be safe".
- Strict first come, first served per type: a type's queue starts its head as soon as enough
  GPUs of the type are free, and the head blocks everything behind it (no backfill).
- GPUs held for the requested lease, as cloud VMs nobody stops are: the allocation is held
  for the whole requested lease (`requested_hours` of wall time), no matter when the work
  ends: no auto-release, no early release. Every allocation ends at its lease end
  ("lease-expired"); the job is killed there if its work is not done.

slurm-like (Slurm's multifactor priority with EASY backfill, no cost routing, no idle release):

- Priority: `fleet.scheduler.score` at normal priority, i.e. weight_priority x 0.5 +
  weight_fairshare x F + weight_age x A, with F = 2^(-U/S) (`fair_share_factors`) from each
  project's half-life-decayed GPU-hours (finished allocations' GPU-hours decayed from their
  end, plus running allocations' GPU-hours so far, as the ledger counts them) at the time of the
  pass, and A = min(1, waited / age_max_hours) since this request was submitted. Ties: the
  earlier request. Within a project the order is therefore first come, first served.
- Partitions: types that some pool shares are scheduled together (union of each pool's types;
  a named type belongs to the partition that holds it), each partition with its own queue and
  its own reservation, as Slurm backfills each partition: jobs of different partitions never
  share a GPU type, so they cannot delay each other.
- A scheduling pass runs in a partition when a request arrives in it or an allocation of one of
  its types ends. Waiting requests are taken in priority order. Until the first request that
  cannot start, each starts on the first allowed type (pool order) with enough free GPUs. That
  first blocked request gets the reservation: the earliest time at which enough GPUs of one of
  its allowed types are free, counting running allocations as ending at their walltime
  (start + requested_hours; ties in pool order), with "spare" = the GPUs of that type free
  then beyond what it needs. Every later request starts now only if it fits in free GPUs of an
  allowed type and does not delay the reservation: it uses another type, or its walltime ends
  by the reservation time, or it fits in the spare (which it then uses up). Others wait for a
  later pass.
- Walltime = `requested_hours` of wall time. The allocation ends at the end of the job's
  timeline (the user's process exits after its idle tail: "explicit") or at walltime, whichever
  comes first ("lease-expired"; the job is killed there if its work is not done).

slurm-cheapest (slurm-like with node weights set by cost, as a Slurm administrator sets them):

- Everything as slurm-like, except that each partition's types are ordered cheapest per unit
  of work first (price_per_hour / relative_throughput; ties in pool order) wherever slurm-like
  uses pool order: the type a request starts on (the first allowed type with enough free GPUs,
  backfill included) and ties between types in the reservation. A request that names a type
  still uses only that type.

slurm-batch (slurm-cheapest where work run as a command is a batch job, as `sbatch` runs it):

- Everything as slurm-cheapest, except that a job whose work runs as a launched command (the
  workload's `supervised` jobs, the same draw as those under `gpu-agent run`) is a batch job:
  its allocation ends when its script exits, at its last work phase's end, if that comes
  before its walltime ("explicit"). Other jobs (a shell or a notebook in `salloc`) keep their
  idle tail, up to the walltime.

cheapest-first (what a cloud launcher with autostop does: SkyPilot's optimizer picks the
cheapest resource, and the GPUs go back when the job's session ends: SkyPilot's autostop
waits, by default (`wait_for: jobs_and_ssh`), for running jobs and open SSH sessions, so a
shell or a notebook left open after the command, the workload's idle tail, holds them; the
stricter `wait_for: jobs` is cheapest-autostop, below):

- Type: the named type, else the allowed type cheapest per unit of work (price_per_hour /
  relative_throughput; ties in pool order) among those with enough free GPUs now.
- Strict first come, first served per partition (slurm-like's partitions, one queue each):
  requests are taken in arrival order (submit time, then sequence number). The head of a
  partition's queue starts as soon as an allowed type has enough free GPUs; until then it
  blocks everything behind it in its partition (no backfill), not the other partitions.
- No lease, no walltime, no idle release: the allocation ends at the end of the job's
  timeline (the process exits after its idle tail: "explicit"). No job is ever killed, and
  `requested_hours` plays no role.

cheapest-autostop (cheapest-first with SkyPilot's autostop waiting for jobs alone, `wait_for:
jobs`, at its default 5 idle minutes):

- Everything as cheapest-first, except that a job whose work runs as a launched command (the
  workload's `supervised` jobs, the same draw as those under `gpu-agent run`) ends AUTOSTOP_S
  after its last work phase, where its idle tail is longer: the launcher sees its command
  exit, as `gpu-agent run` tells gpu-agent. Other jobs keep their tail.
"""

from __future__ import annotations

import functools
import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from fleet.config import FleetConfig
from fleet.models import Priority, Purpose, ReleaseReason
from fleet.scheduler import decayed, fair_share_factors, scorer
from sim.lifecycle import (
    Attempt,
    Segment,
    account,
    refused,
    rerun,
    returns_at,
    timeline,
    with_kept,
    work_done_at,
)
from sim.workload import SimJob, Workload, candidate_types

Progress = Callable[[int], None]

EXPLICIT = ReleaseReason.EXPLICIT.value
LEASE_EXPIRED = ReleaseReason.LEASE_EXPIRED.value


@dataclass(eq=False, slots=True)
class _Request:
    """One request waiting for GPUs: the first, or one asked again after a kill."""

    job: SimJob
    attempt: int
    submit: float  # when this request was made (lifecycle.returns_at for a rerun)
    seq: int  # arrival order, the tie-breaker everywhere
    types: tuple[str, ...] = ()  # allowed types, in the order a policy tries them

    @property
    def walltime(self) -> float:
        return self.job.requested_hours * 3600.0


@dataclass(eq=False, slots=True)
class _Alloc:
    """GPUs held by one request, from its timeline's start to `end`."""

    request: _Request
    gpu_type: str
    segments: list[Segment]
    end: float  # when it really ends
    limit: float  # when the scheduler expects it to end at the latest (lease or walltime)
    reason: str

    @property
    def start(self) -> float:
        return self.segments[0].start

    @property
    def count(self) -> int:
        return self.request.job.count


_Event = tuple[float, int, _Request | _Alloc]
_Ranked = tuple[float, float, int, _Request]  # (-score, submit, seq, request)


def _order(a: Attempt) -> tuple[float, int, int]:
    return (a.end if a.end is not None else a.submit, a.job, a.attempt)


class _Simulation(ABC):
    """The event loop every baseline shares: arrivals, allocation ends, reruns and accounting.

    A policy fills in the order it tries a request's types in (`order`), where it waits
    (`enqueue`),
    when its allocation ends (`ends`), what it does when GPUs come back (`released`) and the
    scheduling pass (`schedule`).
    """

    def __init__(self, workload: Workload, config: FleetConfig, progress: Progress | None) -> None:
        self.workload = workload
        self.config = config
        self.progress = progress
        self.capacity = {t: config.gpus_of_type(t) for t in config.catalog}
        self.free = dict(self.capacity)
        self.heap: list[_Event] = []
        self.seq = 0
        self.attempts: list[Attempt] = []

    # ---- policy hooks ------------------------------------------------------------------

    def allowed(self, job: SimJob) -> tuple[str, ...]:
        """The job's candidate types (sim.workload), in the order the policy tries them."""
        return self.order(candidate_types(job, self.config))

    def order(self, types: tuple[str, ...]) -> tuple[str, ...]:
        """The pool's order, unless a policy prefers another."""
        return types

    @abstractmethod
    def enqueue(self, request: _Request, now: float) -> None: ...

    @abstractmethod
    def released(self, alloc: _Alloc, now: float) -> None: ...

    @abstractmethod
    def schedule(self, now: float) -> None: ...

    @abstractmethod
    def ends(self, request: _Request, segments: list[Segment], now: float) -> tuple[float, str]:
        """(when the allocation of a request starting now ends, why)."""

    # ---- the loop ----------------------------------------------------------------------

    def push(self, at: float, item: _Request | _Alloc) -> None:
        heapq.heappush(self.heap, (at, self.seq, item))
        self.seq += 1

    def run(self) -> list[Attempt]:
        for job in sorted(self.workload.jobs, key=lambda j: (j.submit, j.id)):
            self.push(job.submit, _Request(job, 1, job.submit, self.seq))
        while self.heap:
            now, finished = self.heap[0][0], 0
            while self.heap and self.heap[0][0] == now:
                item = heapq.heappop(self.heap)[2]
                if isinstance(item, _Alloc):
                    finished += self.end(item, now)
                else:
                    finished += self.arrive(item, now)
            self.schedule(now)
            if finished and self.progress is not None:
                self.progress(finished)
        return sorted(self.attempts, key=_order)

    def arrive(self, request: _Request, now: float) -> int:
        """Queue the request, or refuse it when no allowed type could ever hold it (1: the job
        is over)."""
        job = request.job
        request.types = tuple(t for t in self.allowed(job) if self.capacity[t] >= job.count)
        if not request.types:
            self.attempts.append(
                refused(
                    job, request.attempt, request.submit, "unplaced", "more GPUs than the fleet has"
                )
            )
            return 1
        self.enqueue(request, now)
        return 0

    def start(self, request: _Request, gpu_type: str, now: float) -> _Alloc:
        segments = timeline(request.job, gpu_type, now, self.config)
        end, reason = self.ends(request, segments, now)
        alloc = _Alloc(request, gpu_type, segments, end, now + request.walltime, reason)
        self.free[gpu_type] -= request.job.count
        self.push(end, alloc)
        return alloc

    def end(self, alloc: _Alloc, now: float) -> int:
        """Free the GPUs, charge, account and ask again after a kill (1: the job is over)."""
        r, job = alloc.request, alloc.request.job
        self.free[alloc.gpu_type] += job.count
        price = self.config.catalog[alloc.gpu_type].price_per_hour
        cost = price * job.count * (now - alloc.start) / 3600.0
        attempt = account(
            job, r.attempt, alloc.gpu_type, r.submit, alloc.segments, now, alloc.reason, cost
        )
        self.attempts.append(attempt)
        self.released(alloc, now)
        if attempt.outcome == "killed":
            again = rerun(job, alloc.segments, now, alloc.reason, r.attempt, self.config)
            self.attempts[-1] = with_kept(attempt, job, again)
            if again is not None:
                back = returns_at(alloc.segments, now)
                self.push(back, _Request(again, r.attempt + 1, back, self.seq))
                return 0
        return 1


class _Naive(_Simulation):
    """Most expensive type, strict FCFS per type, the whole lease held."""

    def __init__(self, workload: Workload, config: FleetConfig, progress: Progress | None) -> None:
        super().__init__(workload, config, progress)
        self.queues: dict[str, deque[_Request]] = {t: deque() for t in config.catalog}
        self.touched: dict[str, None] = {}  # types whose queue may start someone

    def order(self, types: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(types, key=lambda t: -self.config.catalog[t].price_per_hour))

    def enqueue(self, request: _Request, now: float) -> None:
        gpu_type = request.types[0]  # the dearest type that can hold it
        self.queues[gpu_type].append(request)
        self.touched[gpu_type] = None

    def released(self, alloc: _Alloc, now: float) -> None:
        self.touched[alloc.gpu_type] = None

    def schedule(self, now: float) -> None:
        for gpu_type in self.touched:
            queue = self.queues[gpu_type]
            while queue and queue[0].job.count <= self.free[gpu_type]:
                self.start(queue.popleft(), gpu_type, now)
        self.touched.clear()

    def ends(self, request: _Request, segments: list[Segment], now: float) -> tuple[float, str]:
        return now + request.walltime, LEASE_EXPIRED


@dataclass(frozen=True, slots=True)
class _Reservation:
    gpu_type: str
    at: float
    spare: int  # GPUs of the type free at `at` beyond what the reserved request needs


class _SlurmLike(_Simulation):
    """Fair-share and age priority, EASY backfill per partition, walltime kills."""

    def __init__(self, workload: Workload, config: FleetConfig, progress: Progress | None) -> None:
        super().__init__(workload, config, progress)
        self.partition = _partitions(config)
        n = max(self.partition.values()) + 1
        self.types: list[list[str]] = [[] for _ in range(n)]
        for t in config.catalog:
            self.types[self.partition[t]].append(t)
        self.waiting: list[dict[str, list[_Request]]] = [{} for _ in range(n)]  # by project
        self.dirty: dict[int, None] = {}  # partitions that need a pass
        self.running: dict[str, dict[int, _Alloc]] = {t: {} for t in config.catalog}
        self.used: dict[str, tuple[float, float]] = {}  # project: (decayed GPU-h, as of)
        self.origin = min((j.submit for j in workload.jobs), default=0.0)
        self.run_gpus: dict[str, int] = {}  # project: GPUs held now
        self.run_since: dict[str, float] = {}  # project: sum of GPUs x (start - origin)

    def enqueue(self, request: _Request, now: float) -> None:
        p = self.partition[request.types[0]]
        self.waiting[p].setdefault(request.job.project, []).append(request)
        self.dirty[p] = None

    def start(self, request: _Request, gpu_type: str, now: float) -> _Alloc:
        alloc = super().start(request, gpu_type, now)
        self.running[gpu_type][request.seq] = alloc
        project = request.job.project
        self.run_gpus[project] = self.run_gpus.get(project, 0) + alloc.count
        self.run_since[project] = self.run_since.get(project, 0.0) + alloc.count * (
            now - self.origin
        )
        return alloc

    def released(self, alloc: _Alloc, now: float) -> None:
        del self.running[alloc.gpu_type][alloc.request.seq]
        project, n = alloc.request.job.project, alloc.count
        self.run_gpus[project] -= n
        self.run_since[project] -= n * (alloc.start - self.origin)
        if self.run_gpus[project] == 0:
            self.run_since[project] = 0.0  # no rounding residue carried forward
        half_life = self.config.scheduler.half_life_hours
        old, at = self.used.get(project, (0.0, now))
        self.used[project] = (
            decayed(old, at, now, half_life) + n * (now - alloc.start) / 3600.0,
            now,
        )
        self.dirty[self.partition[alloc.gpu_type]] = None

    def ends(self, request: _Request, segments: list[Segment], now: float) -> tuple[float, str]:
        walltime_end = now + request.walltime
        if segments[-1].end <= walltime_end:
            return segments[-1].end, EXPLICIT
        return walltime_end, LEASE_EXPIRED

    def usage(self, now: float) -> dict[str, float]:
        """Decayed GPU-hours per project now, running allocations' hours so far included."""
        half_life = self.config.scheduler.half_life_hours
        out = {p: decayed(v, at, now, half_life) for p, (v, at) in self.used.items()}
        for p, gpus in self.run_gpus.items():
            if gpus:
                held = (gpus * (now - self.origin) - self.run_since[p]) / 3600.0
                out[p] = out.get(p, 0.0) + held
        return out

    def schedule(self, now: float) -> None:
        for p in sorted(self.dirty):
            if self.waiting[p]:
                self.backfill(self.waiting[p], self.types[p], now)
        self.dirty.clear()

    def ranked(self, waiting: dict[str, list[_Request]], now: float) -> Iterator[_Request]:
        """The waiting requests in priority order, produced lazily (a pass that fills the
        partition stops early). Within a project the order is arrival order (same fair share,
        the older request has the higher age), so the projects' queues are merged."""
        factors = fair_share_factors(self.usage(now), self.config.shares, waiting)
        of = scorer(self.config.scheduler)

        def keyed(project: str, queue: list[_Request]) -> Iterator[_Ranked]:
            f = factors[project]
            for r in queue:
                yield (-of(Priority.NORMAL, f, now - r.submit), r.submit, r.seq, r)

        for *_, r in heapq.merge(*(keyed(p, q) for p, q in waiting.items())):
            yield r

    def backfill(self, waiting: dict[str, list[_Request]], types: list[str], now: float) -> None:
        """One EASY-backfill pass over a partition's waiting requests."""
        free = self.free
        idle = sum(free[t] for t in types)
        if idle == 0:
            return  # nothing can start: no need to rank
        started: dict[int, str] = {}  # seq: project
        reservation: _Reservation | None = None
        for r in self.ranked(waiting, now):
            if idle == 0:
                break
            n = r.job.count
            if reservation is None:
                gpu_type = next((t for t in r.types if free[t] >= n), None)
                if gpu_type is None:
                    reservation = self.reserve(r, now)
                    continue
            else:
                gpu_type, reservation = _backfill_type(r, now, free, reservation)
                if gpu_type is None:
                    continue
            self.start(r, gpu_type, now)
            started[r.seq] = r.job.project
            idle -= n
        for project in sorted(set(started.values())):
            rest = [r for r in waiting[project] if r.seq not in started]
            if rest:
                waiting[project] = rest
            else:
                del waiting[project]

    def reserve(self, request: _Request, now: float) -> _Reservation:
        """The earliest time enough GPUs of an allowed type are free, by walltimes."""
        n, best = request.job.count, None
        for t in request.types:  # every one has capacity for it (arrive)
            avail, at = self.free[t], now
            running = sorted(self.running[t].values(), key=lambda a: (a.limit, a.request.seq))
            for alloc in running:
                if avail >= n:
                    break
                avail += alloc.count
                at = alloc.limit
            if best is None or at < best.at:
                best = _Reservation(t, at, avail - n)
        assert best is not None
        return best


class _SlurmCheapest(_SlurmLike):
    """slurm-like with each partition's types weighted cheapest per unit of work first: the
    order of a request's allowed types is what slurm-like tries and breaks ties by."""

    def order(self, types: tuple[str, ...]) -> tuple[str, ...]:
        return _cheapest(types, self.config)


class _SlurmBatch(_SlurmCheapest):
    """slurm-cheapest whose launched commands are batch jobs: Slurm ends a batch job when its
    script exits, so such a job holds no idle tail."""

    def ends(self, request: _Request, segments: list[Segment], now: float) -> tuple[float, str]:
        if request.job.supervised:
            done = work_done_at(segments)
            if done <= now + request.walltime:
                return done, EXPLICIT
        return super().ends(request, segments, now)


class _CheapestFirst(_Simulation):
    """The cheapest type free now, strict FCFS per partition, released when the process
    exits."""

    def __init__(self, workload: Workload, config: FleetConfig, progress: Progress | None) -> None:
        super().__init__(workload, config, progress)
        self.partition = _partitions(config)
        self.queues: dict[int, deque[_Request]] = {p: deque() for p in self.partition.values()}
        self.dirty: dict[int, None] = {}  # partitions whose head may start

    def order(self, types: tuple[str, ...]) -> tuple[str, ...]:
        return _cheapest(types, self.config)

    def enqueue(self, request: _Request, now: float) -> None:
        # requests arrive in (submit, seq) order: the heap's order, reruns included
        p = self.partition[request.types[0]]
        self.queues[p].append(request)
        self.dirty[p] = None

    def released(self, alloc: _Alloc, now: float) -> None:
        self.dirty[self.partition[alloc.gpu_type]] = None

    def schedule(self, now: float) -> None:
        for p in self.dirty:
            queue = self.queues[p]
            while queue:
                head = queue[0]
                gpu_type = next((t for t in head.types if self.free[t] >= head.job.count), None)
                if gpu_type is None:
                    break  # the head blocks its partition
                self.start(queue.popleft(), gpu_type, now)
        self.dirty.clear()

    def ends(self, request: _Request, segments: list[Segment], now: float) -> tuple[float, str]:
        return segments[-1].end, EXPLICIT


# SkyPilot's default autostop idle time (`sky autostop -i`, `resources.autostop: true`)
AUTOSTOP_S = 5 * 60.0


class _CheapestAutostop(_CheapestFirst):
    """cheapest-first whose launcher stops a launched job's GPUs AUTOSTOP_S after its command
    exits (SkyPilot's autostop with `wait_for: jobs`); a job whose work is no launched command
    (SimJob.supervised false: a shell or a notebook) keeps its tail."""

    def ends(self, request: _Request, segments: list[Segment], now: float) -> tuple[float, str]:
        end, reason = super().ends(request, segments, now)
        if request.job.supervised:
            end = min(end, work_done_at(segments) + AUTOSTOP_S)
        return end, reason


def _cheapest(types: Sequence[str], config: FleetConfig) -> tuple[str, ...]:
    """The types cheapest per unit of work first, ties in the order given: a type twice as
    fast runs the same work in half the hours, so what the work costs is price / throughput."""
    catalog = config.catalog
    return tuple(
        sorted(types, key=lambda t: catalog[t].price_per_hour / catalog[t].relative_throughput)
    )


def _backfill_type(
    request: _Request, now: float, free: dict[str, int], reservation: _Reservation
) -> tuple[str | None, _Reservation]:
    """The first allowed type the request may start on now without delaying the reservation,
    and the reservation with the spare GPUs it then uses taken out."""
    n = request.job.count
    for t in request.types:
        if free[t] < n:
            continue
        if t != reservation.gpu_type or now + request.walltime <= reservation.at:
            return t, reservation
        if n <= reservation.spare:
            return t, _Reservation(t, reservation.at, reservation.spare - n)
    return None, reservation


def _partitions(config: FleetConfig) -> dict[str, int]:
    """Each GPU type's partition: types joined by a shared pool, numbered in catalog order."""
    parent = {t: t for t in config.catalog}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    for purpose in Purpose:
        pool = config.pool(purpose)
        for t in pool[1:]:
            parent[root(t)] = root(pool[0])
    numbers: dict[str, int] = {}
    return {t: numbers.setdefault(root(t), len(numbers)) for t in config.catalog}


BASELINES: dict[str, type[_Simulation]] = {
    "naive": _Naive,
    "slurm-like": _SlurmLike,
    "slurm-cheapest": _SlurmCheapest,
    "slurm-batch": _SlurmBatch,
    "cheapest-first": _CheapestFirst,
    "cheapest-autostop": _CheapestAutostop,
}


def run_baseline(
    name: str, workload: Workload, config: FleetConfig, progress: Progress | None = None
) -> list[Attempt]:
    """Every attempt of every job under baseline `name` (see the module docstring);
    `progress(n)` hears of the jobs that have ended for good (completed, refused, given up)."""
    return BASELINES[name](workload, config, progress).run()


run_naive = functools.partial(run_baseline, "naive")
run_slurm_like = functools.partial(run_baseline, "slurm-like")
run_slurm_cheapest = functools.partial(run_baseline, "slurm-cheapest")
run_slurm_batch = functools.partial(run_baseline, "slurm-batch")
run_cheapest_first = functools.partial(run_baseline, "cheapest-first")
run_cheapest_autostop = functools.partial(run_baseline, "cheapest-autostop")

__all__ = [
    "BASELINES",
    "run_baseline",
    "run_cheapest_autostop",
    "run_cheapest_first",
    "run_naive",
    "run_slurm_batch",
    "run_slurm_cheapest",
    "run_slurm_like",
]
