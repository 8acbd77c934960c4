"""The ledger: the single source of truth for who holds which GPU and what was spent.

SQLite in WAL mode. Every change runs in one `BEGIN IMMEDIATE` transaction, so processes that
place at the same time are serialised by the database itself. Guarantees, by schema:
a GPU has at most one hold (primary key), an allocation is charged at most once and written to
history at most once (primary keys), and a thread's request maps to one allocation (unique key).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from fleet.budget import EPS, Running, accrued, cut_deadlines, worst_case
from fleet.config import FleetConfig
from fleet.errors import InvalidInput, StateDirError
from fleet.models import (
    Allocation,
    GPUInfo,
    GPURequest,
    HistoryRecord,
    Priority,
    ProjectStats,
    Purpose,
    RecordSummary,
    Release,
    ReleaseReason,
    RouteDecision,
    utc,
)
from fleet.placement import Decision, Kind, Snapshot, Ticket, decide
from fleet.scheduler import decayed, fair_share_factors, summarise
from fleet.topology import Topology

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (
    id TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    project TEXT NOT NULL,
    purpose TEXT NOT NULL,
    priority TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    price_per_hour REAL NOT NULL,
    hours REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'active', 'released')),
    enqueued_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    started_at REAL,
    lease_end REAL,
    deadline REAL,
    deadline_reason TEXT,
    released_at REAL,
    release_reason TEXT,
    cost_usd REAL,
    util_sum REAL NOT NULL DEFAULT 0,
    util_n INTEGER NOT NULL DEFAULT 0,
    ticks INTEGER NOT NULL DEFAULT 0,
    gpu_ids TEXT NOT NULL DEFAULT '[]',
    nodes TEXT NOT NULL DEFAULT '[]',
    request TEXT NOT NULL,
    UNIQUE (thread_id, request_id)
);
CREATE INDEX IF NOT EXISTS allocations_by_state ON allocations (state, gpu_type);
CREATE INDEX IF NOT EXISTS allocations_by_project ON allocations (project, state);
CREATE TABLE IF NOT EXISTS holds (
    gpu_uuid TEXT PRIMARY KEY,
    allocation_id TEXT NOT NULL REFERENCES allocations (id)
);
CREATE TABLE IF NOT EXISTS charges (
    allocation_id TEXT PRIMARY KEY REFERENCES allocations (id),
    project TEXT NOT NULL,
    amount_usd REAL NOT NULL,
    charged_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_project ON charges (project);
CREATE TABLE IF NOT EXISTS history (
    allocation_id TEXT PRIMARY KEY REFERENCES allocations (id),
    thread_id TEXT NOT NULL,
    project TEXT NOT NULL,
    purpose TEXT NOT NULL,
    priority TEXT NOT NULL,
    gpu_type TEXT NOT NULL,
    count INTEGER NOT NULL,
    gpu_ids TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    hours REAL NOT NULL,
    requested_hours REAL NOT NULL,
    cost_usd REAL NOT NULL,
    reason TEXT NOT NULL,
    mean_util_pct REAL
);
CREATE INDEX IF NOT EXISTS history_by_project ON history (project, ended_at);
CREATE INDEX IF NOT EXISTS history_by_end ON history (ended_at);
CREATE TABLE IF NOT EXISTS budgets (
    project TEXT PRIMARY KEY,
    budget_usd REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    project TEXT PRIMARY KEY,
    gpu_hours REAL NOT NULL,
    at REAL NOT NULL
);
"""


def allocation_id(thread_id: str, request_id: str) -> str:
    """Deterministic, so that a re-run of the allocate node finds its own allocation."""
    return "a-" + hashlib.sha1(f"{thread_id}:{request_id}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LedgerRow:
    """An allocation as the ledger stores it: queued, active or released."""

    id: str
    thread_id: str
    request_id: str
    project: str
    purpose: Purpose
    priority: str
    gpu_type: str
    count: int
    price_per_hour: float
    hours: float
    state: str
    enqueued_at: float
    heartbeat_at: float
    started_at: float | None
    lease_end: float | None
    deadline: float | None
    deadline_reason: ReleaseReason | None
    released_at: float | None
    release_reason: ReleaseReason | None
    cost_usd: float | None
    util_sum: float
    util_n: int
    gpu_ids: list[str]
    nodes: list[str]

    @property
    def rate_usd_per_s(self) -> float:
        return self.price_per_hour * self.count / 3600.0

    @property
    def mean_util(self) -> float | None:
        return self.util_sum / self.util_n if self.util_n else None

    def running(self) -> Running:
        assert self.started_at is not None and self.deadline is not None
        return Running(self.id, self.rate_usd_per_s, self.started_at, self.deadline)

    def to_allocation(self) -> Allocation:
        assert self.started_at is not None and self.lease_end is not None
        return Allocation(
            id=self.id,
            request_id=self.request_id,
            thread_id=self.thread_id,
            project=self.project,
            gpu_type=self.gpu_type,
            count=self.count,
            gpu_ids=self.gpu_ids,
            node="+".join(self.nodes),
            nodes=self.nodes,
            price_per_hour=self.price_per_hour,
            started_at=utc(self.started_at),
            lease_end=utc(self.lease_end),
            cuda_visible_devices=",".join(self.gpu_ids),
        )

    def to_release(self) -> Release:
        assert self.released_at is not None and self.release_reason is not None
        held = (self.released_at - self.started_at) if self.started_at is not None else 0.0
        return Release(
            allocation_id=self.id,
            reason=self.release_reason,
            released_at=utc(self.released_at),
            hours=held / 3600.0,
            cost_usd=self.cost_usd or 0.0,
            mean_util_pct=self.mean_util,
        )


@dataclass(frozen=True)
class PlaceResult:
    decision: Decision
    row: LedgerRow | None  # None only when a fresh request is denied


@dataclass(frozen=True)
class ProjectCost:
    project: str
    spent_usd: float
    accrued_usd: float  # active allocations, so far
    committed_usd: float  # active allocations, worst case
    budget_usd: float | None


_ROW_FIELDS = frozenset(f.name for f in fields(LedgerRow))


def _row(r: sqlite3.Row) -> LedgerRow:
    d = {k: r[k] for k in r.keys() if k in _ROW_FIELDS}  # noqa: SIM118 (a Row, not a dict)
    return LedgerRow(**d | {
        "purpose": Purpose(d["purpose"]),
        "deadline_reason": ReleaseReason(d["deadline_reason"]) if d["deadline_reason"] else None,
        "release_reason": ReleaseReason(d["release_reason"]) if d["release_reason"] else None,
        "gpu_ids": json.loads(d["gpu_ids"]),
        "nodes": json.loads(d["nodes"]),
    })


class Ledger:
    def __init__(self, path: str | Path, config: FleetConfig) -> None:
        self.path = Path(path)
        self.config = config
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=60.0
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 60000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateDirError(
                f"ledger {self.path} is unreadable ({exc}); move it aside to start a new one"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        with self.transaction() as db:
            found = db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            version = None
            if found:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row["value"]) if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StateDirError(
                    f"ledger {self.path} has schema version {version}, newer than this "
                    f"gpu-agent understands ({SCHEMA_VERSION}); upgrade gpu-agent"
                )
            if version is None:
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise StateDirError(
                        f"{self.path} is a SQLite file but not a gpu-agent ledger; "
                        "move it aside or choose another --state-dir"
                    )
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            else:  # an index added within version 1: ledgers made before it get it now
                db.execute("CREATE INDEX IF NOT EXISTS history_by_end ON history (ended_at)")

    @contextmanager
    def _begin(self, mode: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute(f"BEGIN {mode}")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write: BEGIN IMMEDIATE serialises writers across processes."""
        return self._begin("IMMEDIATE")

    def reading(self) -> AbstractContextManager[sqlite3.Connection]:
        """A consistent read: a deferred transaction, so readers never take the write lock."""
        return self._begin("DEFERRED")

    def _running(self, db: sqlite3.Connection, project: str) -> list[Running]:
        return [
            _row(r).running()
            for r in db.execute(
                "SELECT * FROM allocations WHERE state='active' AND project=?", (project,)
            )
        ]

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- placement -------------------------------------------------------------------

    def place(
        self,
        request: GPURequest,
        route: RouteDecision,
        thread_id: str,
        now: float,
        inventory: list[GPUInfo],
        topology: Topology,
    ) -> PlaceResult:
        """Reserve GPUs for the request, queue it, or deny it; idempotent per (thread, request)."""
        aid = allocation_id(thread_id, request.request_id)
        with self.transaction() as db:
            existing = self._get(db, aid)
            if existing is not None and existing.state == "active":
                return PlaceResult(Decision(Kind.PLACE, "already placed"), existing)
            if existing is not None and existing.state == "released":
                reason = existing.release_reason.value if existing.release_reason else "released"
                return PlaceResult(Decision(Kind.GONE, f"already ended ({reason})"), existing)
            enqueued_at = existing.enqueued_at if existing else now
            me = Ticket(aid, request.project, route.gpu_type, request.count,
                        request.priority, enqueued_at, now)
            decision = decide(me, route.est_cost_usd, self._snapshot(db, me, now, inventory),
                              self.config, topology)
            if existing is None:
                if decision.kind is Kind.DENY:
                    return PlaceResult(decision, None)
                db.execute(
                    "INSERT INTO allocations (id, thread_id, request_id, project, purpose, "
                    "priority, gpu_type, count, price_per_hour, hours, state, enqueued_at, "
                    "heartbeat_at, request) VALUES (?,?,?,?,?,?,?,?,?,?, 'queued', ?,?,?)",
                    (aid, thread_id, request.request_id, request.project,
                     request.purpose.value, request.priority.value, route.gpu_type,
                     request.count, route.price_per_hour, route.est_hours, now, now,
                     request.model_dump_json()),
                )
            if decision.kind is Kind.PLACE:
                lease_end = now + route.est_hours * 3600.0
                db.executemany(
                    "INSERT INTO holds (gpu_uuid, allocation_id) VALUES (?, ?)",
                    [(g.uuid, aid) for g in decision.gpus],
                )
                nodes = sorted({g.node for g in decision.gpus})
                db.execute(
                    "UPDATE allocations SET state='active', started_at=?, lease_end=?, "
                    "deadline=?, deadline_reason=?, heartbeat_at=?, gpu_ids=?, nodes=? "
                    "WHERE id=?",
                    (now, lease_end, lease_end, ReleaseReason.LEASE_EXPIRED.value, now,
                     json.dumps([g.uuid for g in decision.gpus]), json.dumps(nodes), aid),
                )
            elif decision.kind is Kind.QUEUE:
                db.execute("UPDATE allocations SET heartbeat_at=? WHERE id=?", (now, aid))
            else:
                self._close(db, aid, ReleaseReason.CANCELLED, now, 0.0)
            return PlaceResult(decision, self._get(db, aid))

    def _snapshot(
        self, db: sqlite3.Connection, me: Ticket, now: float, inventory: list[GPUInfo]
    ) -> Snapshot:
        held = {r["gpu_uuid"] for r in db.execute("SELECT gpu_uuid FROM holds")}
        free = [g for g in inventory if g.gpu_type == me.gpu_type and g.uuid not in held]
        waiting = [
            Ticket(r["id"], r["project"], r["gpu_type"], r["count"],
                   Priority(r["priority"]), r["enqueued_at"], r["heartbeat_at"])
            for r in db.execute(
                "SELECT id, project, gpu_type, count, priority, enqueued_at, heartbeat_at "
                "FROM allocations WHERE state='queued' AND gpu_type=? AND id<>?",
                (me.gpu_type, me.allocation_id),
            )
        ]
        active = [_row(r) for r in db.execute("SELECT * FROM allocations WHERE state='active'")]
        active_gpus: dict[str, int] = {}
        for a in active:
            active_gpus[a.project] = active_gpus.get(a.project, 0) + a.count
        mine = [a.running() for a in active if a.project == me.project]
        return Snapshot(
            now=now,
            free=free,
            waiting=waiting,
            usage=self._usage(db, now, active),
            active_gpus=active_gpus,
            budget_usd=self._budget(db, me.project),
            spent_usd=self._spent(db, me.project),
            committed_usd=worst_case(mine),
        )

    def _usage(
        self, db: sqlite3.Connection, now: float, active: list[LedgerRow]
    ) -> dict[str, float]:
        half_life = self.config.scheduler.half_life_hours
        usage = {
            r["project"]: decayed(r["gpu_hours"], r["at"], now, half_life)
            for r in db.execute("SELECT project, gpu_hours, at FROM usage")
        }
        for a in active:
            assert a.started_at is not None
            usage[a.project] = usage.get(a.project, 0.0) + a.count * (now - a.started_at) / 3600
        return usage

    def remaining_usd(self, project: str) -> float | None:
        """Budget left after spend and the worst case of active allocations (None: unlimited)."""
        with self.reading() as db:
            budget = self._budget(db, project)
            if budget is None:
                return None
            return budget - self._spent(db, project) - worst_case(self._running(db, project))

    def _budget(self, db: sqlite3.Connection, project: str) -> float | None:
        row = db.execute("SELECT budget_usd FROM budgets WHERE project=?", (project,)).fetchone()
        return float(row["budget_usd"]) if row else self.config.budgets.get(project)

    def _spent(self, db: sqlite3.Connection, project: str) -> float:
        row = db.execute(
            "SELECT coalesce(sum(amount_usd), 0) AS s FROM charges WHERE project=?", (project,)
        ).fetchone()
        return float(row["s"])

    # ---- running allocations -------------------------------------------------------------

    def heartbeat(self, aid: str, now: float, tick: int, mean_util: float | None) -> None:
        """A live monitor says it is still there, with tick `tick`'s mean utilisation.

        A tick is counted once even when a resumed monitor re-runs it.
        """
        with self.transaction() as db:
            db.execute("UPDATE allocations SET heartbeat_at=? WHERE id=?", (now, aid))
            db.execute(
                "UPDATE allocations SET ticks=?, util_sum=util_sum+?, util_n=util_n+? "
                "WHERE id=? AND ticks<?",
                (tick, mean_util or 0.0, 0 if mean_util is None else 1, aid, tick),
            )

    def release(self, aid: str, reason: ReleaseReason, at: float) -> Release:
        """Free the GPUs, charge the project and write history, once. Idempotent."""
        with self.transaction() as db:
            row = self._get(db, aid)
            if row is None:
                raise InvalidInput(f"no allocation {aid!r}")
            if row.state == "released":
                return row.to_release()
            if row.state == "queued":
                self._close(db, aid, ReleaseReason.CANCELLED, at, 0.0)
            else:
                self._finish(db, row, reason, at)
            released = self._get(db, aid)
            assert released is not None
            return released.to_release()

    def _finish(self, db: sqlite3.Connection, row: LedgerRow, reason: ReleaseReason,
                at: float) -> None:
        assert row.started_at is not None and row.deadline is not None
        end = min(max(at, row.started_at), row.deadline)
        hours = (end - row.started_at) / 3600.0
        cost = round(row.price_per_hour * row.count * hours, 9)
        db.execute("DELETE FROM holds WHERE allocation_id=?", (row.id,))
        db.execute(
            "INSERT INTO charges (allocation_id, project, amount_usd, charged_at) "
            "VALUES (?,?,?,?)",
            (row.id, row.project, cost, end),
        )
        db.execute(
            "INSERT INTO history (allocation_id, thread_id, project, purpose, priority, "
            "gpu_type, count, gpu_ids, started_at, ended_at, hours, requested_hours, cost_usd, "
            "reason, mean_util_pct) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (row.id, row.thread_id, row.project, row.purpose.value, row.priority,
             row.gpu_type, row.count, json.dumps(row.gpu_ids), row.started_at, end, hours,
             row.hours, cost, reason.value, row.mean_util),
        )
        half_life = self.config.scheduler.half_life_hours
        old = db.execute("SELECT gpu_hours, at FROM usage WHERE project=?",
                         (row.project,)).fetchone()
        base = decayed(old["gpu_hours"], old["at"], end, half_life) if old else 0.0
        db.execute(
            "INSERT INTO usage (project, gpu_hours, at) VALUES (?,?,?) ON CONFLICT (project) "
            "DO UPDATE SET gpu_hours=excluded.gpu_hours, at=excluded.at",
            (row.project, base + row.count * hours, end),
        )
        self._close(db, row.id, reason, end, cost)

    def _close(self, db: sqlite3.Connection, aid: str, reason: ReleaseReason, at: float,
               cost: float) -> None:
        db.execute(
            "UPDATE allocations SET state='released', released_at=?, release_reason=?, "
            "cost_usd=? WHERE id=?",
            (at, reason.value, cost, aid),
        )

    def reconcile(self, now: float) -> list[Release]:
        """Release leases that ran out while no monitor was alive to see it."""
        settings = self.config.scheduler
        stale = max(settings.stale_after_polls * self.config.monitor.tick_seconds,
                    settings.stale_after_polls * settings.poll_seconds)
        with self.transaction() as db:
            rows = [
                _row(r)
                for r in db.execute(
                    "SELECT * FROM allocations WHERE state='active' AND deadline<=? "
                    "AND heartbeat_at<?",
                    (now, now - stale),
                )
            ]
            releases = []
            for row in rows:
                assert row.deadline is not None
                self._finish(db, row, ReleaseReason.EXPIRED_WHILE_DOWN, row.deadline)
                released = self._get(db, row.id)
                assert released is not None
                releases.append(released.to_release())
            return releases

    # ---- budgets -------------------------------------------------------------------------

    def set_budget(self, project: str, budget_usd: float, now: float) -> list[LedgerRow]:
        """Set a project's budget; active allocations get deadlines that keep spend within it.

        Returns the allocations whose deadline moved. Refuses a budget below what the project
        has already spent or accrued.
        """
        with self.transaction() as db:
            spent = self._spent(db, project)
            active = [
                _row(r)
                for r in db.execute(
                    "SELECT * FROM allocations WHERE state='active' AND project=?", (project,)
                )
            ]
            leases = [
                Running(a.id, a.rate_usd_per_s, a.started_at or now, a.lease_end or now)
                for a in active
            ]
            floor = spent + accrued(leases, now)
            if budget_usd + EPS < floor:
                raise InvalidInput(
                    f"budget ${budget_usd:.2f} for {project} is below what it has already spent "
                    f"or accrued (${floor:.2f}); release its allocations first"
                )
            deadlines = cut_deadlines(leases, budget_usd - spent, now)
            moved = []
            for a in active:
                new = deadlines[a.id]
                reason = (ReleaseReason.LEASE_EXPIRED if a.lease_end is not None
                          and new >= a.lease_end else ReleaseReason.BUDGET)
                if new != a.deadline or reason != a.deadline_reason:
                    db.execute("UPDATE allocations SET deadline=?, deadline_reason=? WHERE id=?",
                               (new, reason.value, a.id))
                    moved.append(a.id)
            db.execute(
                "INSERT INTO budgets (project, budget_usd, updated_at) VALUES (?,?,?) "
                "ON CONFLICT (project) DO UPDATE SET budget_usd=excluded.budget_usd, "
                "updated_at=excluded.updated_at",
                (project, budget_usd, now),
            )
            return [r for r in (self._get(db, m) for m in moved) if r is not None]

    # ---- queries -------------------------------------------------------------------------

    def _get(self, db: sqlite3.Connection, aid: str) -> LedgerRow | None:
        r = db.execute("SELECT * FROM allocations WHERE id=?", (aid,)).fetchone()
        return _row(r) if r else None

    def get(self, aid: str) -> LedgerRow:
        rows = self._read("SELECT * FROM allocations WHERE id=?", (aid,))
        if not rows:
            raise InvalidInput(f"no allocation {aid!r}")
        return _row(rows[0])

    def allocations(self, state: str | None = None) -> list[LedgerRow]:
        if state is None:
            rows = self._read("SELECT * FROM allocations ORDER BY enqueued_at, id")
        else:
            rows = self._read(
                "SELECT * FROM allocations WHERE state=? ORDER BY enqueued_at, id", (state,)
            )
        return [_row(r) for r in rows]

    def holders(self) -> dict[str, tuple[str, str]]:
        """GPU uuid -> (allocation id, project) for every held GPU."""
        return {
            r["gpu_uuid"]: (r["allocation_id"], r["project"])
            for r in self._read(
                "SELECT h.gpu_uuid, h.allocation_id, a.project FROM holds h "
                "JOIN allocations a ON a.id = h.allocation_id"
            )
        }

    def history(self, project: str | None = None, limit: int | None = None, *,
                with_requests: bool = True) -> list[HistoryRecord]:
        """Finished allocations, newest first; `with_requests` also parses each request."""
        sql = "SELECT h.*, a.request FROM history h JOIN allocations a ON a.id = h.allocation_id"
        args: tuple[object, ...] = ()
        if project is not None:
            sql += " WHERE h.project=?"
            args = (project,)
        sql += " ORDER BY h.ended_at DESC, h.allocation_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [
            HistoryRecord.model_validate(dict(r) | {
                "gpu_ids": json.loads(r["gpu_ids"]),
                "started_at": utc(r["started_at"]),
                "ended_at": utc(r["ended_at"]),
                "request": GPURequest.model_validate_json(r["request"]) if with_requests else None,
            })
            for r in self._read(sql, args)
        ]

    def costs(self, now: float) -> list[ProjectCost]:
        with self.reading() as db:
            projects = sorted(
                {r["project"] for r in db.execute("SELECT project FROM allocations")}
                | {r["project"] for r in db.execute("SELECT project FROM budgets")}
                | set(self.config.budgets)
            )
            out = []
            for p in projects:
                active = self._running(db, p)
                out.append(ProjectCost(
                    project=p,
                    spent_usd=self._spent(db, p),
                    accrued_usd=accrued(active, now),
                    committed_usd=worst_case(active),
                    budget_usd=self._budget(db, p),
                ))
            return out

    def project_stats(self, project: str, now: float, recent: int) -> ProjectStats:
        """The project's standing for the council: budget, usage share, recent history."""
        with self.reading() as db:
            active = [_row(r) for r in db.execute("SELECT * FROM allocations WHERE state='active'")]
            usage = self._usage(db, now, active)
            factors = fair_share_factors(usage, self.config.shares, [project])
            total = sum(usage.values())
            mine = [a for a in active if a.project == project]
            stats = ProjectStats(
                project=project,
                budget_usd=self._budget(db, project),
                spent_usd=self._spent(db, project),
                committed_usd=worst_case([a.running() for a in mine]),
                active_gpus=sum(a.count for a in mine),
                decayed_gpu_hours=usage.get(project, 0.0),
                usage_share=usage.get(project, 0.0) / total if total > 0 else 0.0,
                fair_share=factors[project],
            )
        stats.recent = self.history(project, limit=recent, with_requests=False)
        if stats.recent:
            stats.fleet_busy = self._occupancy([r.started_at.timestamp() for r in stats.recent])
            stats.older = self._older(project, recent, stats.recent[-1].ended_at.timestamp())
        return stats

    def _occupancy(self, times: list[float]) -> list[float]:
        """The share of the fleet's GPUs held at each time."""
        lo, hi = min(times), max(times)
        spans = [(r["started_at"], r["ended_at"], r["count"]) for r in self._read(
            "SELECT started_at, ended_at, count FROM history WHERE ended_at > ? AND started_at <= ?"
            " UNION ALL SELECT started_at, 1e300, count FROM allocations"
            " WHERE state='active' AND started_at <= ?", (lo, hi, hi))]
        total = sum(n.gpus for n in self.config.nodes)
        return [min(1.0, sum(c for s, e, c in spans if s <= t < e) / total) for t in times]

    def _older(self, project: str, skip: int, at: float) -> RecordSummary:
        """History beyond the newest `skip` events, decayed to `at`; events older than eight
        half-lives weigh under 0.4 % and are left out."""
        half_life_h = self.config.council.record_half_life_days * 24.0
        rows = self._read(
            "SELECT count, hours, ended_at, reason, mean_util_pct FROM history"
            " WHERE project=? AND ended_at > ? ORDER BY ended_at DESC, allocation_id"
            " LIMIT -1 OFFSET ?", (project, at - 8 * half_life_h * 3600.0, skip))
        return summarise(((r["count"], r["hours"], r["ended_at"], r["reason"],
                           r["mean_util_pct"]) for r in rows), at, half_life_h)

    def dump(self) -> list[str]:
        """Every row of every table, for tests that prove nothing changed."""
        with self._lock:
            return list(self._db.iterdump())

