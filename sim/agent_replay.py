"""The `gpu-agent` policy on a trace: every job is a request through the graph's own nodes.

Each job attempt is a graph thread in the engine (sim/engine.py), with the real ledger (a
scratch SQLite file in the run's state directory), the real council, routing, fair queue,
monitor and auto-release, and the project budgets of the workload enforced. The simulated
user does what the trace says: a supervised job's command (`gpu-agent run`; also an
unsupervised one's where the council's guardrails ask for it and its owner complies,
`under_command`) starts with the allocation and exits when its work is done, which the
monitor reads as `gpu-agent run` reports it (fleet.commands); when the job's timeline ends
(after its idle tail) the user releases the GPUs, unless the monitor released them first. A
user whose job was killed asks again at once, saying which allocation the new request
resumes (`GPURequest.resumes`). A split council goes to a simulated reviewer who approves (a
team lead who trusts their team); the count of reviews is reported.
"""

from __future__ import annotations

import functools
import gc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from council.voting import Council
from fleet.config import FleetConfig
from fleet.models import GPURequest, Release, ReleaseReason, Status
from fleet.monitors import new_owner
from nodes.context import open_services
from nodes.state import State, guardrails_of
from sim.engine import Engine, EventClock, GraphThread
from sim.lifecycle import (
    Attempt,
    Segment,
    account,
    refused,
    rerun,
    restored,
    returns_at,
    timeline,
    with_kept,
    work_done_at,
)
from sim.telemetry import TraceFleet
from sim.workload import SimJob, Workload, borrows

NOTICE_S = 60.0  # a supervised job's checkpoint notice (`gpu-agent run --notice 60`)
RUNNER = new_owner("run")  # the simulated users' `gpu-agent run`: this process, alive
HORIZON_DAYS = 365  # requests still queued this long after the last submission are unplaced
STEP_HOURS = 24.0  # the engine runs a virtual day at a time between progress reports


@dataclass
class _Run:
    job: SimJob
    attempt: int
    submit: float
    segments: list[Segment] = field(default_factory=list)
    resumes: str | None = None  # the killed allocation whose work this attempt goes on with
    preempted: int = 0  # earlier attempts that yielded (preempted, work kept): never kills


@dataclass
class AgentRun:
    attempts: list[Attempt]
    council: Counter[str]  # outcome -> count
    reviews: int
    steps: Counter[str]  # node runs by node


def request_for(job: SimJob, attempt: int, resumes: str | None = None) -> GPURequest:
    """The job's request: a supervised job that checkpoints carries its checkpoint notice (it
    checkpoints when given notice, sim.lifecycle), so the fleet may preempt it; one that may
    borrow another pool's GPUs (fleet.borrowing, where the fleet file opts in) also says the
    memory its work needs (sim.workload.loan_types)."""
    noticed = job.supervised and job.checkpoints
    return GPURequest.model_validate(
        {
            "project": job.project,
            "purpose": job.purpose,
            "type": job.named_type,
            "count": job.count,
            "duration_hours": job.requested_hours,
            "request_id": f"{job.id}-{attempt}",
            "resumes": resumes,
            "notice_seconds": NOTICE_S if noticed else None,
            "min_memory_gb": job.memory_gb if borrows(job) else None,
            "workload": job.workload,
        }
    )


def under_command(job: SimJob, state: State) -> bool:
    """Whether the job's work runs under `gpu-agent run`: its owner's habit, or, where the
    allocation carries the council's guardrails, which ask for it, an owner who complies
    (sim.workload, "compliance")."""
    return job.supervised or (job.complies and guardrails_of(state) is not None)


def run_gpu_agent(
    workload: Workload,
    config: FleetConfig,
    state_dir: Path,
    progress: Callable[[int], None] | None = None,
    judge: Council | None = None,
) -> AgentRun:
    """The workload through the graph; `judge`: the council to convene (None: the fleet
    file's)."""
    config = config.model_copy(update={"budgets": dict(workload.budgets)})
    jobs = sorted(workload.jobs, key=lambda j: (j.submit, j.id))
    if not jobs:
        return AgentRun([], Counter(), 0, Counter())
    clock = EventClock(jobs[0].submit)
    backend = TraceFleet(config)
    services = open_services(
        state_dir, config, backend=backend, clock=clock, durable=False, council=judge
    )
    attempts: list[Attempt] = []
    council: Counter[str] = Counter()
    reviews = 0
    remaining = len(jobs)

    def reviewer(question: dict[str, Any]) -> dict[str, Any]:
        nonlocal reviews
        reviews += 1
        return {"approve": True, "by": "sim-reviewer"}

    def start(run: _Run) -> None:
        engine.submit(
            f"job-{run.job.id}-{run.attempt}",
            request_for(run.job, run.attempt, run.resumes),
            run.submit,
            tag=run,
        )

    def on_step(thread: GraphThread, node: str, update: State) -> None:
        if node == "council" and "council" in update:
            council[update["council"].outcome.value] += 1
        if node != "allocate" or update.get("status") is not Status.ALLOCATED:
            return
        run: _Run = thread.tag
        allocation = update["allocation"]
        run.segments = timeline(
            run.job, allocation.gpu_type, allocation.started_at.timestamp(), config
        )
        backend.run(allocation.gpu_ids, run.segments)
        if under_command(run.job, cast(State, thread.state)):  # it exits when the work is done
            services.commands.started(allocation.id, RUNNER, run.segments[0].start)
            engine.call_at(
                work_done_at(run.segments),
                lambda: services.commands.ended(allocation.id, RUNNER, clock.now(), 0),
            )
        engine.call_at(run.segments[-1].end, lambda: _user_release(allocation.id))

    def _user_release(aid: str) -> None:
        if services.ledger.lease(aid).state == "active":
            services.release(aid, ReleaseReason.EXPLICIT)

    def on_end(thread: GraphThread) -> None:
        nonlocal remaining
        run: _Run = thread.tag
        state = thread.state
        release: Release | None = state.get("release")
        if run.segments and release is not None:
            end = release.released_at.timestamp()
            attempts.append(
                account(
                    run.job,
                    run.attempt,
                    state["allocation"].gpu_type,
                    run.submit,
                    run.segments,
                    end,
                    release.reason,
                    release.cost_usd,
                )
            )
            yielded = release.reason is ReleaseReason.PREEMPTED
            if yielded and attempts[-1].outcome == "killed":  # checkpointed, asked again
                attempts[-1] = replace(attempts[-1], outcome="preempted")
            if attempts[-1].outcome in ("killed", "preempted"):
                kills = run.attempt - run.preempted - yielded  # a yield is never a kill
                again = rerun(run.job, run.segments, end, release.reason, kills, config)
                attempts[-1] = with_kept(attempts[-1], run.job, again)
                if again is not None and yielded:
                    again = restored(again, config)
                if again is not None:
                    start(
                        _Run(
                            again,
                            run.attempt + 1,
                            returns_at(run.segments, end),
                            resumes=state["allocation"].id,
                            preempted=run.preempted + yielded,
                        )
                    )
                    return
        else:
            status = state.get("status")
            outcome = "unplaced" if status is Status.TIMED_OUT else "denied"
            attempts.append(
                refused(run.job, run.attempt, run.submit, outcome, str(state.get("reason", status)))
            )
        remaining -= 1
        if progress is not None:
            progress(1)

    engine = Engine(services, clock, reviewer, observer=on_step, finished=on_end)
    with closing(services), _few_collections():
        for job in jobs:
            engine.call_at(job.submit, functools.partial(start, _Run(job, 1, job.submit)))
        horizon = jobs[-1].submit + HORIZON_DAYS * 86400.0
        t = jobs[0].submit
        while remaining and engine.pending and t < horizon:
            t += STEP_HOURS * 3600.0
            engine.run(until=t)
        for row in services.ledger.allocations("queued"):  # never placed within the horizon
            services.ledger.release(row.id, ReleaseReason.CANCELLED, clock.now())
    return AgentRun(attempts + _unplaced(jobs, attempts), council, reviews, engine.steps)


@contextmanager
def _few_collections() -> Iterator[None]:
    """A replay makes millions of objects that die young, beside the workload and the
    fleet it keeps throughout: the cyclic collector leaves what exists now alone (freeze)
    and runs about a thirtieth as often; both as before afterwards."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _unplaced(jobs: list[SimJob], attempts: list[Attempt]) -> list[Attempt]:
    """Jobs whose last request was still queued at the horizon."""
    last: dict[int, Attempt] = {}
    for a in attempts:
        last[a.job] = a
    return [
        refused(j, 1, j.submit, "unplaced", "still queued at the end of the simulation")
        for j in jobs
        if j.id not in last
    ]
