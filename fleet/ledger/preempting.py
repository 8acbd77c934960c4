"""Asking a running allocation to yield its GPUs (fleet.preemption), by hand or to give a
loan back to its pool (fleet.borrowing): its lease's new end and deadline, and the audit entry
that says who asked and why, in one transaction."""

from __future__ import annotations

import json
import uuid

from fleet.borrowing import on_loan
from fleet.budget import Moved
from fleet.errors import InvalidInput
from fleet.ledger.budgets import Budgets
from fleet.ledger.rows import AUDIT, LedgerRow
from fleet.models import CALLER_REASONS, GPUInfo, ReleaseReason, utc
from fleet.preemption import DAY_S, refusal, yield_at
from fleet.sql import Conn


class Preempting(Budgets):
    def preempt(self, aid: str, now: float, by: str, why: str) -> Moved:
        """Ask active allocation `aid` to yield at fleet.preemption.yield_at: its lease ends
        there (a budget that cuts sooner still does), reason `preempted`. Refused, changing
        nothing, where fleet.preemption.refusal says so or it ends by then anyway."""
        found = self._type_and_project(aid)
        if found is None:
            raise InvalidInput(f"no allocation {aid!r}")
        gpu_type, project = found
        with self.transaction(f"type:{gpu_type}", f"project:{project}") as db:
            state, started, deadline, reason, request = db.execute(
                "SELECT state, started_at, deadline, deadline_reason, request FROM allocations "
                "WHERE id=?",
                (aid,),
            ).fetchone()
            if state != "active":
                raise InvalidInput(f"allocation {aid} is {state}, not running: nothing to yield")
            notice = json.loads(request).get("notice_seconds")
            asked = db.execute(
                "SELECT count(*) FROM audit WHERE action='preempt' AND project=? AND at>?",
                (project, now - DAY_S),
            ).fetchone()[0]
            refused = refusal(aid, project, notice, int(asked), self.config.preemption)
            if refused is not None:
                raise InvalidInput(refused)
            at = yield_at(started, notice, now, self.config.preemption)
            if deadline <= at:
                raise InvalidInput(
                    f"allocation {aid} ends at {utc(deadline):%Y-%m-%d %H:%M:%S} UTC ({reason}), "
                    f"no later than it could yield ({utc(at):%H:%M:%S})"
                )
            return self._yield(db, (aid, project, deadline, notice), at, now, by, "preempt", why)

    def reclaim(self, row: LedgerRow, now: float, inventory: list[GPUInfo]) -> list[Moved]:
        """`row` waits for a type of its own pool: the youngest loans on that type yield
        after their notice (no minimum run, no daily limit: the terms they borrowed on) until
        the free GPUs, with those already yielding, cover every request queued for the type.
        Returns what moved; nothing where `row` itself borrows or nothing is lent."""
        t = row.gpu_type
        if not self.config.preemption.borrow or t not in self.config.pool(row.purpose):
            return []  # nothing is lent, or `row` itself borrows
        loans = [
            r
            for r in self.query(
                "SELECT id, project, purpose, count, deadline, deadline_reason, request "
                "FROM allocations WHERE state='active' AND gpu_type=? ORDER BY started_at DESC",
                (t,),
            )
            if on_loan(r[2], t, json.loads(r[6]).get("gpu_type"), self.config)
        ]
        if not loans:
            return []
        projects = sorted({r[1] for r in loans})
        with self.transaction(f"type:{t}", *(f"project:{p}" for p in projects)) as db:
            need = sum(q.count for q in self._queued(db, t).values())
            need -= len(self._free(db, t, inventory))
            moved = []
            for aid, project, _, count, _, _, _ in loans:
                if need <= 0:
                    break
                state, deadline, reason, request = db.execute(
                    "SELECT state, deadline, deadline_reason, request FROM allocations WHERE id=?",
                    (aid,),
                ).fetchone()
                notice = json.loads(request).get("notice_seconds")
                if state != "active" or notice is None:  # gone, or lent before the pools changed
                    continue
                need -= count
                if reason == ReleaseReason.PREEMPTED.value or deadline <= now + notice:
                    continue  # it yields, or ends, by then anyway
                why = f"the {row.purpose.value} pool takes its {t} back for {row.id}"
                loan = (aid, project, deadline, notice)
                moved.append(self._yield(db, loan, now + notice, now, "gpu-agent", "reclaim", why))
            return moved

    def end_now(self, aid: str, now: float, by: str, reason: ReleaseReason) -> str | None:
        """A caller's release of an active allocation whose command a `gpu-agent run` still
        runs: its lease ends now instead, for `reason`, so that the run stops the command and
        then releases it, as at any lease end (the GPUs never show free while the command
        runs); audited. "asked"; "asked before" where a caller's release already ended it
        (its end stays: charged to the first ask); None, changing nothing, where it is not
        active or no command runs."""
        found = self._type_and_project(aid)
        if found is None:
            return None
        gpu_type, project = found
        with self.transaction(f"type:{gpu_type}", f"project:{project}") as db:
            state, owner, ended, deadline, why = db.execute(
                "SELECT a.state, c.owner, c.ended_at, a.deadline, a.deadline_reason "
                "FROM allocations a LEFT JOIN commands c ON c.allocation_id = a.id WHERE a.id=?",
                (aid,),
            ).fetchone()
            if state != "active" or owner is None or ended is not None:
                return None
            if why in {r.value for r in CALLER_REASONS} and deadline <= now:
                return "asked before"
            db.execute(
                "UPDATE allocations SET lease_end=?, deadline=?, deadline_reason=?, "
                "renew_hours=NULL WHERE id=?",
                (now, now, reason.value, aid),
            )
            self._track(db, aid)
            db.execute(
                AUDIT,
                (
                    f"release-asked:{aid}:{now!r}:{uuid.uuid4().hex[:8]}",
                    now,
                    by,
                    "release-asked",
                    project,
                    aid,
                    f"{reason.value}: its command under gpu-agent run stops first",
                ),
            )
            return "asked"

    def _type_and_project(self, aid: str) -> tuple[str, str] | None:
        """The GPU type and project of allocation `aid` (the locks a change to it takes)."""
        found = self.query("SELECT gpu_type, project FROM allocations WHERE id=?", (aid,))
        return (str(found[0][0]), str(found[0][1])) if found else None

    def _yield(
        self,
        db: Conn,
        allocation: tuple[str, str, float, float],
        at: float,
        now: float,
        by: str,
        action: str,
        why: str,
    ) -> Moved:
        """Allocation (id, project, deadline, notice) ends at `at`, preempted; audited."""
        aid, project, deadline, notice = allocation
        db.execute(
            "UPDATE allocations SET lease_end=?, deadline=?, deadline_reason=?, "
            "renew_hours=NULL WHERE id=?",  # a yield is renewed no more
            (at, at, ReleaseReason.PREEMPTED.value, aid),
        )
        self._track(db, aid)
        db.execute(
            AUDIT,
            (
                f"{action}:{aid}:{now!r}:{uuid.uuid4().hex[:8]}",
                now,
                by,
                action,
                project,
                aid,
                f"yields at {utc(at):%Y-%m-%d %H:%M:%S} UTC after its {notice:g} s "
                f"checkpoint notice: {why}",
            ),
        )
        return Moved(aid, deadline, at)
