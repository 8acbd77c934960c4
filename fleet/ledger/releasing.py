"""Running and ending allocations: heartbeats, release (GPUs freed, the project charged and
history written, once), resuming a released allocation's work, and reconciling leases that
ran out while no process watched them."""

from __future__ import annotations

import bisect
import json
import math

from fleet.budget import FLEET_RECORDS, RECORDS, used_share
from fleet.errors import InvalidInput
from fleet.ledger.notify import notify_freed
from fleet.ledger.project_record import ProjectRecord
from fleet.ledger.renewing import not_renewed_key_sql
from fleet.ledger.rows import AUDIT, ROW, LedgerRow, Resumed, read_row
from fleet.models import Release, ReleaseReason
from fleet.scheduler import decayed
from fleet.sql import Conn


class Releasing(ProjectRecord):
    """Heartbeats, releases and resumes."""

    def heartbeat(
        self,
        aid: str,
        now: float,
        ticks: int,
        util_sum: float,
        util_n: int,
        util_last: float | None,
        idle_since: float | None = None,
    ) -> None:
        """A live monitor says it is still there, with its running utilisation totals after
        tick `ticks` (absolute, so a resumed monitor that re-runs a tick counts it once) and
        since when every GPU has been idle (None: not idle now)."""
        with self.db.lock:  # one statement: atomic without a transaction around it
            self.db.conn().execute(
                "UPDATE allocations SET heartbeat_at=:now, "
                "util_sum=CASE WHEN ticks<:t THEN :s ELSE util_sum END, "
                "util_n=CASE WHEN ticks<:t THEN :n ELSE util_n END, "
                "util_last=CASE WHEN ticks<:t THEN :last ELSE util_last END, "
                "idle_since=CASE WHEN ticks<:t THEN :idle ELSE idle_since END, "
                "ticks=CASE WHEN ticks<:t THEN :t ELSE ticks END WHERE id=:id",
                {
                    "now": now,
                    "t": ticks,
                    "s": util_sum,
                    "n": util_n,
                    "last": util_last,
                    "idle": idle_since,
                    "id": aid,
                },
            )

    def release(self, aid: str, reason: ReleaseReason, at: float, by: str = "gpu-agent") -> Release:
        """Free the GPUs, charge the project and write history, once. Idempotent."""
        return self.release_once(aid, reason, at, by)[0]

    def release_once(
        self, aid: str, reason: ReleaseReason, at: float, by: str = "gpu-agent"
    ) -> tuple[Release, bool]:
        """`release`, and whether this call released it (False: it was released before).
        `by`: who released it, for the audit log."""
        found = self.query("SELECT gpu_type, project, state FROM allocations WHERE id=?", (aid,))
        if not found:
            raise InvalidInput(f"no allocation {aid!r}")
        if found[0][2] == "released":  # for good: no lock needed to say so
            return self.get(aid).to_release(), False
        with self.transaction(f"type:{found[0][0]}", f"project:{found[0][1]}") as db:
            row = self._get(db, aid)
            assert row is not None
            if row.state == "released":
                return row.to_release(), False
            if row.state == "queued":
                self._close(db, aid, ReleaseReason.CANCELLED, at, 0.0)
            else:
                self._finish(db, row, reason, at)
                self._fit_deadlines(db, row.project, at)  # the others may run longer now
            released = self._get(db, aid)
            assert released is not None
            done = released.to_release()
            db.execute(
                AUDIT,
                (
                    f"release:{aid}",
                    at,
                    by,
                    "cancel" if row.state == "queued" else "release",
                    row.project,
                    aid,
                    f"{done.reason.value}, charged ${done.cost_usd:.2f}",
                ),
            )
            return done, True

    def _finish(self, db: Conn, row: LedgerRow, reason: ReleaseReason, at: float) -> None:
        assert row.started_at is not None and row.deadline is not None
        end = min(max(at, row.started_at), row.deadline)
        hours = (end - row.started_at) / 3600.0
        cost = round(row.price_per_hour * row.count * hours, 9)
        util_sum, util_n = self._filled(row, end)
        mean_util = util_sum / util_n if util_n else None
        db.execute(
            "UPDATE allocations SET util_sum=?, util_n=? WHERE id=?", (util_sum, util_n, row.id)
        )
        db.execute("DELETE FROM holds WHERE allocation_id=?", (row.id,))
        if self.postgres and self.config.scheduler.notify:
            notify_freed(db, row.id)  # other processes' queued requests hear it at commit
        db.executemany(
            "INSERT INTO freed (gpu_uuid, at) VALUES (?, ?) ON CONFLICT (gpu_uuid) "
            "DO UPDATE SET at=excluded.at",
            [(g, end) for g in row.gpu_ids],
        )
        if row.gpu_type in self._held:
            self._held[row.gpu_type].difference_update(row.gpu_ids)
            self._free_of.pop(row.gpu_type, None)
        db.execute(
            "INSERT INTO charges (allocation_id, project, amount_usd, charged_at) VALUES (?,?,?,?)",
            (row.id, row.project, cost, end),
        )
        db.execute(
            "INSERT INTO spend (project, usd) VALUES (?, ?) ON CONFLICT (project) "
            "DO UPDATE SET usd = spend.usd + excluded.usd",
            (row.project, cost),
        )
        hoarded = self._hoarded_hours(db, row, end)
        self._finished += 1  # the usage factors read history: kept no longer
        self._finished_of[row.project] += 1
        share = (-end, row.id, used_share(hours, row.hours, reason.cut_by_budget))
        if self._window is not None:
            bisect.insort(self._window, share)
            del self._window[FLEET_RECORDS:]
        self._follow(
            db,
            ("shares", row.project),
            self._finished_of[row.project],
            lambda shares: sorted([*shares, share])[:RECORDS],
        )
        db.execute(
            "INSERT INTO history (allocation_id, thread_id, project, purpose, priority, "
            "gpu_type, count, gpu_ids, started_at, ended_at, hours, requested_hours, cost_usd, "
            "reason, mean_util_pct, hoarded_hours) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.id,
                row.thread_id,
                row.project,
                row.purpose.value,
                row.priority,
                row.gpu_type,
                row.count,
                json.dumps(row.gpu_ids),
                row.started_at,
                end,
                hours,
                row.hours,
                cost,
                reason.value,
                mean_util,
                hoarded,
            ),
        )
        self._record(
            db, row.project, row.count * hours, row.count * hoarded, end, reason.value, mean_util
        )
        self._follow_record(db, row.project, row.id)
        half_life = self.config.scheduler.half_life_hours
        old = db.execute(
            "SELECT gpu_hours, at FROM usage WHERE project=?", (row.project,)
        ).fetchone()
        base = decayed(old["gpu_hours"], old["at"], end, half_life) if old else 0.0
        db.execute(
            "INSERT INTO usage (project, gpu_hours, at) VALUES (?,?,?) ON CONFLICT (project) "
            "DO UPDATE SET gpu_hours=excluded.gpu_hours, at=excluded.at",
            (row.project, base + row.count * hours, end),
        )
        self._close(db, row.id, reason, end, cost)

    def _close(self, db: Conn, aid: str, reason: ReleaseReason, at: float, cost: float) -> None:
        """Every release ends here: released, and its monitors row (fleet.monitors) gone in the
        same transaction, so that no row says a process monitors what has ended, also where
        that process died before the release (a dead worker's, adopted and released)."""
        db.execute(
            "UPDATE allocations SET state='released', released_at=?, release_reason=?, "
            "cost_usd=? WHERE id=?",
            (at, reason.value, cost, aid),
        )
        db.execute("DELETE FROM monitors WHERE allocation_id=?", (aid,))
        self._track(db, aid)

    def _hoarded_hours(self, db: Conn, row: LedgerRow, end: float) -> float:
        """Hours the allocation was held idle at its end with no work left: since its command
        exited (fleet.commands), or since every GPU went idle (the monitor's heartbeat), the
        longer; never the whole allocation for being released for idling."""
        assert row.started_at is not None
        marks = db.execute(
            "SELECT a.idle_since, c.ended_at FROM allocations a LEFT JOIN "
            "commands c ON c.allocation_id = a.id WHERE a.id=?",
            (row.id,),
        ).fetchone()
        since = min(
            [end, *(float(t) for t in (marks["idle_since"], marks["ended_at"]) if t is not None)]
        )
        return max(0.0, end - max(since, row.started_at)) / 3600.0

    def _filled(self, row: LedgerRow, end: float) -> tuple[float, int]:
        """Utilisation totals over the monitor's ticks, with the ticks it slept through
        before `end` (a simulated monitor skips ticks whose readings it knows) counted at the
        last reading."""
        if row.util_last is None or not row.ticks:
            return row.util_sum, row.util_n
        tick = self.config.monitor.tick_seconds
        missed = max(0, math.ceil((end - row.heartbeat_at) / tick - 1e-9) - 1)
        return row.util_sum + missed * row.util_last, row.util_n + missed

    def resumable(self, project: str, aid: str, mine: str | None = None) -> str | None:
        """Why a request of `project` may not say it resumes allocation `aid` (None: it may):
        work goes on once, so an allocation another already resumes, or a live request (queued
        or running, other than `mine`, the asking request's own allocation) says it resumes,
        is not offered again (its pause, its sparing and its place ahead of new work would be
        claimed twice)."""
        rows = self.query("SELECT project, resumed_by FROM history WHERE allocation_id=?", (aid,))
        if not rows or rows[0][0] != project:
            return f"{project} has no released allocation {aid} to resume"
        if rows[0][1] is not None:
            return f"allocation {aid}'s work was resumed already, by {rows[0][1]}"
        live = self.query(
            "SELECT id, state FROM allocations WHERE resumes=? AND state IN ('queued', 'active') "
            "AND id<>? ORDER BY id",
            (aid, mine or ""),
        )
        if live:
            return (
                f"allocation {aid}'s work is being resumed already, by {live[0][0]} ({live[0][1]})"
            )
        return None

    def resume(self, aid: str, by: str, asked_at: float, started_at: float) -> Resumed:
        """Allocation `by`, asked for at `asked_at` and started at `started_at`, goes on with
        the work of released allocation `aid`: the idle time at aid's end was a pause, not
        hoarding (its record is corrected once), and the pause lasted from when aid went idle
        until `by` started. Asked for within a tick of an idle release, the work was not
        paused at all: it went on while the GPUs looked idle. The same on a re-run; nothing
        for another allocation once `by` resumed it (two requests that both said so)."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM history WHERE allocation_id=?", (aid,)).fetchone()
            if row is None:
                return Resumed(0.0, False)
            idle = row["reason"] == ReleaseReason.IDLE.value
            working = idle and asked_at <= row["ended_at"] + self.config.monitor.tick_seconds
            misled = _misled_along(db, aid)
            if row["resumed_by"] is not None:
                if row["resumed_by"] != by:
                    return Resumed(0.0, False)
                return Resumed(float(row["pause_s"] or 0.0), working, misled)
            pause = (
                max(0.0, started_at - (row["ended_at"] - row["hoarded_hours"] * 3600.0))
                if row["hoarded_hours"] > 0
                else 0.0
            )
            before = db.execute(
                "SELECT max(pause_s) AS s FROM history WHERE resumed_by=?", (aid,)
            ).fetchone()  # what aid itself had learned
            pause = max(pause, float(before["s"] or 0.0))
            db.execute(
                "UPDATE history SET resumed_by=?, pause_s=?, hoarded_hours=0 WHERE allocation_id=?",
                (by, pause, aid),
            )
            self._finished_of[row["project"]] += 1  # its record reads hoarded hours
            record = db.execute(
                "SELECT at FROM records WHERE project=?", (row["project"],)
            ).fetchone()
            if record is not None and row["hoarded_hours"] > 0:
                half_life = self.config.council.record_half_life_days * 24.0
                was = decayed(
                    row["count"] * row["hoarded_hours"], row["ended_at"], record["at"], half_life
                )
                db.execute(
                    "UPDATE records SET idle_gpu_hours = CASE WHEN idle_gpu_hours > ? "
                    "THEN idle_gpu_hours - ? ELSE 0 END WHERE project=?",
                    (was, was, row["project"]),
                )
            return Resumed(pause, working, misled)

    def _ran_out_unwatched(self, now: float) -> tuple[str, tuple[float, float]]:
        """The query's condition and arguments for leases that ran out while no monitor
        was alive to see it (its heartbeat stale)."""
        settings = self.config.scheduler
        stale = max(
            settings.stale_after_polls * self.config.monitor.tick_seconds,
            settings.stale_after_polls * settings.poll_seconds,
        )
        return "state='active' AND deadline<=? AND heartbeat_at<?", (now, now - stale)

    def ran_out_unwatched(self, now: float) -> list[str]:
        """The allocations `reconcile(now)` would release."""
        where, args = self._ran_out_unwatched(now)
        return [str(r[0]) for r in self.query(f"SELECT id FROM allocations WHERE {where}", args)]

    def reconcile(self, now: float) -> list[Release]:
        """Release leases that ran out while no monitor was alive to see it."""
        where, args = self._ran_out_unwatched(now)
        with self.transaction() as db:
            rows = [read_row(r) for r in db.execute(f"{ROW} WHERE {where}", args)]
            releases = []
            for row in rows:
                assert row.deadline is not None
                self._finish(db, row, ReleaseReason.EXPIRED_WHILE_DOWN, row.deadline)
                db.execute(
                    AUDIT,
                    (
                        f"release:{row.id}",
                        now,
                        "reconcile",
                        "release",
                        row.project,
                        row.id,
                        "expired-while-down: the lease ended while no process watched it",
                    ),
                )
                released = self._get(db, row.id)
                assert released is not None
                releases.append(released.to_release())
            for project in sorted({r.project for r in rows}):
                self._fit_deadlines(db, project, now)
            return releases


def _misled_along(db: Conn, aid: str) -> bool:
    """Whether `aid`, or an allocation whose work it resumed, back along the chain, ended
    because its GPUs looked idle: released for idling, or ended with a term its monitor did
    not renew (fleet.ledger.renewing, audited as such; also where it then ended while no
    process watched it; not a term that ran out unwatched, undecided).
    A pause that cost the work once must not cost it again, also after a kill of another
    kind (a lease that ran out) came between."""
    row = db.execute(
        "WITH RECURSIVE chain(id) AS (SELECT CAST(? AS TEXT) UNION SELECT h.allocation_id "
        "FROM history h "
        "JOIN chain c ON h.resumed_by = c.id) "
        "SELECT 1 FROM history h WHERE h.allocation_id IN (SELECT id FROM chain) AND "
        "(h.reason = ? OR (h.reason IN (?, ?) AND EXISTS (SELECT 1 FROM audit "
        f"WHERE key = {not_renewed_key_sql('h.allocation_id')}))) LIMIT 1",
        (
            aid,
            ReleaseReason.IDLE.value,
            ReleaseReason.LEASE_EXPIRED.value,
            ReleaseReason.EXPIRED_WHILE_DOWN.value,  # declined, then ended while none watched
        ),
    ).fetchone()
    return row is not None
