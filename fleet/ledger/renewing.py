"""Renewing a lease held a term at a time (an approval with guardrails,
`[council] guard_lease_hours`): its next term, up to the lease asked, committed to its budget
in the same transaction as the other leases' deadlines, and the audit entry that says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.budget import Moved
from fleet.ledger.budgets import Budgets
from fleet.ledger.rows import AUDIT, EPS_S, NOT_RENEWED, term_open
from fleet.models import ReleaseReason, utc
from fleet.sql import Conn


def not_renewed_key(aid: str) -> str:
    """The one audit entry of a term its monitor did not renew (the lease then ends)."""
    return f"{NOT_RENEWED}:{aid}"


def not_renewed_key_sql(column: str) -> str:
    """not_renewed_key in SQL, of the allocation id in `column`."""
    return f"'{NOT_RENEWED}:' || {column}"


@dataclass(frozen=True)
class Renewed:
    """A term renewed: its new lease end, its deadline (earlier where the budget cuts the new
    term short) and the project's other allocations whose deadlines moved with it."""

    lease_end: float
    deadline: float
    moved: list[Moved] = field(default_factory=list)


class Renewing(Budgets):
    """The next term of a lease renewed while its GPUs work."""

    def renew(self, aid: str, lease_end: float, now: float, why: str) -> Renewed | None:
        """Renew the term that ends at `lease_end` by one more (fleet.monitoring.renewal_reason
        gave its reason), to at most the lease asked. None, and nothing changes, where there is
        nothing to renew: the allocation ended, its term was renewed already (a monitor that
        re-runs its tick), its lease runs whole, a budget or a preemption set its end, or its
        monitor declined the term before a restart (Renewing.decline: a decision taken
        stands, as the notice it gave the job did)."""
        found = self.query("SELECT gpu_type, project FROM allocations WHERE id=?", (aid,))
        if not found:
            return None
        gpu_type, project = found[0]
        with self.transaction(f"type:{gpu_type}", f"project:{project}") as db:
            r = db.execute(
                "SELECT state, started_at, hours, lease_end, deadline, deadline_reason, "
                "renew_hours FROM allocations WHERE id=?",
                (aid,),
            ).fetchone()
            if not _still_open(r, lease_end) or _declined(db, aid):
                return None
            asked_end = r["started_at"] + r["hours"] * 3600.0
            end = min(lease_end + r["renew_hours"] * 3600.0, asked_end)
            last = end >= asked_end - EPS_S  # the last term: the lease now runs whole
            db.execute(
                "UPDATE allocations SET lease_end=?, deadline=?, renew_hours=? WHERE id=?",
                (end, end, None if last else r["renew_hours"], aid),
            )
            self._track(db, aid)
            moved = self._fit_deadlines(db, project, now)
            deadline = next((m.after for m in moved if m.id == aid), end)
            db.execute(
                AUDIT,
                (
                    f"renew:{aid}:{lease_end!r}",
                    now,
                    "gpu-agent",
                    "renew",
                    project,
                    aid,
                    f"lease renewed to {utc(end):%Y-%m-%d %H:%M:%S} UTC: {why}",
                ),
            )
            return Renewed(end, deadline, [m for m in moved if m.id != aid])

    def declined(self, aid: str) -> bool:
        """Whether its monitor let a term end (Renewing.decline): an idle release in effect."""
        with self.reading() as db:
            return _declined(db, aid)

    def decline(self, aid: str, lease_end: float, now: float, why: str) -> bool:
        """Its monitor lets the term that ends at `lease_end` end (its GPUs looked idle all of
        it): audited once, so that the work that resumes it is not judged by its idling
        again (Ledger.resume), and so that a monitor that decides the term again after a
        restart cannot renew it (Renewing.renew): the lease ends at the term's end, the last
        term an allocation has, so one entry per allocation says which. Whether it was
        audited: not where that term is no longer open (a release, a budget or a preemption
        set the end since the monitor read it: that end, not a declined term, ends it)."""
        with self.transaction() as db:
            r = db.execute(
                "SELECT project, state, lease_end, deadline, deadline_reason, renew_hours "
                "FROM allocations WHERE id=?",
                (aid,),
            ).fetchone()
            if r is None or not _still_open(r, lease_end):
                return False
            db.execute(
                AUDIT,
                (
                    not_renewed_key(aid),
                    now,
                    "gpu-agent",
                    NOT_RENEWED,
                    r["project"],
                    aid,
                    f"lease not renewed past {utc(lease_end):%Y-%m-%d %H:%M:%S} UTC: {why}",
                ),
            )
        return True


def _still_open(r: Any, lease_end: float) -> bool:
    """Whether allocation row `r` (its state, lease_end, deadline, deadline_reason and
    renew_hours) still holds the open term that ends at `lease_end` (term_open), the one its
    monitor read: not where it ended, or a budget, a preemption or a release set its end."""
    reason = r["deadline_reason"]
    return (
        term_open(
            r["state"],
            r["renew_hours"],
            r["lease_end"],
            r["deadline"],
            ReleaseReason(reason) if reason else None,
        )
        and abs(r["lease_end"] - lease_end) <= EPS_S
    )


def _declined(db: Conn, aid: str) -> bool:
    """Whether `aid`'s monitor let a term end: its one `not-renewed` audit entry."""
    found = db.execute("SELECT 1 FROM audit WHERE key=?", (not_renewed_key(aid),)).fetchone()
    return found is not None
