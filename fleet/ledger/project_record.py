"""A project's record for the council: its finished allocations, their decayed sums kept in
one row per project (so older history costs one read), and its standing (ProjectStats)."""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from fleet.ledger.budgets import Budgets
from fleet.models import CUT_BY_BUDGET, GPURequest, HistoryRecord, ProjectStats, RecordSummary, utc
from fleet.scheduler import decayed, fair_share_factors
from fleet.sql import Conn

RECORD_SUMS = (
    "gpu_hours",
    "idle_gpu_hours",
    "budget_gpu_hours",
    "rated_gpu_hours",
    "util_gpu_hours",
)


# A project's newest finished allocations with what the council reads beside each: the
# fleet's load when it started (allocations.busy_at_start) and the project's record sums
# (records, the same row on each): its whole record in one statement.
_WITH_RECORD = (
    "SELECT h.*, a.busy_at_start, r.at AS record_at, r.events AS record_events, "
    + ", ".join(f"r.{c} AS record_{c}" for c in RECORD_SUMS)
    + " FROM history h JOIN allocations a ON a.id = h.allocation_id"
    " LEFT JOIN records r ON r.project = h.project"
)
RECENT = f"{_WITH_RECORD} WHERE h.project=? ORDER BY h.ended_at DESC, h.allocation_id LIMIT "
ONE = f"{_WITH_RECORD} WHERE h.allocation_id=?"  # a history row as RECENT reads it

_RECORDS = TypeAdapter(list[HistoryRecord])  # one call validates them all


def _history_records(rows: list[Any], with_requests: bool) -> list[HistoryRecord]:
    """History rows (h.*, and a.request where `with_requests`) as HistoryRecords."""
    if not rows:
        return []
    names = rows[0].keys()  # dict(row) reads each column by name, several times slower
    return _RECORDS.validate_python(
        [
            dict(zip(names, r, strict=True))
            | {
                "gpu_ids": json.loads(r["gpu_ids"]),
                "started_at": utc(r["started_at"]),
                "ended_at": utc(r["ended_at"]),
                "request": GPURequest.model_validate_json(r["request"]) if with_requests else None,
            }
            for r in rows
        ]
    )


@dataclass(frozen=True)
class Record:
    """A project's newest finished allocations as project_stats keeps them between reads."""

    order: list[tuple[float, str]]  # (-ended_at, allocation_id): RECENT's order, ascending
    records: list[HistoryRecord]
    busy: list[float | None]  # busy_at_start as stored (None: placed before it was)
    older: RecordSummary | None


class ProjectRecord(Budgets):
    """History and the council's view of a project."""

    def history(
        self, project: str | None = None, limit: int | None = None, *, with_requests: bool = True
    ) -> list[HistoryRecord]:
        """Finished allocations, newest first; `with_requests` also parses each request."""
        sql = "SELECT h.*, a.request FROM history h JOIN allocations a ON a.id = h.allocation_id"
        args: tuple[object, ...] = ()
        if project is not None:
            sql += " WHERE h.project=?"
            args = (project,)
        sql += " ORDER BY h.ended_at DESC, h.allocation_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return _history_records(self.query(sql, args), with_requests)

    def project_stats(self, project: str, now: float, recent: int) -> ProjectStats:
        """The project's standing for the council: budget, usage share, recent history."""
        with self.reading() as db:
            active_gpus, usage = self._active(db, now)
            factors = fair_share_factors(usage, self.config.shares, [project])
            total = sum(usage.values())
            stats = ProjectStats(
                project=project,
                budget_usd=self._budget(db, project),
                spent_usd=self._spent(db, project),
                committed_usd=self._committed(db, project),
                active_gpus=active_gpus.get(project, 0),
                decayed_gpu_hours=usage.get(project, 0.0),
                usage_share=usage.get(project, 0.0) / total if total > 0 else 0.0,
                fair_share=factors[project],
            )
            kept = self._kept(
                db,
                (f"record:{recent}", project),
                self._finished_of[project],
                lambda: self._record_of(db, project, recent),
            )
            busy = [float(b) for b in kept.busy if b is not None]
            if len(busy) < len(kept.busy):  # some started before it was recorded: from history
                busy, _ = self._busy(db, kept.records)
            stats.recent, stats.fleet_busy, stats.older = list(kept.records), list(busy), kept.older
        return stats

    def _record_of(self, db: Conn, project: str, recent: int) -> Record:
        """The project's `recent` newest finished allocations, the fleet's load when each
        started, and the rest of its record: what changes only when its own history does.
        One statement (RECENT)."""
        rows = db.execute(RECENT + str(int(recent)), (project,)).fetchall()
        records = _history_records(rows, with_requests=False)
        return Record(
            [(-r["ended_at"], r["allocation_id"]) for r in rows],
            records,
            [r["busy_at_start"] for r in rows],
            self._older(rows[0], records) if rows else None,
        )

    def _follow_record(self, db: Conn, project: str, aid: str) -> None:
        """This connection just moved allocation `aid` to the project's history (and its
        record sums): the records it keeps of the project follow, as RECENT would read them
        now (see _follow)."""
        read: list[Any] = []  # the new row and its record, read once if any record is kept

        def follow(was: Record, recent: int) -> Record:
            if not read:
                row = db.execute(ONE, (aid,)).fetchone()
                read.extend([row, *_history_records([row], with_requests=False)])
            row, new = read
            place = (-row["ended_at"], aid)
            at = bisect.bisect(was.order, place)
            order, records, busy = list(was.order), list(was.records), list(was.busy)
            if at < recent:
                order.insert(at, place)
                records.insert(at, new)
                busy.insert(at, row["busy_at_start"])
                del order[recent:], records[recent:], busy[recent:]
            older = self._older(row, records) if records else None  # row: the sums now
            return Record(order, records, busy, older)

        for key in [k for k in self._kept_values if k[1] == project and k[0].startswith("record:")]:
            recent = int(key[0].removeprefix("record:"))
            self._follow(
                db, key, self._finished_of[project], functools.partial(follow, recent=recent)
            )

    def _busy(self, db: Conn, records: list[HistoryRecord]) -> tuple[list[float], bool]:
        """The share of the fleet that others held when each allocation started (recorded at
        placement; recomputed from history for allocations placed before it was recorded),
        and whether every one was recorded."""
        ids = [r.allocation_id for r in records]
        marks = ",".join("?" * len(ids))
        busy = {
            r["id"]: r["busy_at_start"]
            for r in db.execute(
                f"SELECT id, busy_at_start FROM allocations WHERE id IN ({marks})", ids
            )
        }
        total = sum(n.gpus for n in self.config.nodes)
        out = []
        recorded = True
        for r in records:
            b = busy.get(r.allocation_id)
            if b is None:
                recorded = False
                t = r.started_at.timestamp()
                held = db.execute(
                    "SELECT coalesce(sum(count), 0) FROM history WHERE started_at < ? AND "
                    "ended_at > ? AND allocation_id <> ?",
                    (t, t, r.allocation_id),
                ).fetchone()[0]
                b = min(1.0, held / total)
            out.append(float(b))
        return out, recorded

    def _record(
        self,
        db: Conn,
        project: str,
        gpu_hours: float,
        hoarded_gpu_hours: float,
        ended_at: float,
        reason: str,
        util: float | None,
    ) -> None:
        """Add a finished allocation to the project's decayed record sums (kept at the time
        of its latest end), so the council's older-history summary costs one row to read.
        The column named idle_gpu_hours holds hoarded GPU-hours (held idle at the end)."""
        half_life = self.config.council.record_half_life_days * 24.0
        row = db.execute("SELECT * FROM records WHERE project=?", (project,)).fetchone()
        at = max(ended_at, row["at"]) if row else ended_at
        old = [0.0] * 5
        if row:
            k = decayed(1.0, row["at"], at, half_life)
            old = [k * row[c] for c in RECORD_SUMS]
        w = decayed(gpu_hours, ended_at, at, half_life)
        new = [
            w,
            decayed(hoarded_gpu_hours, ended_at, at, half_life),
            w if reason in CUT_BY_BUDGET else 0.0,
            w if util is not None else 0.0,
            w * util if util is not None else 0.0,
        ]
        db.execute(
            "INSERT INTO records (project, at, events, gpu_hours, idle_gpu_hours, "
            "budget_gpu_hours, rated_gpu_hours, util_gpu_hours) VALUES (?,?,?,?,?,?,?,?) "
            "ON CONFLICT (project) DO UPDATE SET at=excluded.at, events=excluded.events, "
            "gpu_hours=excluded.gpu_hours, idle_gpu_hours=excluded.idle_gpu_hours, "
            "budget_gpu_hours=excluded.budget_gpu_hours, "
            "rated_gpu_hours=excluded.rated_gpu_hours, util_gpu_hours=excluded.util_gpu_hours",
            (
                project,
                at,
                (row["events"] if row else 0) + 1,
                *(a + b for a, b in zip(old, new, strict=True)),
            ),
        )

    def _older(self, row: Any, recent: list[HistoryRecord]) -> RecordSummary | None:
        """History beyond the `recent` events, decayed to the end of the oldest of them: the
        project's whole record (the record_ columns of RECENT's `row`) less the recent
        events, both decayed to that time."""
        if row["record_events"] is None or row["record_events"] <= len(recent):
            return None
        at = recent[-1].ended_at.timestamp()
        half_life = self.config.council.record_half_life_days * 24.0
        grow = 2.0 ** ((row["record_at"] - at) / (half_life * 3600.0))  # from the record's time
        sums = [grow * row[f"record_{c}"] for c in RECORD_SUMS]
        for r in recent:
            k = 2.0 ** ((r.ended_at.timestamp() - at) / (half_life * 3600.0))
            w = r.count * r.hours * k
            budget = r.reason.cut_by_budget
            rated = r.mean_util_pct is not None
            mine = [
                w,
                r.count * r.hoarded_hours * k,
                w if budget else 0.0,
                w if rated else 0.0,
                w * r.mean_util_pct if r.mean_util_pct is not None else 0.0,
            ]
            sums = [a - b for a, b in zip(sums, mine, strict=True)]
        gpu, hoarded_h, budget_h, rated_h, util_h = (max(0.0, x) for x in sums)
        return RecordSummary(
            events=row["record_events"] - len(recent),
            at=utc(at),
            gpu_hours=gpu,
            hoarded_gpu_hours=hoarded_h,
            budget_gpu_hours=budget_h,
            rated_gpu_hours=rated_h,
            util_gpu_hours=util_h,
        )
