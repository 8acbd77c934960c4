"""A project's money in the ledger: what a new request of it may still commit, the usage
factor q that admission reads (fleet.budget), the deadlines that keep its active
allocations within its budget, budgets set by hand and what each project has spent."""

from __future__ import annotations

import operator
import uuid

from fleet.budget import (
    EPS,
    FLEET_RECORDS,
    RECORDS,
    Moved,
    accrued,
    admissible_usd,
    cut_deadlines,
    usage_factor,
    used_share,
    worst_case,
)
from fleet.errors import InvalidInput
from fleet.ledger.kept import Kept
from fleet.ledger.rows import AUDIT, EPS_S, ProjectCost
from fleet.models import CUT_BY_BUDGET, ReleaseReason
from fleet.sql import Conn

_SHARE = operator.itemgetter(2)  # of _shares' (-ended_at, allocation id, used share)

# budget.worst_case of a project's (:p) active allocations, summed by the database
COMMITTED = (
    "SELECT coalesce(sum(price_per_hour * count / 3600.0 * (deadline - started_at)), 0)"
    " FROM allocations WHERE state='active' AND project=:p"
)

# budget.Active.expected_usd summed by the database (the CASE is a min that both dialects read)
EXPECTED = (
    "SELECT coalesce(sum(price_per_hour * count / 3600.0 * CASE WHEN "
    ":q * (lease_end - started_at) < deadline - started_at THEN "
    ":q * (lease_end - started_at) ELSE deadline - started_at END), 0) "
    "FROM allocations WHERE state='active' AND project=:p"
)

# what cut_deadlines needs to know to leave every deadline at its lease end
UNCUT = (
    "SELECT coalesce(sum(price_per_hour * count / 3600.0 * (lease_end - started_at)), 0)"
    " AS worst, coalesce(sum(CASE WHEN deadline <> lease_end THEN 1 ELSE 0 END), 0) AS cut"
    " FROM allocations WHERE state='active' AND project=:p"
)


class Budgets(Kept):
    """Budgets, spend and admission."""

    def remaining_usd(self, project: str, running: bool = True) -> float | None:
        """The largest worst case a new request of the project is admitted with (None: no
        budget): what placement admits, for the checks before it (budget.admissible_usd).
        With q = 1, the budget less spend and the worst case of the active allocations;
        without `running`, once they have ended: past that a request is refused, below it
        it waits for them. Kept until this connection writes or another commits (validate,
        the council and route ask it of one request in turn)."""
        version = self.db.version()  # None (PostgreSQL): never kept
        key = (version, self._writes)
        kept = self._remaining.get((project, running))
        if version is not None and kept is not None and kept[0] == key:
            return kept[1]
        with self.db.lock:  # no budget: one statement says so, with no transaction around it
            budget = self._budget(self.db.conn(), project)
        remaining = None
        if budget is not None:
            with self.reading() as db:  # the budget again, and what it admits, in one state
                budget = self._budget(db, project)
                if budget is not None:
                    expected, factor = (
                        self._expected(db, project) if running else (0.0, self._factor(db, project))
                    )
                    remaining = admissible_usd(budget, self._spent(db, project), expected, factor)
                    if version is not None and not running:  # routing asks it next
                        self._factors[project] = (key, factor)
        if version is not None:
            self._remaining[(project, running)] = (key, remaining)
        return remaining

    def usage_factor(self, project: str) -> float:
        """The project's q (fleet.budget.usage_factor): the share of its leases it is
        expected to hold. Kept as remaining_usd is (the council's pricing and the route node
        route one request in turn)."""
        version = self.db.version()  # None (PostgreSQL): never kept
        key = (version, self._writes)
        kept = self._factors.get(project)
        if version is not None and kept is not None and kept[0] == key:
            return kept[1]
        with self.reading() as db:
            factor = self._factor(db, project)
        if version is not None:
            self._factors[project] = (key, factor)
        return factor

    def _factor(self, db: Conn, project: str) -> float:
        """Placement, routing and admission ask it of every request: the project's shares are
        kept until it finishes an allocation here, the fleet's until any does (_kept)."""
        shares = self._kept(
            db,
            ("shares", project),
            self._finished_of[project],
            lambda: self._shares(db, project, RECORDS),
        )
        return usage_factor(list(map(_SHARE, shares)), self._fleet_share(db))

    def _fleet_share(self, db: Conn) -> float:
        """The prior of a project without a record: the mean used share of the fleet's newest
        FLEET_RECORDS finished allocations; a whole lease on a new fleet."""

        def share() -> float:
            newest = self._newest(db)
            return sum(map(_SHARE, newest)) / len(newest) if newest else 1.0

        return self._kept(db, ("fleet", ""), self._finished, share)

    def _newest(self, db: Conn) -> list[tuple[float, str, float]]:
        """(-ended_at, allocation id, budget.used_share) of the fleet's newest FLEET_RECORDS
        finished allocations, newest first; read once and then kept up to date (_finish)."""
        fresh = self._fresh(db)
        if self._window is not None:
            return self._window
        window = self._shares(db, None, FLEET_RECORDS)
        if fresh:
            self._window = window
        return window

    def _shares(self, db: Conn, project: str | None, limit: int) -> list[tuple[float, str, float]]:
        """(-ended_at, allocation id, budget.used_share) of the newest `limit` finished
        allocations of `project` (None: of the fleet), newest first: in ascending order, so
        that _finish keeps them with bisect."""
        where, args = ("WHERE project=? ", (project,)) if project is not None else ("", ())
        return [
            (
                -r["ended_at"],
                r["allocation_id"],
                used_share(r["hours"], r["requested_hours"], r["reason"] in CUT_BY_BUDGET),
            )
            for r in db.execute(
                "SELECT ended_at, allocation_id, hours, requested_hours, reason FROM history "
                f"{where}ORDER BY ended_at DESC, allocation_id LIMIT {int(limit)}",
                args,
            )
        ]

    def _expected(self, db: Conn, project: str) -> tuple[float, float]:
        """(the expected cost of the project's active allocations, its usage factor q)."""
        factor = self._factor(db, project)
        expected = db.execute(EXPECTED, {"q": factor, "p": project}).fetchone()[0]
        return float(expected), factor

    def _fit_deadlines(self, db: Conn, project: str, now: float) -> list[Moved]:
        """Give the project's active allocations the deadlines (budget.cut_deadlines) at
        which their combined spend reaches its budget at most; returns those that moved."""
        budget = self._budget(db, project)
        if budget is None:
            return []
        left = budget - self._spent(db, project)
        worst, cut = db.execute(UNCUT, {"p": project}).fetchone()
        if not cut and worst <= left + EPS:
            return []  # every lease fits whole and none is cut: cut_deadlines would agree
        active = self._actives(db, project)
        deadlines = cut_deadlines([a.running(now) for a in active], left, now)
        moved = [
            Moved(a.id, a.deadline, deadlines[a.id])
            for a in active
            if deadlines[a.id] != a.deadline
        ]
        ends = {a.id: a.lease_end for a in active}
        # a lease a preemption shortened (fleet.ledger.preempting) ends as a yield; one held
        # a term at a time (fleet.ledger.renewing) as a lease
        yielding = {
            r[0]
            for r in db.execute(
                "SELECT id FROM allocations WHERE project=? AND state='active' "
                "AND lease_end < started_at + hours * 3600.0 - ? AND renew_hours IS NULL",
                (project, EPS_S),  # Lease.yields, in SQL
            )
        }
        db.executemany(
            "UPDATE allocations SET deadline=?, deadline_reason=? WHERE id=?",
            [
                (
                    m.after,
                    (
                        ReleaseReason.BUDGET
                        if m.after < ends[m.id]
                        else ReleaseReason.PREEMPTED
                        if m.id in yielding
                        else ReleaseReason.LEASE_EXPIRED
                    ).value,
                    m.id,
                )
                for m in moved
            ],
        )
        for m in moved:
            self._track(db, m.id)
        return moved

    def _committed(self, db: Conn, project: str) -> float:
        """budget.worst_case of the project's active allocations, summed by the database."""
        return float(db.execute(COMMITTED, {"p": project}).fetchone()[0])

    def set_budget(
        self, project: str, budget_usd: float, now: float, by: str = "gpu-agent"
    ) -> list[Moved]:
        """Set a project's budget; active allocations get deadlines that keep spend within it.

        Returns the allocations whose deadline moved. Refuses a budget below what the project
        has already spent or accrued.
        """
        with self.transaction(f"project:{project}") as db:
            actives = self._actives(db, project)
            so_far = accrued([a.running(now) for a in actives], now)
            floor = self._spent(db, project) + so_far
            if budget_usd + EPS < floor:
                asked, least = _apart(budget_usd, floor)
                # a release stops an allocation accruing, never lowers what it has cost
                accruing = sum(a.deadline > now for a in actives)
                why = f"budget {asked} for {project} is below what it has already spent"
                why += f" or accrued ({least})" if so_far > EPS else f" ({least})"
                if accruing == 1:
                    why += "; its running allocation adds to it until released"
                elif accruing:
                    why += f"; its {accruing} running allocations add to it until released"
                raise InvalidInput(why)
            old = self._budget(db, project)
            db.execute(
                "INSERT INTO budgets (project, budget_usd, updated_at) VALUES (?,?,?) "
                "ON CONFLICT (project) DO UPDATE SET budget_usd=excluded.budget_usd, "
                "updated_at=excluded.updated_at",
                (project, budget_usd, now),
            )
            moved = self._fit_deadlines(db, project, now)
            db.execute(
                AUDIT,
                (
                    f"budget:{project}:{now!r}:{uuid.uuid4().hex[:8]}",
                    now,
                    by,
                    "budget",
                    project,
                    project,
                    f"{'no budget' if old is None else f'${old:.2f}'} -> "
                    f"${budget_usd:.2f}; {len(moved)} deadline(s) moved",
                ),
            )
            return moved

    def costs(self, now: float) -> list[ProjectCost]:
        with self.reading() as db:
            projects = sorted(
                {r["project"] for r in db.execute("SELECT project FROM allocations")}
                | {r["project"] for r in db.execute("SELECT project FROM budgets")}
                | set(self.config.budgets)
            )
            out = []
            for p in projects:
                active = [a.charged() for a in self._actives(db, p)]
                out.append(
                    ProjectCost(
                        project=p,
                        spent_usd=self._spent(db, p),
                        accrued_usd=accrued(active, now),
                        committed_usd=worst_case(active),
                        budget_usd=self._budget(db, p),
                    )
                )
            return out


def _apart(low: float, high: float) -> tuple[str, str]:
    """Two amounts, `low` below `high`, as dollars with the cents and as many more decimals
    as they need to read apart ($0.001 and $0.004, not $0.00 and $0.00)."""
    for places in range(2, 10):  # apart by more than EPS (1e-9): the 9th decimal differs
        a, b = f"${low:,.{places}f}", f"${high:,.{places}f}"
        if a != b:
            return a, b
    return f"${low!r}", f"${high!r}"
