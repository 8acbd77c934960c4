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
N times, as Slurm's --requeue does. The requeue is recorded in the ledger (fleet.ledger.runs)
and made once, whoever asks first. Every `run` that requested its allocation is recorded so
(with no requeue left without `--requeue`): `run --resume ID` carries on a `run` that died
(resume_run), adopting the command it left running (fleet.supervise.Adopted). A `run
--allocation` is recorded too, as given (nothing to resume), so that whoever ends its
allocation after it died stops the command it left (fleet.left_running).
When the command ends by itself, an allocation `run` requested is released (command-exit);
one it was given (`--allocation`) is left to its owner. While the command runs, the monitor
takes an idle spell for a pause and never releases the allocation for idling; once it has
exited, idle time is hoarding (fleet.commands, fleet.monitoring.idle_limit_s).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FrameType

from fleet.commands import Claim
from fleet.errors import Denied, Interrupted, InvalidInput, NotPlaced
from fleet.faults import RUN_PLACED, RUN_STARTED, fault
from fleet.ledger import Ledger
from fleet.ledger.rows import LedgerRow
from fleet.ledger.runs import RunRecord, successor_id, successor_thread
from fleet.left_running import left_running
from fleet.models import GPURequest, ReleaseReason
from fleet.monitors import Monitors, Orphan, describe_owner, gone_here, new_owner
from fleet.services import Services
from fleet.supervise import (
    ALLOCATION_ENV,
    RELEASE_WAIT_S,
    RUN_POLL_S,
    Adopted,
    Group,
    RunCommand,
    Stopped,
    Supervised,
    check_startable,
)
from graph.handle import AllocationHandle
from graph.orchestrator import Orchestrator
from graph.outcome import PendingReview

NOTICE_S = 0.0  # none unless asked: an unhandled SIGUSR1 ends a process (Slurm's is opt-in too)
NOTICE_SIGNAL = signal.SIGUSR1
# Ends that the same request may outlive; not a budget (it would be refused again), an
# idle release or someone's explicit release (a decision, not an accident), nor a term its
# monitor declined, which ends as a lease does (`requeues`).
REQUEUE_ON = frozenset(
    {
        ReleaseReason.LEASE_EXPIRED.value,
        ReleaseReason.UNHEALTHY.value,
        ReleaseReason.EXPIRED_WHILE_DOWN.value,
        ReleaseReason.PREEMPTED.value,  # it yielded after its notice: its work goes on
    }
)
CONFIRM_TRIES = 8


def requeues(ledger: Ledger, aid: str, reason: str) -> bool:
    """Whether work whose allocation ended with `reason` before its command goes on in a
    requeue: an accident (REQUEUE_ON), not a term its monitor declined because its GPUs sat
    idle all of it (an idle release in effect: requeued, a hung command would hold GPUs a
    term after a term, and the requeue would be spared the guardrail that caught it)."""
    return reason in REQUEUE_ON and not ledger.declined(aid)


@dataclass
class RunReport:
    allocation_id: str
    exit_code: int | None  # None: unknown (the command was adopted after its `run` died)
    ended_by: str  # "command" (it exited), a release reason, or "signal"
    terminated: bool = False
    killed: bool = False
    leftover: list[int] = field(default_factory=list)  # PIDs of it still alive (want none)
    on_gpus: list[int] | None = None  # PIDs of it NVML still lists; None: cannot list
    noticed: bool = False  # it was told its allocation's deadline was near (notice_signal)
    requeued_from: list[str] = field(default_factory=list)  # earlier allocations, oldest first

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Charge:
    """Who is in charge of a run's command (fleet.ledger.runs), and what it says."""

    owner: str  # fleet.monitors.new_owner("run"); "" for a run that is not recorded
    say: Callable[[str], None]


@dataclass(frozen=True)
class Held:
    """An allocation this `run` waits on: its id, and how to let it go when the command is
    done (release it where it is still active, and join the thread that monitors it)."""

    id: str
    let_go: Callable[[], object]


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


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, systemd) to `gpu-agent run` does what Ctrl-C does, also
    while it waits for GPUs or places them: the SIGINT handler then in place runs (the
    Orchestrator's, or _signals' once a command runs). Without this, SIGTERM killed `run`
    outright there and left a queued allocation to be placed and charged for a command that
    would never run."""

    def as_ctrl_c(signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # ignored or the default: as Python's own handler would
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_on(
    orch: Orchestrator,
    allocation_id: str,
    argv: Sequence[str],
    *,
    grace_s: float,
    say: Callable[[str], None] = print,
    notice_s: float = NOTICE_S,
    notice_signal: signal.Signals = NOTICE_SIGNAL,
) -> RunReport:
    """Run `argv` on an active allocation it was given (`run --allocation`: left to its
    owner when the command ends) until it exits or the allocation ends; `notice_s` (clock)
    seconds before the allocation's deadline (its lease end, or where its budget runs out)
    the command gets `notice_signal`, once, to checkpoint, as Slurm's --signal. One command
    at a time on an allocation (_claim)."""
    check_startable(argv, os.environ)
    row = orch.services.ledger.get(allocation_id)
    orch.identity.check_sees(row.project, f"no allocation {allocation_id!r}")
    if row.state != "active":
        raise InvalidInput(f"allocation {allocation_id} is {row.state}, not active")
    monitors = Monitors(orch.services.ledger)
    if not monitors.alive(monitors.get(allocation_id)):
        say(
            f"nobody monitors allocation {allocation_id}: it will not be released for idling "
            f"until a worker or `gpu-agent resume {shlex.quote(row.thread_id)}` adopts it"
        )
    command = RunCommand(list(argv), os.getcwd(), grace_s, notice_s, notice_signal.name)
    charge = Charge(new_owner("run"), say)
    svc = orch.services
    with _signals() as got:  # from before the start: a Ctrl-C then stops the command too
        claim = _claim(svc, allocation_id, charge.owner)
        record = svc.ledger.run_record(allocation_id)
        try:
            _record_given(svc, allocation_id, charge.owner, command, claim, record)
            proc = _start(orch, row, command, charge)
        except BaseException:  # no command started: the allocation's is what it was
            svc.commands.unclaim(allocation_id, charge.owner, claim)
            svc.ledger.restore_run(allocation_id, charge.owner, record)
            raise
        return _supervise(orch, row, proc, command, charge, owned=False, got=got)


def _claim(svc: Services, aid: str, owner: str) -> Claim:
    """The allocation's command is `owner`'s from now on. Refused where a living `gpu-agent
    run` runs one there, or a command a dead one left still runs here: the monitor reads one
    command an allocation (the second's exit would say the first's work was done), and a
    release stops the one it knows."""
    left = left_running(svc.ledger, aid)
    if left is not None:
        raise InvalidInput(
            f"allocation {aid} still runs the command a `gpu-agent run` left when it died "
            f"(process group {left.record.pgid}): release the allocation to stop it"
            + ("" if left.record.given else f", or `gpu-agent run --resume {aid}` to carry it on")
        )
    stale = svc.config.monitor.heartbeat_stale_seconds
    claim = svc.commands.claim(aid, owner, svc.clock.now(), stale)
    if claim.holder is not None:
        raise InvalidInput(
            f"allocation {aid} already runs a command under gpu-agent "
            f"{describe_owner(claim.holder)}: one command at a time; wait for it to end, or "
            "release the allocation"
        )
    return claim


def _record_given(
    svc: Services,
    aid: str,
    owner: str,
    command: RunCommand,
    claim: Claim,
    record: RunRecord | None,
) -> None:
    """Record the command of a `run --allocation` as a requested run's is (its process group
    once started), so that whoever ends the allocation after this process died stops it
    (fleet.left_running): where the allocation has no record, or the record of an earlier
    `run --allocation` whose command is over (it exited, or its run died here and left
    nothing running: `claim` says what the allocation's command was). A record another run
    keeps (a requested run's; another host's that died) stays as it is. `record`: the
    allocation's record as it was."""
    if record is None:
        svc.ledger.record_given(aid, owner, asdict(command), None)
        return
    was = claim.was
    exited = was is not None and was["owner"] == record.owner and was["ended_at"] is not None
    if record.given and (exited or gone_here(record.owner)):
        svc.ledger.record_given(aid, owner, asdict(command), record.owner)


def _start(orch: Orchestrator, row: LedgerRow, command: RunCommand, charge: Charge) -> Supervised:
    """Start the command on the allocation's GPUs (on Slurm: a step of its job)."""
    svc = orch.services
    env = dict(os.environ) | {ALLOCATION_ENV: row.id}
    argv = list(command.argv)
    if svc.scheduler_holds:  # a step of the allocation's Slurm job, on its node and GPUs
        job = svc.ledger.scheduler_job(row.id)
        if job is None:
            raise InvalidInput(
                f"allocation {row.id} has no Slurm job yet: `gpu-agent resume "
                f"{shlex.quote(row.thread_id)}` submits it"
            )
        env.pop("CUDA_VISIBLE_DEVICES", None)  # Slurm sets it in the step
        argv = ["srun", f"--jobid={job.job_id}", *argv]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(row.gpu_ids)
    proc = Supervised(argv, env, command.cwd)
    fault(RUN_STARTED)
    if svc.ledger.run_record(row.id) is not None:  # a `run --resume` may adopt it
        svc.ledger.command_started(row.id, charge.owner, proc.pid)
    charge.say(f"started pid {proc.pid} on {', '.join(row.gpu_ids)}")
    return proc


def _supervise(
    orch: Orchestrator,
    row: LedgerRow,
    proc: Group,
    command: RunCommand,
    charge: Charge,
    owned: bool,
    got: list[int],
) -> RunReport:
    """Watch the command until it exits, the allocation ends or a signal came (`got`, noted
    by _signals since before the command started), send its notice once per deadline (again
    only where the deadline moved more than a notice past the last one: a renewed term),
    stop it (SIGTERM, grace, SIGKILL) and release what `run` owns. Its lease's end is
    released once the command has stopped, and whatever else releases the allocation in
    this process (its monitor, a tool) stops the command first (Services.supervising)."""
    svc = orch.services
    aid, say = row.id, charge.say
    recorded = svc.ledger.run_record(aid)
    notice_s = command.notice_s
    lease_end: tuple[ReleaseReason, float] | None = None  # released after the stop
    by_release: list[bool] = []  # a release in this process stopped it (its monitor's)

    def stop_first() -> Stopped:
        by_release.append(True)
        return proc.stop(command.grace_s)

    svc.supervising(aid, stop_first)
    beats = contextlib.ExitStack()  # another host reads them: this run lives (run_lives)
    try:
        svc.commands.started(aid, charge.owner, svc.clock.now())
        beats.enter_context(
            svc.commands.beating(aid, charge.owner, svc.config.monitor.heartbeat_seconds)
        )
        seen = {proc.pid}
        ended_by = "command"
        # when the command was last told (also by the `run` before this one): not twice
        told_at = None
        if recorded is not None and recorded.owner == charge.owner:
            told_at = recorded.noticed_at
        while not proc.exited():
            seen.update(proc.members())
            lease = svc.ledger.lease(aid)
            now = svc.clock.now()
            if lease.state == "released":
                assert lease.release_reason is not None
                ended_by = lease.release_reason.value
                break
            if lease.deadline is not None and now >= lease.deadline:
                assert lease.deadline_reason is not None  # nobody released it on time: we do
                lease_end = (lease.deadline_reason, lease.deadline)
                ended_by = lease.deadline_reason.value
                break  # no notice once the deadline passed (a release from afar ends it now)
            if (
                notice_s > 0
                and lease.deadline is not None
                and not told(told_at, lease.deadline, notice_s)
                and lease.deadline - now <= notice_s
            ):
                proc.signal(command.signal)
                told_at = now
                if recorded is not None:
                    svc.ledger.noticed(aid, charge.owner, now)
                assert lease.deadline_reason is not None
                say(
                    f"allocation {aid} ends in {max(0.0, lease.deadline - now):.0f} s "
                    f"({lease.deadline_reason.value}): {command.notice_signal} sent to the "
                    "command to checkpoint"
                )
            if got:
                ended_by = "signal"
                break
            time.sleep(RUN_POLL_S)
        if ended_by == "command" and isinstance(proc, Adopted):  # it went while unwatched:
            ended = svc.ledger.get(aid)  # what ended first is unknown; the allocation's end
            if ended.release_reason is not None:  # is what the ledger knows
                ended_by = ended.release_reason.value
        if ended_by == "command" and by_release:  # stopped for a release that lands next
            ended_by = _released_reason(svc, aid, command.grace_s + RELEASE_WAIT_S)
        if ended_by != "command":
            say(
                f"allocation {aid} ended ({ended_by}): stopping the command "
                f"(SIGTERM, then SIGKILL after {command.grace_s:g} s)"
            )
        stopped = proc.stop(command.grace_s)  # also what the command left behind when it exited
        code = proc.returncode()
        if ended_by == "command":  # the work is done: idle time from now on is hoarding
            svc.commands.ended(aid, charge.owner, svc.clock.now(), code)
    finally:
        beats.close()
        svc.supervising(aid, None)
    if lease_end is not None:  # its GPUs go back once the command has stopped
        svc.release(aid, lease_end[0], at=lease_end[1])
    if owned and svc.ledger.get(aid).state == "active":
        reason = ReleaseReason.COMMAND_EXIT if ended_by == "command" else ReleaseReason.EXPLICIT
        orch.release(aid, reason)
    return RunReport(
        aid,
        code,
        ended_by,
        stopped.terminated,
        stopped.killed,
        stopped.leftover,
        _left_on_gpus(orch, row.gpu_ids, seen),
        told_at is not None,
    )


def _released_reason(svc: Services, aid: str, timeout_s: float) -> str:
    """Why the allocation was released, once the release that stopped its command (in
    another thread of this process) lands: within `timeout_s`, else "signal" (stopped)."""
    end = time.monotonic() + timeout_s
    while (reason := svc.ledger.get(aid).release_reason) is None:
        if time.monotonic() >= end:
            return "signal"
        time.sleep(RUN_POLL_S)
    return reason.value


def told(told_at: float | None, deadline: float, notice_s: float) -> bool:
    """Whether a notice sent at `told_at` was for `deadline`: not where the deadline has
    since moved more than a notice later (a renewed term: the command worked on after its
    checkpoint and is told again; a budget's small move is not worth a second checkpoint)."""
    return told_at is not None and deadline - told_at <= 2.0 * notice_s


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
        time.sleep(RUN_POLL_S)
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
    requeued up to `requeue` times when the allocation ends first (REQUEUE_ON), through the
    ledger (fleet.ledger.runs), so that `run --resume` carries the work on if this process
    dies. A command that cannot start places nothing; a failure between the placement and
    the command's start releases what was placed."""
    check_startable(argv, os.environ)
    if notice_s > 0:  # in the request: where Slurm holds the GPUs, its job's --signal
        named = notice_signal.name.removeprefix("SIG")
        request = request.model_copy(update={"notice_seconds": notice_s, "notice_signal": named})
        if orch.services.scheduler_holds:  # Slurm sends it, even with gpu-agent gone: not twice
            say(f"Slurm sends {notice_signal.name} to the command before the job's time limit")
            notice_s = 0.0
    command = RunCommand(list(argv), os.getcwd(), grace_s, notice_s, notice_signal.name)
    charge = Charge(new_owner("run"), say)
    handle = _placed(orch, request)
    try:
        fault(RUN_PLACED)
        # recorded with no requeue too: whoever adopts the allocation of a `run` that died
        # then stops its command with it (fleet.left_running), and `run --resume` carries it on
        orch.services.ledger.record_run(handle.id, charge.owner, asdict(command), requeue)
        held = _announced(handle, say)
    except BaseException as exc:  # placed for a command that will not run here: not left held
        handle.release(ReleaseReason.CANCELLED)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(INTERRUPTED) from None
        raise
    return _carry_on(orch, held, command, charge, [])


INTERRUPTED = "interrupted before the command started; nothing is left placed for it"


def _placed(orch: Orchestrator, request: GPURequest) -> AllocationHandle:
    """The request placed for the command. Interrupted (Ctrl-C) or failed while it was being
    placed, nothing stays placed for a command that never starts (allocate_gpu_sync
    withdraws it). A refusal (denied, not placed, waiting for a review) is the request's
    answer and stays."""
    try:
        return orch.allocate_gpu_sync(request)
    except KeyboardInterrupt:
        raise Interrupted(INTERRUPTED) from None


def _announced(handle: AllocationHandle, say: Callable[[str], None]) -> Held:
    a = handle.allocation
    say(f"allocation {a.id}: {a.count} x {a.gpu_type} until {a.lease_end:%Y-%m-%d %H:%M:%S} UTC")
    return Held(handle.id, lambda: handle.release(ReleaseReason.EXPLICIT))


def _carry_on(
    orch: Orchestrator, held: Held, command: RunCommand, charge: Charge, earlier: list[str]
) -> RunReport:
    """Run the command on `held`, and on each allocation that resumes it while requeues are
    left (each made once: fleet.ledger.runs.requeue)."""
    ledger = orch.services.ledger
    while True:
        try:
            report = _run_held(orch, held, command, charge)
        finally:
            held.let_go()  # a no-op when it ended; joins the graph
        report.requeued_from = list(earlier)
        record = ledger.run_record(held.id)
        if (
            record is None
            or record.requeues_left <= 0
            or not requeues(ledger, held.id, report.ended_by)
        ):
            return report
        why = f"allocation {held.id} ended ({report.ended_by}) before its command"
        successor = ledger.requeue(held.id, charge.owner, orch.services.clock.now(), why)
        earlier.append(held.id)
        charge.say(
            f"allocation {held.id} ended ({report.ended_by}) before the command: requeued "
            f"to resume it ahead of new work ({record.requeues_left - 1} requeue(s) left)"
        )
        try:
            placed = _successor(orch, held.id, charge)
        except (Denied, NotPlaced, PendingReview) as exc:
            placed, problem = None, str(exc)
        else:
            problem = "its thread ended without GPUs"
        if placed is None:
            charge.say(
                f"the requeue of allocation {held.id} ({successor}) was not placed: {problem}"
            )
            return report
        held = placed


def _run_held(orch: Orchestrator, held: Held, command: RunCommand, charge: Charge) -> RunReport:
    """The command on one allocation: started there, or adopted where a `run` that died
    had started it; where the allocation ended before it could start, what ended it."""
    ledger = orch.services.ledger
    row = ledger.get(held.id)
    record = ledger.run_record(held.id)
    with _signals() as got:  # from before the start: a Ctrl-C then stops the command too
        if record is not None and record.pgid is not None:
            proc: Group = Adopted(record.pgid, held.id)
            charge.say(
                f"adopted the command of allocation {held.id} (process group {record.pgid}), "
                "whose `gpu-agent run` died"
            )
        elif row.state == "active":
            proc = _start(orch, row, command, charge)
        else:
            reason = row.release_reason.value if row.release_reason else row.state
            return RunReport(held.id, None, reason)
        return _supervise(orch, row, proc, command, charge, True, got)


def _successor(orch: Orchestrator, pred: str, charge: Charge) -> Held | None:
    """The allocation that resumes `pred`, placed under its fixed id where nobody did yet,
    else carried on from where its asker stopped."""
    aid, thread = successor_id(pred), successor_thread(pred)
    if _row(orch, aid) is None and not _has_thread(orch, thread):
        request = orch.services.ledger.successor_request(pred)
        # kept if this process stops waiting: `run --resume` carries the requeue on
        placed = orch.allocate_gpu_sync(request, thread_id=thread, withdraw=False)
        return _announced(placed, charge.say)
    return _attach(orch, aid, thread, charge.say)


def _row(orch: Orchestrator, aid: str) -> LedgerRow | None:
    try:
        return orch.services.ledger.get(aid)
    except InvalidInput:
        return None


def _has_thread(orch: Orchestrator, thread_id: str) -> bool:
    try:
        orch.outcome(thread_id)
    except InvalidInput:
        return False
    return True


def _attach(
    orch: Orchestrator, aid: str, thread_id: str, say: Callable[[str], None]
) -> Held | None:
    """An allocation whose thread's process died: carry its thread on here in the background
    (unless another live process monitors it) and wait until it holds GPUs or ended; None
    when its thread ended without placing it."""
    row = _row(orch, aid)
    runner: threading.Thread | None = None
    if row is None or (row.state != "released" and orch.claim_orphan(Orphan(row, None))):
        runner = orch.continue_in_background(thread_id)
        say(f"carrying on the thread of allocation {aid} ({thread_id}) here")
    while row is None or row.state == "queued":
        if runner is not None and not runner.is_alive():
            row = _row(orch, aid)
            if row is None or row.state == "queued":
                return None
            break
        time.sleep(RUN_POLL_S)
        row = _row(orch, aid)

    def let_go() -> None:
        orch.release(aid, ReleaseReason.EXPLICIT)  # a no-op when it ended
        if runner is not None:
            runner.join()

    return Held(aid, let_go)


def resume_run(orch: Orchestrator, aid: str, say: Callable[[str], None] = print) -> RunReport:
    """Carry on the `run` (`--requeue` or not) that allocation `aid` belongs to, after its process
    died: from its newest allocation, adopting its command where it still runs, requeueing
    where it was yielded or lost (once: fleet.ledger.runs.requeue). Refused, changing
    nothing, where that run is finished or its process is alive."""
    ledger = orch.services.ledger
    chain = ledger.run_chain(aid)
    missing = f"allocation {aid} was not requested by `gpu-agent run`: nothing to resume"
    if not chain:
        raise InvalidInput(missing)
    orch.identity.check_sees(ledger.get(chain[0].allocation_id).project, missing)
    last = chain[-1]
    if last.given:
        raise InvalidInput(
            f"allocation {aid} was given to `gpu-agent run --allocation`, which leaves it to "
            "its owner: nothing to resume"
        )
    finished = _finished(orch, last)
    if finished is not None:
        raise InvalidInput(f"nothing to resume: {finished}")
    if not gone_here(last.owner):
        raise InvalidInput(
            f"allocation {last.allocation_id}'s command is in the charge of gpu-agent "
            f"{describe_owner(last.owner)}, which is not known to have died: nothing to resume"
        )
    _check_no_other_command(orch, last)
    command = RunCommand.read(last.command)
    check_startable(command.argv, os.environ, command.cwd)  # before anything is placed
    charge = Charge(new_owner("run"), say)
    if not ledger.take_over(last.allocation_id, last.owner, charge.owner):
        raise InvalidInput(f"another `gpu-agent run --resume` took {last.allocation_id} over first")
    say(f"resuming the run of {chain[0].allocation_id} at allocation {last.allocation_id}")
    earlier = [r.allocation_id for r in chain[:-1]]
    if _row(orch, last.allocation_id) is None and earlier:  # its asker died before placing it
        held = _successor(orch, earlier[-1], charge)
    else:
        held = _attach(orch, last.allocation_id, ledger.get(last.allocation_id).thread_id, say)
    if held is None:
        raise NotPlaced(f"allocation {last.allocation_id} was not placed")
    return _carry_on(orch, held, command, charge, earlier)


def _check_no_other_command(orch: Orchestrator, last: RunRecord) -> None:
    """One command at a time (_claim): no resume while another living `run` runs one on the
    run's newest allocation (a `run --allocation` after this run died)."""
    if _row(orch, last.allocation_id) is None:  # not placed yet
        return
    lease = orch.services.ledger.lease(last.allocation_id)
    other = lease.command_owner
    if other not in (None, last.owner) and orch.services.work(lease) == "running":
        raise InvalidInput(
            f"allocation {last.allocation_id} runs a command under gpu-agent "
            f"{describe_owner(other)} now: nothing to resume while it runs"
        )


def _finished(orch: Orchestrator, last: RunRecord) -> str | None:
    """Why a run whose newest allocation is `last` has nothing left to resume (None: it has)."""
    row = _row(orch, last.allocation_id)
    if row is None or row.release_reason is None:
        return None  # to place, or placed
    if last.pgid is not None and Adopted(last.pgid, last.allocation_id).members():
        return None  # its command outlived it: to be stopped
    reason = row.release_reason.value
    if last.requeues_left > 0 and requeues(orch.services.ledger, last.allocation_id, reason):
        return None  # to requeue
    return f"its last allocation, {last.allocation_id}, ended ({reason})"
