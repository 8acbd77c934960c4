"""`gpu-agent run`: a command on an allocation's GPUs, stopped when the allocation ends.

The command gets CUDA_VISIBLE_DEVICES with the allocation's GPU UUIDs (on Slurm it runs as a
step of the allocation's job, `srun --jobid`, and Slurm sets it). Whoever releases the
allocation (the monitor for idling, the lease, a budget, `gpu-agent release`) ends the command:
SIGTERM to its process group, a grace period, SIGKILL; then the GPUs' process lists (NVML) are
read to confirm nothing of it is left. Only processes this command started are signalled.
With `--notice S`, the command is sent a signal (USR1 by default) S seconds before the
allocation's deadline, to checkpoint, as Slurm's `--signal` does; on Slurm an allocation `run`
requested carries it as its job's `--signal`, and Slurm sends it, not `run` (then `noticed`
stays false: Slurm does not say when it signalled).
With `--requeue N`, an allocation `run` requested that ends before its command does (its
lease ran out, a GPU failed, gpu-agent was down past its lease, it was preempted: `gpu-agent
preempt`) is asked for again, resuming the old one (`GPURequest.resumes`: it queues ahead of
new work), and the command starts again on the new GPUs to go on from its checkpoint, at most
N times, as Slurm's --requeue does.
When the command ends by itself, an allocation `run` requested is released (command-exit);
one it was given (`--allocation`) is left to its owner. While the command runs, the monitor
takes an idle spell for a pause and never releases the allocation for idling; once it has
exited, idle time is hoarding (fleet.commands, fleet.monitoring.idle_limit_s).
"""

from __future__ import annotations

import os
import shlex
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from fleet.errors import Denied, InvalidInput, NotPlaced
from fleet.models import GPURequest, ReleaseReason
from fleet.monitors import Monitors, new_owner
from fleet.supervise import Supervised, check_startable
from graph.orchestrator import Orchestrator
from graph.outcome import PendingReview

POLL_S = 0.25
NOTICE_S = 0.0  # none unless asked: an unhandled SIGUSR1 ends a process (Slurm's is opt-in too)
NOTICE_SIGNAL = signal.SIGUSR1
# Ends that the same request may outlive; not a budget (it would be refused again), an
# idle release or someone's explicit release (a decision, not an accident).
REQUEUE_ON = frozenset(
    {
        ReleaseReason.LEASE_EXPIRED.value,
        ReleaseReason.UNHEALTHY.value,
        ReleaseReason.EXPIRED_WHILE_DOWN.value,
        ReleaseReason.PREEMPTED.value,  # it yielded after its notice: its work goes on
    }
)
CONFIRM_TRIES = 8


@dataclass
class RunReport:
    allocation_id: str
    exit_code: int
    ended_by: str  # "command" (it exited), a release reason, or "signal"
    terminated: bool = False
    killed: bool = False
    leftover: list[int] = field(default_factory=list)  # PIDs of it still alive (want none)
    on_gpus: list[int] | None = None  # PIDs of it NVML still lists; None: cannot list
    noticed: bool = False  # it was told its allocation's deadline was near (notice_signal)
    requeued_from: list[str] = field(default_factory=list)  # earlier allocations, oldest first

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@contextmanager
def _signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM to `gpu-agent run` stop the command like a release would."""
    got: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_on(
    orch: Orchestrator,
    allocation_id: str,
    argv: Sequence[str],
    *,
    grace_s: float,
    owned: bool,
    say: Callable[[str], None] = print,
    notice_s: float = NOTICE_S,
    notice_signal: signal.Signals = NOTICE_SIGNAL,
) -> RunReport:
    """Run `argv` on an active allocation until it exits or the allocation ends; `notice_s`
    (clock) seconds before the allocation's deadline (its lease end, or where its budget
    runs out) the command gets `notice_signal`, once, to checkpoint, as Slurm's --signal."""
    svc = orch.services
    check_startable(argv, os.environ)
    row = svc.ledger.get(allocation_id)
    orch.identity.check_project(row.project, "run commands on allocations")
    if row.state != "active":
        raise InvalidInput(f"allocation {allocation_id} is {row.state}, not active")
    monitors = Monitors(svc.ledger)
    if not owned and not monitors.alive(monitors.get(allocation_id)):
        say(
            f"nobody monitors allocation {allocation_id}: it will not be released for idling "
            f"until a worker or `gpu-agent resume {shlex.quote(row.thread_id)}` adopts it"
        )
    env = dict(os.environ) | {"GPU_AGENT_ALLOCATION": allocation_id}
    command = list(argv)
    if svc.scheduler_holds:  # a step of the allocation's Slurm job, on its node and GPUs
        job = svc.ledger.scheduler_job(allocation_id)
        if job is None:
            raise InvalidInput(
                f"allocation {allocation_id} has no Slurm job yet: `gpu-agent resume "
                f"{shlex.quote(row.thread_id)}` submits it"
            )
        env.pop("CUDA_VISIBLE_DEVICES", None)  # Slurm sets it in the step
        command = ["srun", f"--jobid={job.job_id}", *argv]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(row.gpu_ids)
    with _signals() as got:
        proc = Supervised(command, env)
        svc.commands.started(allocation_id, new_owner("run"), svc.clock.now())
        say(f"started pid {proc.pid} on {', '.join(row.gpu_ids)}")
        seen = {proc.pid}
        ended_by = "command"
        noticed = False
        while not proc.exited():
            seen.update(proc.members())
            lease = svc.ledger.lease(allocation_id)
            now = svc.clock.now()
            if lease.state == "released":
                assert lease.release_reason is not None
                ended_by = lease.release_reason.value
                break
            if (
                not noticed
                and notice_s > 0
                and lease.deadline is not None
                and lease.deadline - now <= notice_s
            ):
                proc.signal(notice_signal)
                noticed = True
                assert lease.deadline_reason is not None
                say(
                    f"allocation {allocation_id} ends in {max(0.0, lease.deadline - now):.0f} s "
                    f"({lease.deadline_reason.value}): {notice_signal.name} sent to the command "
                    "to checkpoint"
                )
            if lease.deadline is not None and now >= lease.deadline:
                assert lease.deadline_reason is not None  # nobody released it on time: we do
                svc.release(allocation_id, lease.deadline_reason, at=lease.deadline)
                ended_by = lease.deadline_reason.value
                break
            if got:
                ended_by = "signal"
                break
            time.sleep(POLL_S)
        if ended_by != "command":
            say(
                f"allocation {allocation_id} ended ({ended_by}): stopping the command "
                f"(SIGTERM, then SIGKILL after {grace_s:g} s)"
            )
        stopped = proc.stop(grace_s)  # also what the command left behind when it exited
        code = proc.returncode()
        if ended_by == "command":  # the work is done: idle time from now on is hoarding
            svc.commands.ended(allocation_id, svc.clock.now(), code)
    if owned and svc.ledger.get(allocation_id).state == "active":
        reason = ReleaseReason.COMMAND_EXIT if ended_by == "command" else ReleaseReason.EXPLICIT
        orch.release(allocation_id, reason)
    return RunReport(
        allocation_id,
        code,
        ended_by,
        stopped.terminated,
        stopped.killed,
        stopped.leftover,
        _left_on_gpus(orch, row.gpu_ids, seen),
        noticed,
    )


def _left_on_gpus(orch: Orchestrator, gpu_ids: list[str], pids: set[int]) -> list[int] | None:
    """The command's PIDs the GPUs still list (None: the backend lists no processes). The
    driver may list an exited process for a moment, so ask a few times before concluding."""
    found: list[int] | None = None
    for _ in range(CONFIRM_TRIES):
        samples = orch.services.sample(gpu_ids, orch.services.clock.now(), {})
        if any(s.processes is None for s in samples):
            return None
        found = sorted(p.pid for s in samples for p in s.processes or [] if p.pid in pids)
        if not found:
            return found
        time.sleep(POLL_S)
    return found


def request_and_run(
    orch: Orchestrator,
    request: GPURequest,
    argv: Sequence[str],
    *,
    grace_s: float,
    say: Callable[[str], None] = print,
    notice_s: float = NOTICE_S,
    notice_signal: signal.Signals = NOTICE_SIGNAL,
    requeue: int = 0,
) -> RunReport:
    """Request GPUs (the graph monitors them in the background) and run `argv` on them;
    requeued up to `requeue` times when the allocation ends first (REQUEUE_ON). A command
    that cannot start places nothing."""
    check_startable(argv, os.environ)
    if notice_s > 0:  # in the request: where Slurm holds the GPUs, its job's --signal
        named = notice_signal.name.removeprefix("SIG")
        request = request.model_copy(update={"notice_seconds": notice_s, "notice_signal": named})
        if orch.services.scheduler_holds:  # Slurm sends it, even with gpu-agent gone: not twice
            say(f"Slurm sends {notice_signal.name} to the command before the job's time limit")
            notice_s = 0.0
    earlier: list[str] = []
    last: RunReport | None = None
    while True:
        try:
            handle = orch.allocate_gpu_sync(request)
        except (Denied, NotPlaced, PendingReview) as exc:
            if last is None:
                raise
            say(f"the requeue of allocation {last.allocation_id} was not placed: {exc}")
            return last
        say(
            f"allocation {handle.id}: {handle.allocation.count} x "
            f"{handle.allocation.gpu_type} until "
            f"{handle.allocation.lease_end:%Y-%m-%d %H:%M:%S} UTC"
        )
        try:
            report = run_on(
                orch,
                handle.id,
                argv,
                grace_s=grace_s,
                owned=True,
                say=say,
                notice_s=notice_s,
                notice_signal=notice_signal,
            )
        finally:
            handle.release(ReleaseReason.EXPLICIT)  # a no-op when it ended; joins the graph
        report.requeued_from = list(earlier)
        if report.ended_by not in REQUEUE_ON or len(earlier) >= requeue:
            return report
        last = report
        earlier.append(handle.id)
        request = request.model_copy(update={"resumes": handle.id, "request_id": uuid.uuid4().hex})
        say(
            f"allocation {handle.id} ended ({report.ended_by}) before the command: requeued "
            f"to resume it ahead of new work ({requeue - len(earlier)} requeue(s) left)"
        )
