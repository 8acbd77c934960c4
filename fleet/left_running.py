"""A command that a `gpu-agent run` left running on its allocation when it died, whose
allocation a worker or `resume --orphans` then adopted, or whose lease ran out unwatched.
Whoever monitors the allocation on the command's host gives the command what its run would
have: the checkpoint notice before the deadline (`--notice`), and its end with the allocation
(SIGTERM, its grace, SIGKILL); a process that finds its lease ran out while nobody watched
ends it before the release (reconcile). The ledger never then shows a GPU free while the
command still runs on it (where its environment still names the allocation: Adopted).

Nothing here acts while the run lives, or where the command runs on another host: its
owner is not known dead here (fleet.monitors.gone_here), or no process of this host was
started for the allocation (fleet.supervise.Adopted). `run --resume` still carries the work
on afterwards, from its checkpoint (a requeue), unless the run was given its allocation
(`run --allocation`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.ledger import Ledger
from fleet.ledger.rows import Lease
from fleet.ledger.runs import RunRecord
from fleet.models import Release
from fleet.monitors import gone_here
from fleet.supervise import Adopted, RunCommand, Stopped


@dataclass(frozen=True)
class LeftRunning:
    record: RunRecord
    group: Adopted
    command: RunCommand


def left_running(ledger: Ledger, aid: str) -> LeftRunning | None:
    """The command a dead run left running on `aid` on this host (None: none)."""
    record = ledger.run_record(aid)
    if record is None or record.pgid is None or not gone_here(record.owner):
        return None
    group = Adopted(record.pgid, aid)
    if not group.members():
        return None
    return LeftRunning(record, group, RunCommand.read(record.command))


def notice_if_due(ledger: Ledger, aid: str, lease: Lease, now: float) -> bool:
    """Send the notice its run asked for, once, where `now` is within it of the lease's
    deadline (the ledger records it, as the run does): whether it was sent now. A monitor
    asks at every tick; the lease it read says whether a command under `gpu-agent run`
    still runs there at all, so that most ticks ask the ledger nothing more."""
    if lease.command_owner is None or lease.command_ended_at is not None:
        return False
    left = left_running(ledger, aid)
    if left is None or left.record.noticed_at is not None:
        return False
    notice = left.command.notice_s
    if notice <= 0 or lease.deadline is None or not lease.deadline - notice <= now < lease.deadline:
        return False  # not due yet, or the deadline passed: the end comes with no notice
    left.group.signal(left.command.signal)
    ledger.noticed(aid, left.record.owner, now)
    return True


@dataclass(frozen=True)
class Ended:
    """How end_with stopped the command a dead run left, and whether that run was given its
    allocation (`run --allocation`: nothing for `run --resume` to carry on)."""

    stopped: Stopped
    given: bool

    def said(self, aid: str) -> str:
        how = "SIGTERM, then SIGKILL" if self.stopped.killed else "SIGTERM"
        then = "" if self.given else f"; `gpu-agent run --resume {aid}` carries its work on"
        return f"the command a `gpu-agent run` that died left running was stopped ({how}){then}"


def end_with(ledger: Ledger, aid: str) -> Ended | None:
    """The allocation `aid` has ended: its command ends too (None: none was left here)."""
    left = left_running(ledger, aid)
    if left is None:
        return None
    return Ended(left.group.stop(left.command.grace_s), left.record.given)


def reconcile(ledger: Ledger, now: float) -> list[Release]:
    """Ledger.reconcile: leases that ran out while no process watched them are released,
    each after the command a dead run left running on it here has ended (end_with), as a
    monitor would have ended it."""
    for aid in ledger.ran_out_unwatched(now):
        end_with(ledger, aid)
    return ledger.reconcile(now)
