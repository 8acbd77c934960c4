"""The ledger: the single source of truth for who holds which GPU and what was spent.

SQLite in WAL mode by default, or one PostgreSQL database that workers on many hosts share
(fleet.sql: how each serialises the writers that compete). Guarantees, by schema:
a GPU has at most one hold (primary key), an allocation is charged at most once and written to
history at most once (primary keys), and a thread's request maps to one allocation (unique key).
"""

from __future__ import annotations

import bisect
import json
import math
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, cast

from fleet.backfill import Ending, reserve
from fleet.budget import (
    EPS,
    FLEET_RECORDS,
    RECORDS,
    Active,
    Moved,
    accrued,
    admissible_usd,
    cut_deadlines,
    usage_factor,
    used_share,
    worst_case,
)
from fleet.config import FleetConfig
from fleet.errors import InvalidInput, StateDirError
from fleet.ledger_rows import (
    AUDIT,
    AuditEntry,
    Lease,
    LedgerRow,
    PlaceResult,
    ProjectCost,
    Resumed,
    allocation_id,
)
from fleet.ledger_schema import SCHEMA, SCHEMA_VERSION, TABLES, V2, V3, V4, V4_COLUMNS, V5
from fleet.models import (
    CUT_BY_BUDGET,
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
from fleet.placement import Decision, Kind, Snapshot, Ticket, decide, in_line
from fleet.scheduler import decayed, fair_share_factors
from fleet.sql import Conn, Database, open_database
from fleet.topology import Topology

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
RECORD_SUMS = (
    "gpu_hours",
    "idle_gpu_hours",
    "budget_gpu_hours",
    "rated_gpu_hours",
    "util_gpu_hours",
)


T = TypeVar("T")
PRIORITIES = {p.value: p for p in Priority}  # a dict read is many times faster than Priority(v)
ROW = "SELECT " + ", ".join(f.name for f in fields(LedgerRow)) + " FROM allocations"
_AT = {f.name: i for i, f in enumerate(fields(LedgerRow))}
TICKET = "id, project, gpu_type, count, priority, enqueued_at, heartbeat_at, hours, resumes"


def _ticket(r: Any) -> Ticket:
    """A queued allocation as placement sees it, from a row that starts with TICKET."""
    aid, project, gpu_type, count, priority, enqueued, beat, hours, resumes = tuple(r)[:9]
    return Ticket(
        aid,
        project,
        gpu_type,
        count,
        PRIORITIES[priority],
        enqueued,
        beat,
        hours,
        resumes is not None,
    )


@dataclass(frozen=True)
class _Running:
    """An active allocation as the ledger keeps it between reads (Ledger._running)."""

    project: str
    gpu_type: str
    gpu_ids: str  # as stored (JSON): decoded where needed
    active: Active


class _Runs:
    """The active allocations by GPU type and by project, each by id."""

    def __init__(self) -> None:
        self.of_type: dict[str, dict[str, _Running]] = {}
        self.of_project: dict[str, dict[str, _Running]] = {}
        self.changes: Counter[str] = Counter()  # per type: what is derived from it is stale
        self.endings: dict[str, tuple[int, list[Ending]]] = {}  # Ledger._endings, per type

    def put(self, run: _Running) -> None:
        self.of_type.setdefault(run.gpu_type, {})[run.active.id] = run
        self.of_project.setdefault(run.project, {})[run.active.id] = run
        self.changes[run.gpu_type] += 1

    def drop(self, aid: str, gpu_type: str, project: str) -> None:
        self.of_type.get(gpu_type, {}).pop(aid, None)
        self.of_project.get(project, {}).pop(aid, None)
        self.changes[gpu_type] += 1


RUNNING = "project, gpu_type, gpu_ids, id, price_per_hour, count, started_at, lease_end, deadline"


def _run_of(r: Any) -> _Running:
    """An active allocation from a row that starts with RUNNING."""
    project, gpu_type, gpu_ids, aid, price, count, started, lease_end, deadline = tuple(r)[:9]
    return _Running(
        project,
        gpu_type,
        gpu_ids,
        Active(aid, price * count / 3600.0, started, lease_end, deadline),
    )


def _row(r: Any) -> LedgerRow:
    """A row selected with ROW (its columns in LedgerRow's order)."""
    v = list(r)
    v[_AT["purpose"]] = Purpose(v[_AT["purpose"]])
    for name in ("deadline_reason", "release_reason"):
        v[_AT[name]] = ReleaseReason(v[_AT[name]]) if v[_AT[name]] else None
    for name in ("gpu_ids", "nodes"):
        v[_AT[name]] = json.loads(v[_AT[name]])
    return LedgerRow(*v)


class Ledger:
    def __init__(self, path: str | Path, config: FleetConfig, *, durable: bool = True) -> None:
        """`path`: a SQLite file, or a postgresql:// URL. `durable=False` (a simulation's
        scratch ledger, SQLite only): it works in memory and is written to its file when
        closed, and holds the file's lock while open, so no other process reads it
        meanwhile; a run killed before it closes leaves the file as it was."""
        self.db: Database = open_database(path, durable=durable)
        self.name = self.db.name
        self.config = config
        self._types: tuple[list[GPUInfo], dict[str, list[GPUInfo]]] | None = None
        # per type, for the inventory list it was built from: its GPUs, and how many of them
        # each active allocation holds (see _endings)
        self._usable_of: tuple[list[GPUInfo], dict[str, tuple[set[str], dict[str, int]]]] | None = (
            None
        )
        # GPU type -> held GPU uuids, valid while no other connection has committed
        # (SQLite's data_version); this connection's own changes update it as they are made.
        self._held: dict[str, set[str]] = {}
        # GPU type -> its queued requests as tickets, in the order the table stores them;
        # kept the same way (placement reads the whole line of a type at every decision)
        self._queues: dict[str, dict[str, Ticket]] = {}
        self._runs: _Runs | None = None  # the active allocations, kept the same way
        self._window: list[tuple[float, str, float]] | None = None  # see _newest
        self._free_of: dict[str, tuple[list[GPUInfo], set[str], list[GPUInfo]]] = {}
        self._writes = 0  # this connection's write transactions, begun and ended (x2)
        self._remaining: dict[tuple[str, bool], tuple[tuple[int | None, int], float | None]] = {}
        # allocations this connection moved to history, in all and per project (where it
        # also counts a history it corrected, see resume)
        self._finished = 0
        self._finished_of: Counter[str] = Counter()
        self._kept_values: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}
        self._version: int | None = None
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise StateDirError(
                f"ledger {self.name} is unreadable ({exc}); move it aside to start a new one"
            ) from None
        except BaseException:
            self.db.close()
            raise

    @property
    def postgres(self) -> bool:
        return self.db.dialect == "postgresql"

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self.transaction() as db:
            tables = self.db.tables(db)
            version = None
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row["value"]) if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StateDirError(
                    f"ledger {self.name} has schema version {version}, newer than this "
                    f"gpu-agent understands ({SCHEMA_VERSION}); upgrade gpu-agent"
                )
            if version is None:
                # a SQLite ledger is a file of its own; a database also holds checkpoints
                foreign = tables & set(TABLES) if self.postgres else tables
                if foreign:
                    raise StateDirError(
                        f"{self.name} holds tables but is not a gpu-agent ledger; "
                        "move it aside or choose another --state-dir or --database"
                    )
                self._create(db, SCHEMA + V2 + V3 + V4 + V5)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            if version < 2:
                self._upgrade_v1(db)
                self._create(db, V2)
            if version < 3:
                self._create(db, V3)
            if version < 4:
                self._create(db, V4)
                for table, columns in V4_COLUMNS.items():
                    for column in columns:
                        if column.split()[0] not in self.db.columns(db, table):
                            db.execute(self.db.schema(f"ALTER TABLE {table} ADD COLUMN {column}"))
                self._recount_hoarding(db)
            if version < 5:
                self._create(db, V5)
            if version < SCHEMA_VERSION:
                db.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                )

    def _recount_hoarding(self, db: Conn) -> None:
        """Before version 4 an idle release counted its whole allocation as hoarding; what is
        known of such a release now is that every GPU sat idle for the idle timeout before
        it: that much counts, and the records' sums are rebuilt from history."""
        timeout = self.config.monitor.idle_timeout_minutes / 60.0
        db.execute(
            "UPDATE history SET hoarded_hours = CASE WHEN hours < ? THEN hours ELSE ? "
            "END WHERE reason = ?",
            (timeout, timeout, ReleaseReason.IDLE.value),
        )
        db.execute("DELETE FROM records")
        for r in db.execute(
            "SELECT project, count, hours, hoarded_hours, ended_at, reason, "
            "mean_util_pct FROM history ORDER BY ended_at, allocation_id"
        ).fetchall():
            self._record(
                db,
                r["project"],
                r["count"] * r["hours"],
                r["count"] * r["hoarded_hours"],
                r["ended_at"],
                r["reason"],
                r["mean_util_pct"],
            )

    def _create(self, db: Conn, schema: str) -> None:
        for statement in self.db.schema(schema).split(";"):
            if statement.strip():
                db.execute(statement)

    def _upgrade_v1(self, db: Conn) -> None:
        """What was added while the schema was version 1: older v1 ledgers get it now."""
        db.execute("CREATE INDEX IF NOT EXISTS history_by_end ON history (ended_at)")
        columns = self.db.columns(db, "allocations")
        for column in ("util_last", "busy_at_start"):
            if column not in columns:
                db.execute(self.db.schema(f"ALTER TABLE allocations ADD COLUMN {column} REAL"))
        tables = self.db.tables(db)

        def table(name: str, following: str | None) -> str:
            start = SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {name}")
            return SCHEMA[
                start : SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {following}")
                if following
                else None
            ].rstrip("; \n")

        if "spend" not in tables:
            self._create(db, table("spend", "history"))
            db.execute(
                "INSERT INTO spend (project, usd) SELECT project, sum(amount_usd) "
                "FROM charges GROUP BY project"
            )
        if "records" not in tables:  # filled from history by _recount_hoarding
            self._create(db, table("records", "usage"))
        if "unhealthy" not in tables:
            self._create(db, table("unhealthy", None))

    @contextmanager
    def _begin(self, tx: AbstractContextManager[Conn], write: bool = True) -> Iterator[Conn]:
        self._writes += write  # what was kept before a write of ours is kept no longer
        try:
            with tx as db:
                yield db
            self._writes += write
        except BaseException:
            self._writes += write
            self._version = None  # what is kept may hold changes just undone: read again
            self._kept_values.clear()
            raise

    def transaction(self, *keys: str) -> AbstractContextManager[Conn]:
        """A write. Writers that name a common key (or name none) run one at a time, across
        processes and hosts; SQLite runs every writer one at a time."""
        return self._begin(self.db.write(keys))

    def queue_transaction(self) -> AbstractContextManager[Conn]:
        """A write to the job queue, which claims rows with FOR UPDATE SKIP LOCKED on
        PostgreSQL instead of taking the ledger's locks."""
        return self._begin(self.db.plain())

    def reading(self) -> AbstractContextManager[Conn]:
        """A consistent read that never blocks writers."""
        return self._begin(self.db.read(), write=False)

    def query(self, sql: str, args: tuple[object, ...] | dict[str, object] = ()) -> list[Any]:
        """One statement outside a transaction (a statement is consistent by itself)."""
        with self.db.lock:
            return self.db.conn().execute(sql, args).fetchall()

    # ---- placement -------------------------------------------------------------------

    def place(
        self,
        request: GPURequest,
        route: RouteDecision,
        thread_id: str,
        now: float,
        inventory: list[GPUInfo],
        topology: Topology,
        approval: AuditEntry | None = None,
    ) -> PlaceResult:
        """Reserve GPUs for the request, queue it, or deny it; idempotent per (thread, request).
        `approval` (who approved it) is written to the audit log when the request is first
        placed or queued. Admission is on expected cost (fleet.budget); a placement then fits
        the deadlines of the project's active allocations to its budget."""
        aid = allocation_id(thread_id, request.request_id)
        with self.transaction(f"type:{route.gpu_type}", f"project:{request.project}") as db:
            existing = self._get(db, aid)
            if existing is not None and existing.state == "active":
                return PlaceResult(Decision(Kind.PLACE, "already placed"), existing)
            if existing is not None and existing.state == "released":
                reason = existing.release_reason.value if existing.release_reason else "released"
                return PlaceResult(Decision(Kind.GONE, f"already ended ({reason})"), existing)
            enqueued_at = existing.enqueued_at if existing else now
            me = Ticket(
                aid,
                request.project,
                route.gpu_type,
                request.count,
                request.priority,
                enqueued_at,
                now,
                route.est_hours,
                request.resumes is not None,
            )
            decision = decide(
                me,
                route.est_cost_usd,
                self._snapshot(db, me, now, inventory),
                self.config,
                topology,
            )
            if existing is None:
                if decision.kind is Kind.DENY:
                    return PlaceResult(decision, None)
                if approval is not None:
                    db.execute(AUDIT, astuple(approval))
                db.execute(
                    "INSERT INTO allocations (id, thread_id, request_id, project, purpose, "
                    "priority, gpu_type, count, price_per_hour, hours, state, enqueued_at, "
                    "heartbeat_at, request, resumes) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?, 'queued', ?,?,?,?)",
                    (
                        aid,
                        thread_id,
                        request.request_id,
                        request.project,
                        request.purpose.value,
                        request.priority.value,
                        route.gpu_type,
                        request.count,
                        route.price_per_hour,
                        route.est_hours,
                        now,
                        now,
                        request.model_dump_json(),
                        request.resumes,
                    ),
                )
            if decision.kind is Kind.PLACE:
                # never before its GPUs were let go: a clock read before this transaction
                # waited for the lock may be older than the release that freed them
                marks = ",".join("?" * len(decision.gpus))
                freed = db.execute(
                    f"SELECT max(at) FROM freed WHERE gpu_uuid IN ({marks})",
                    [g.uuid for g in decision.gpus],
                ).fetchone()[0]
                now = max(now, freed) if freed is not None else now
                hours = decision.hours or route.est_hours
                lease_end = now + hours * 3600.0
                held = db.execute("SELECT count(*) FROM holds").fetchone()[0]
                busy = min(1.0, held / len(inventory)) if inventory else 0.0
                db.executemany(
                    "INSERT INTO holds (gpu_uuid, allocation_id) VALUES (?, ?)",
                    [(g.uuid, aid) for g in decision.gpus],
                )
                if route.gpu_type in self._held:
                    self._held[route.gpu_type].update(g.uuid for g in decision.gpus)
                    self._free_of.pop(route.gpu_type, None)
                nodes = sorted({g.node for g in decision.gpus})
                db.execute(
                    "UPDATE allocations SET state='active', started_at=?, lease_end=?, "
                    "deadline=?, deadline_reason=?, heartbeat_at=?, gpu_ids=?, nodes=?, "
                    "busy_at_start=?, hours=? WHERE id=?",
                    (
                        now,
                        lease_end,
                        lease_end,
                        ReleaseReason.LEASE_EXPIRED.value,
                        now,
                        json.dumps([g.uuid for g in decision.gpus]),
                        json.dumps(nodes),
                        busy,
                        hours,
                        aid,
                    ),
                )
                self._track(db, aid)
                moved = self._fit_deadlines(db, request.project, now)
                return PlaceResult(decision, self._get(db, aid), [m for m in moved if m.id != aid])
            if decision.kind is Kind.QUEUE:
                db.execute("UPDATE allocations SET heartbeat_at=? WHERE id=?", (now, aid))
                self._track(db, aid)
            else:
                self._close(db, aid, ReleaseReason.CANCELLED, now, 0.0)
            return PlaceResult(decision, self._get(db, aid))

    def _snapshot(self, db: Conn, me: Ticket, now: float, inventory: list[GPUInfo]) -> Snapshot:
        return self._line(db, me.gpu_type, me.project, now, inventory, me.allocation_id, me.count)

    def _line(
        self,
        db: Conn,
        gpu_type: str,
        project: str,
        now: float,
        inventory: list[GPUInfo],
        leave_out: str = "",
        count: int = 0,
        money: bool = True,
    ) -> Snapshot:
        """The fleet as a request of `project` for `gpu_type` (`count` GPUs) sees it: free
        GPUs, the line (without `leave_out`), when held GPUs come back, usage and (unless
        `money` is False: who is in line only) the project's money."""
        waiting = [t for t in self._queued(db, gpu_type).values() if t.allocation_id != leave_out]
        free = self._free(db, gpu_type, inventory)
        # only a line that cannot all start now needs a reservation, hence the endings
        short = count + sum(t.count for t in waiting) > len(free)
        # a request alone in its line needs no fair order, and without a quota no holdings
        alone = not waiting and self.config.quotas.max_gpus(project) is None
        active_gpus, usage = ({}, {}) if alone else self._active(db, now)
        budget = self._budget(db, project) if money else None
        expected, factor = self._expected(db, project) if budget is not None else (0.0, 1.0)
        return Snapshot(
            now=now,
            free=free,
            waiting=waiting,
            endings=self._endings(db, gpu_type, inventory) if short else [],
            usage=usage,
            active_gpus=active_gpus,
            budget_usd=budget,
            spent_usd=self._spent(db, project) if money else 0.0,
            committed_usd=expected,
            usage_factor=factor,
        )

    def _endings(self, db: Conn, gpu_type: str, inventory: list[GPUInfo]) -> list[Ending]:
        """When the type's active allocations let their GPUs go at the latest (their
        deadlines), counting the GPUs placement may use again."""
        runs = self._running(db)
        fresh = self._usable_of is not None and self._usable_of[0] is inventory
        if (
            runs is not None
            and fresh
            and runs.endings.get(gpu_type, (-1, []))[0] == runs.changes[gpu_type]
        ):  # no allocation of the type started, ended or moved
            return runs.endings[gpu_type][1]
        if self._usable_of is None or self._usable_of[0] is not inventory:
            self._usable_of = (inventory, {})
        usable, known = self._usable_of[1].get(gpu_type) or (
            {g.uuid for g in self._of_type(inventory, gpu_type)},
            {},
        )
        counts: dict[str, int] = {}  # the active ones only: the next call reuses them
        out = []
        rows = (
            db.execute(
                "SELECT id, deadline, gpu_ids FROM allocations WHERE state='active' AND gpu_type=?",
                (gpu_type,),
            )
            if runs is None
            else (
                (r.active.id, r.active.deadline, r.gpu_ids)
                for r in runs.of_type.get(gpu_type, {}).values()
            )
        )
        for aid, deadline, gpu_ids in rows:
            gpus = known.get(aid)
            if gpus is None:  # an allocation's GPUs never change: decoded once
                gpus = sum(g in usable for g in json.loads(gpu_ids))
            counts[aid] = gpus
            if gpus:
                out.append(Ending(deadline, gpus))
        self._usable_of[1][gpu_type] = (usable, counts)
        if runs is not None:
            runs.endings[gpu_type] = (runs.changes[gpu_type], out)
        return out

    def placeable(self, freed: LedgerRow, now: float, inventory: list[GPUInfo]) -> list[str]:
        """Ids of the queued requests that `freed`'s release may let start: those of its
        type's line that `placement.in_line` starts now (backfill included), and, where the
        project has a quota, the project's own queued requests."""
        with self.reading() as db:
            ids = []
            if self._queued(db, freed.gpu_type):
                line = in_line(
                    self._line(db, freed.gpu_type, freed.project, now, inventory, money=False),
                    self.config,
                )
                ids = [t.allocation_id for t in line]
            if self.config.quotas.max_gpus(freed.project) is not None:
                ids += [
                    r["id"]
                    for r in db.execute(
                        "SELECT id FROM allocations WHERE state='queued' AND project=? "
                        "AND gpu_type<>? ORDER BY enqueued_at, id",
                        (freed.project, freed.gpu_type),
                    )
                ]
        return ids

    def _free(self, db: Conn, gpu_type: str, inventory: list[GPUInfo]) -> list[GPUInfo]:
        """The type's GPUs in `inventory` nobody holds, kept while the inventory list and the
        held set are the same objects (placement and release drop it when they change the
        set; callers do not change the list)."""
        held = self._held_of(db, gpu_type)
        kept = self._free_of.get(gpu_type)
        if kept is not None and kept[0] is inventory and kept[1] is held:
            return kept[2]
        free = [g for g in self._of_type(inventory, gpu_type) if g.uuid not in held]
        self._free_of[gpu_type] = (inventory, held, free)
        return free

    def _held_of(self, db: Conn, gpu_type: str) -> set[str]:
        """The held GPUs of a type, read once and then kept up to date (see __init__)."""
        fresh = self._fresh(db)
        held = self._held.get(gpu_type)
        if held is None:
            held = {
                r[0]
                for r in db.execute(
                    "SELECT h.gpu_uuid FROM holds h JOIN allocations a ON a.id = h.allocation_id "
                    "WHERE a.gpu_type=?",
                    (gpu_type,),
                )
            }
            if fresh:
                self._held[gpu_type] = held
        return held

    def _fresh(self, db: Conn) -> bool:
        """Whether what this connection keeps up to date (held GPUs, the lines, the running
        allocations, the fleet's newest shares) may be kept: all of it is dropped when
        another connection has committed since (SQLite's data_version; PostgreSQL has none,
        so nothing is kept there)."""
        version = self.db.data_version(db)
        if version is None or version != self._version:
            self._held.clear()
            self._queues.clear()
            self._runs = self._window = None
            self._version = version
        return version is not None

    def _queued(self, db: Conn, gpu_type: str) -> dict[str, Ticket]:
        """The type's queued requests by id, in the table's order, read once and then kept up
        to date as the held GPUs are (_track)."""
        fresh = self._fresh(db)
        queue = self._queues.get(gpu_type)
        if queue is None:
            queue = {
                r[0]: _ticket(r)
                for r in db.execute(
                    f"SELECT {TICKET} FROM allocations WHERE state='queued' AND gpu_type=?",
                    (gpu_type,),
                )
            }
            if fresh:
                self._queues[gpu_type] = queue
        return queue

    def _track(self, db: Conn, aid: str) -> None:
        """This connection changed allocation `aid`: what is kept of it follows (in the kept
        line an update keeps its place, a new request goes last, as in the table)."""
        if not self._queues and self._runs is None:
            return
        r = db.execute(
            f"SELECT {TICKET}, state, {RUNNING} FROM allocations WHERE id=?", (aid,)
        ).fetchone()
        if r is None:
            return
        queue = self._queues.get(r["gpu_type"])  # None: not kept, read whole when next asked
        if queue is not None and r["state"] == "queued":
            queue[aid] = _ticket(r)
        elif queue is not None:
            queue.pop(aid, None)
        if self._runs is not None and r["state"] == "active":
            self._runs.put(_run_of(tuple(r)[10:]))
        elif self._runs is not None:
            self._runs.drop(aid, r["gpu_type"], r["project"])

    def _running(self, db: Conn) -> _Runs | None:
        """The active allocations, read once and then kept up to date as the held GPUs are;
        None where nothing is kept (PostgreSQL): the caller asks the database."""
        if not self._fresh(db):
            return None
        if self._runs is None:
            self._runs = _Runs()
            for r in db.execute(f"SELECT {RUNNING} FROM allocations WHERE state='active'"):
                self._runs.put(_run_of(r))
        return self._runs

    def _of_type(self, inventory: list[GPUInfo], gpu_type: str) -> list[GPUInfo]:
        """The inventory's GPUs of one type (indexed once per inventory list)."""
        if self._types is None or self._types[0] is not inventory:
            by_type: dict[str, list[GPUInfo]] = {}
            for g in inventory:
                by_type.setdefault(g.gpu_type, []).append(g)
            self._types = (inventory, by_type)
        return self._types[1].get(gpu_type, [])

    def _active(self, db: Conn, now: float) -> tuple[dict[str, int], dict[str, float]]:
        """GPUs held per project, and decayed GPU-hours per project with the running
        allocations' hours so far added (what fair share reads)."""
        held: dict[str, int] = {}
        running: dict[str, float] = {}
        for r in db.execute(
            "SELECT project, sum(count) AS n, sum(count * (? - started_at)) AS s"
            " FROM allocations WHERE state='active' GROUP BY project",
            (now,),
        ):
            held[r["project"]] = int(r["n"])
            running[r["project"]] = float(r["s"]) / 3600.0
        half_life = self.config.scheduler.half_life_hours
        usage = {
            r["project"]: decayed(r["gpu_hours"], r["at"], now, half_life)
            for r in db.execute("SELECT project, gpu_hours, at FROM usage")
        }
        for project, hours in running.items():
            usage[project] = usage.get(project, 0.0) + hours
        return held, usage

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
        with self.reading() as db:
            budget = self._budget(db, project)
            remaining = None
            if budget is not None:
                expected, factor = (
                    self._expected(db, project) if running else (0.0, self._factor(db, project))
                )
                remaining = admissible_usd(budget, self._spent(db, project), expected, factor)
            if version is not None:
                self._remaining[(project, running)] = (key, remaining)
            return remaining

    def _actives(self, db: Conn, project: str) -> list[Active]:
        """The project's active allocations, by id."""
        runs = self._running(db)
        if runs is not None:
            return [r.active for _, r in sorted(runs.of_project.get(project, {}).items())]
        return [
            _run_of(r).active
            for r in db.execute(
                f"SELECT {RUNNING} FROM allocations WHERE state='active' AND project=? ORDER BY id",
                (project,),
            )
        ]

    def usage_factor(self, project: str) -> float:
        """The project's q (fleet.budget.usage_factor): the share of its leases it is
        expected to hold."""
        with self.reading() as db:
            return self._factor(db, project)

    def _factor(self, db: Conn, project: str) -> float:
        """Placement, routing and admission ask it of every request: the project's shares are
        kept until it finishes an allocation here, the fleet's until any does (_kept)."""
        shares = self._kept(
            db,
            ("shares", project),
            self._finished_of[project],
            lambda: self._shares(db, project, RECORDS),
        )
        return usage_factor(shares, self._fleet_share(db))

    def _fleet_share(self, db: Conn) -> float:
        """The prior of a project without a record: the mean used share of the fleet's newest
        FLEET_RECORDS finished allocations; a whole lease on a new fleet."""

        def share() -> float:
            newest = self._newest(db)
            return sum(s for *_, s in newest) / len(newest) if newest else 1.0

        return self._kept(db, ("fleet", ""), self._finished, share)

    def _newest(self, db: Conn) -> list[tuple[float, str, float]]:
        """(-ended_at, allocation id, budget.used_share) of the fleet's newest FLEET_RECORDS
        finished allocations, newest first; read once and then kept up to date (_finish)."""
        fresh = self._fresh(db)
        if self._window is not None:
            return self._window
        window = [
            (
                -r["ended_at"],
                r["allocation_id"],
                used_share(r["hours"], r["requested_hours"], r["reason"] in CUT_BY_BUDGET),
            )
            for r in db.execute(
                "SELECT ended_at, allocation_id, hours, requested_hours, "
                "reason FROM history ORDER BY ended_at DESC, allocation_id "
                f"LIMIT {FLEET_RECORDS}"
            )
        ]
        if fresh:
            self._window = window
        return window

    def _kept(self, db: Conn, key: tuple[str, str], generation: int, compute: Callable[[], T]) -> T:
        """`compute()`, kept under `key` while `generation` (a count of this connection's
        changes to what it reads) stays and no other connection commits (never on
        PostgreSQL, which has no data_version)."""
        version = self.db.data_version(db)
        kept = self._kept_values.get(key)
        if version is not None and kept is not None and kept[0] == (version, generation):
            return cast(T, kept[1])
        value = compute()
        if version is not None:
            self._kept_values[key] = ((version, generation), value)
        return value

    def _shares(self, db: Conn, project: str, limit: int) -> list[float]:
        """budget.used_share of the project's newest `limit` finished allocations, newest
        first."""
        return [
            used_share(r["hours"], r["requested_hours"], r["reason"] in CUT_BY_BUDGET)
            for r in db.execute(
                "SELECT hours, requested_hours, reason FROM history "
                "WHERE project=? ORDER BY ended_at DESC, allocation_id "
                f"LIMIT {limit}",
                (project,),
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
        db.executemany(
            "UPDATE allocations SET deadline=?, deadline_reason=? WHERE id=?",
            [
                (
                    m.after,
                    (
                        ReleaseReason.LEASE_EXPIRED
                        if m.after >= ends[m.id]
                        else ReleaseReason.BUDGET
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

    def starts_in_hours(
        self, types: Iterable[str], count: int, now: float, inventory: list[GPUInfo]
    ) -> dict[str, float]:
        """Per type, at the latest how long until a new request for `count` GPUs could
        start (0: now): when running allocations have let enough GPUs go by their deadlines.
        Infinite (unknown) while others wait for the type: the fair queue orders them and
        may put them ahead, so no bound holds (waiting behind a line was what made routing
        to a full type cost queueing time on the Philly trace)."""
        with self.reading() as db:
            return {t: self._starts_in(db, t, count, now, inventory) for t in types}

    def _starts_in(
        self, db: Conn, gpu_type: str, count: int, now: float, inventory: list[GPUInfo]
    ) -> float:
        free = len(self._free(db, gpu_type, inventory))
        queued = sum(t.count for t in self._queued(db, gpu_type).values())
        if free - queued >= count:
            return 0.0
        if queued:
            return math.inf
        at = reserve(count, free, self._endings(db, gpu_type, inventory), now).at
        return (at - now) / 3600.0

    def held_by_type(self) -> dict[str, int]:
        """GPUs held now, per GPU type."""
        return {
            r["gpu_type"]: int(r["n"])
            for r in self.query(
                "SELECT gpu_type, sum(count) AS n FROM allocations WHERE state='active' "
                "GROUP BY gpu_type"
            )
        }

    def _budget(self, db: Conn, project: str) -> float | None:
        row = db.execute("SELECT budget_usd FROM budgets WHERE project=?", (project,)).fetchone()
        return float(row["budget_usd"]) if row else self.config.budgets.get(project)

    def _spent(self, db: Conn, project: str) -> float:
        """The sum of the project's charges, kept beside them in the same transactions."""
        row = db.execute("SELECT usd FROM spend WHERE project=?", (project,)).fetchone()
        return float(row["usd"]) if row else 0.0

    # ---- running allocations -------------------------------------------------------------

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
        if self._window is not None:
            bisect.insort(
                self._window, (-end, row.id, used_share(hours, row.hours, reason.cut_by_budget))
            )
            del self._window[FLEET_RECORDS:]
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

    def resumable(self, project: str, aid: str) -> str | None:
        """Why a request of `project` may not say it resumes allocation `aid` (None: it may)."""
        rows = self.query("SELECT project FROM history WHERE allocation_id=?", (aid,))
        if not rows or rows[0][0] != project:
            return f"{project} has no released allocation {aid} to resume"
        return None

    def resume(self, aid: str, by: str, asked_at: float, started_at: float) -> Resumed:
        """Allocation `by`, asked for at `asked_at` and started at `started_at`, goes on with
        the work of released allocation `aid`: the idle time at aid's end was a pause, not
        hoarding (its record is corrected once), and the pause lasted from when aid went idle
        until `by` started. Asked for within a tick of an idle release, the work was not
        paused at all: it went on while the GPUs looked idle. The same on a re-run."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM history WHERE allocation_id=?", (aid,)).fetchone()
            if row is None:
                return Resumed(0.0, False)
            working = (
                row["reason"] == ReleaseReason.IDLE.value
                and asked_at <= row["ended_at"] + self.config.monitor.tick_seconds
            )
            if row["resumed_by"] is not None:
                return Resumed(float(row["pause_s"] or 0.0), working)
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
            return Resumed(pause, working)

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

    def _close(self, db: Conn, aid: str, reason: ReleaseReason, at: float, cost: float) -> None:
        db.execute(
            "UPDATE allocations SET state='released', released_at=?, release_reason=?, "
            "cost_usd=? WHERE id=?",
            (at, reason.value, cost, aid),
        )
        self._track(db, aid)

    def reconcile(self, now: float) -> list[Release]:
        """Release leases that ran out while no monitor was alive to see it."""
        settings = self.config.scheduler
        stale = max(
            settings.stale_after_polls * self.config.monitor.tick_seconds,
            settings.stale_after_polls * settings.poll_seconds,
        )
        with self.transaction() as db:
            rows = [
                _row(r)
                for r in db.execute(
                    f"{ROW} WHERE state='active' AND deadline<=? AND heartbeat_at<?",
                    (now, now - stale),
                )
            ]
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

    # ---- budgets -------------------------------------------------------------------------

    def set_budget(
        self, project: str, budget_usd: float, now: float, by: str = "gpu-agent"
    ) -> list[Moved]:
        """Set a project's budget; active allocations get deadlines that keep spend within it.

        Returns the allocations whose deadline moved. Refuses a budget below what the project
        has already spent or accrued.
        """
        with self.transaction(f"project:{project}") as db:
            floor = self._spent(db, project) + accrued(
                [a.running(now) for a in self._actives(db, project)], now
            )
            if budget_usd + EPS < floor:
                raise InvalidInput(
                    f"budget ${budget_usd:.2f} for {project} is below what it has already spent "
                    f"or accrued (${floor:.2f}); release its allocations first"
                )
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
                    f"${'none' if old is None else f'{old:.2f}'} -> "
                    f"${budget_usd:.2f}; {len(moved)} deadline(s) moved",
                ),
            )
            return moved

    # ---- queries -------------------------------------------------------------------------

    def _get(self, db: Conn, aid: str) -> LedgerRow | None:
        r = db.execute(f"{ROW} WHERE id=?", (aid,)).fetchone()
        return _row(r) if r else None

    def get(self, aid: str) -> LedgerRow:
        rows = self.query(f"{ROW} WHERE id=?", (aid,))
        if not rows:
            raise InvalidInput(f"no allocation {aid!r}")
        return _row(rows[0])

    def lease(self, aid: str) -> Lease:
        rows = self.query(
            "SELECT a.state, a.deadline, a.deadline_reason, a.released_at, "
            "a.release_reason, c.owner, c.ended_at FROM allocations a "
            "LEFT JOIN commands c ON c.allocation_id = a.id WHERE a.id=?",
            (aid,),
        )
        if not rows:
            raise InvalidInput(f"no allocation {aid!r}")
        state, deadline, deadline_reason, released_at, release_reason, owner, ended = rows[0]
        return Lease(
            state,
            deadline,
            ReleaseReason(deadline_reason) if deadline_reason else None,
            released_at,
            ReleaseReason(release_reason) if release_reason else None,
            owner,
            ended,
        )

    def allocations(self, state: str | None = None) -> list[LedgerRow]:
        if state is None:
            rows = self.query(f"{ROW} ORDER BY enqueued_at, id")
        else:
            rows = self.query(f"{ROW} WHERE state=? ORDER BY enqueued_at, id", (state,))
        return [_row(r) for r in rows]

    def live(self) -> list[LedgerRow]:
        """Queued and active allocations, oldest first."""
        return [
            _row(r)
            for r in self.query(
                f"{ROW} WHERE state IN ('queued', 'active') ORDER BY enqueued_at, id"
            )
        ]

    def holders(self) -> dict[str, tuple[str, str]]:
        """GPU uuid -> (allocation id, project) for every held GPU."""
        return {
            r["gpu_uuid"]: (r["allocation_id"], r["project"])
            for r in self.query(
                "SELECT h.gpu_uuid, h.allocation_id, a.project FROM holds h "
                "JOIN allocations a ON a.id = h.allocation_id"
            )
        }

    def counts_by_state(self) -> dict[str, int]:
        """Allocations per state (queued, active, released)."""
        counts = dict.fromkeys(("queued", "active", "released"), 0)
        counts |= {
            r["state"]: int(r["n"])
            for r in self.query("SELECT state, count(*) AS n FROM allocations GROUP BY state")
        }
        return counts

    def releases_by_reason(self) -> dict[str, int]:
        """Finished allocations per release reason."""
        return {
            r["reason"]: int(r["n"])
            for r in self.query(
                "SELECT reason, count(*) AS n FROM history GROUP BY reason ORDER BY reason"
            )
        }

    # ---- audit ---------------------------------------------------------------------------

    def audit(self, entry: AuditEntry) -> None:
        """Append to the audit log (once per key). One statement: atomic by itself."""
        with self.db.lock:
            self.db.conn().execute(AUDIT, astuple(entry))

    def claim(self, entry: AuditEntry) -> tuple[bool, AuditEntry]:
        """Append `entry` unless its key is taken: (whether it was, the entry that holds the
        key). Two approvers deciding one review at once: exactly one claim wins."""
        with self.db.lock:
            won = self.db.conn().execute(AUDIT, astuple(entry)).rowcount > 0
        return won, self.audit_entry(entry.key) or entry

    def audit_entry(self, key: str) -> AuditEntry | None:
        rows = self.query(
            "SELECT key, at, who, action, project, target, detail FROM audit WHERE key=?", (key,)
        )
        return AuditEntry(*rows[0]) if rows else None

    def audit_log(self, project: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """The audit log, oldest first (the last `limit` entries)."""
        sql = "SELECT key, at, who, action, project, target, detail FROM audit"
        args: tuple[object, ...] = ()
        if project is not None:
            sql += " WHERE project=?"
            args = (project,)
        rows = [AuditEntry(*r) for r in self.query(sql + " ORDER BY at, key", args)]
        return rows[-limit:] if limit else rows

    # ---- GPU health ------------------------------------------------------------------------

    def mark_unhealthy(self, gpus: dict[str, str], now: float) -> list[str]:
        """Take GPUs out of placement (an XID error, a lost GPU); returns those newly marked.
        The first reason is kept."""
        with self.transaction("unhealthy") as db:
            known = {r[0] for r in db.execute("SELECT gpu_uuid FROM unhealthy")}
            new = [g for g in gpus if g not in known]
            db.executemany(
                "INSERT INTO unhealthy (gpu_uuid, reason, since) VALUES (?, ?, ?)",
                [(g, gpus[g], now) for g in new],
            )
            return new

    def unhealthy(self) -> dict[str, str]:
        """GPU uuid -> why it is out of placement."""
        return {
            r["gpu_uuid"]: r["reason"]
            for r in self.query("SELECT gpu_uuid, reason FROM unhealthy ORDER BY since, gpu_uuid")
        }

    def clear_unhealthy(self, gpu_uuid: str) -> bool:
        """Put a repaired GPU back into placement; False if it was not marked."""
        with self.transaction("unhealthy") as db:
            return db.execute("DELETE FROM unhealthy WHERE gpu_uuid=?", (gpu_uuid,)).rowcount > 0

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
        return [
            HistoryRecord.model_validate(
                dict(r)
                | {
                    "gpu_ids": json.loads(r["gpu_ids"]),
                    "started_at": utc(r["started_at"]),
                    "ended_at": utc(r["ended_at"]),
                    "request": GPURequest.model_validate_json(r["request"])
                    if with_requests
                    else None,
                }
            )
            for r in self.query(sql, args)
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
            records, busy, older = self._kept(
                db,
                (f"record:{recent}", project),
                self._finished_of[project],
                lambda: self._record_of(db, project, recent),
            )
            if busy is None:
                busy, _ = self._busy(db, records)
            stats.recent, stats.fleet_busy, stats.older = list(records), list(busy), older
        return stats

    def _record_of(
        self, db: Conn, project: str, recent: int
    ) -> tuple[list[HistoryRecord], list[float] | None, RecordSummary | None]:
        """The project's `recent` newest finished allocations, the fleet's load when each
        started (None where some started before it was recorded: that reads the others'
        history), and the rest of its record: what changes only when its own history does."""
        records = self.history(project, limit=recent, with_requests=False)
        if not records:
            return [], [], None
        busy, recorded = self._busy(db, records)
        return records, busy if recorded else None, self._older(db, project, records)

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
        The sum named idle_gpu_hours holds hoarded GPU-hours (held idle at the end)."""
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

    def _older(self, db: Conn, project: str, recent: list[HistoryRecord]) -> RecordSummary | None:
        """History beyond the `recent` events, decayed to the end of the oldest of them: the
        project's whole record less the recent events, both decayed to that time."""
        row = db.execute("SELECT * FROM records WHERE project=?", (project,)).fetchone()
        if row is None or row["events"] <= len(recent):
            return None
        at = recent[-1].ended_at.timestamp()
        half_life = self.config.council.record_half_life_days * 24.0
        grow = 2.0 ** ((row["at"] - at) / (half_life * 3600.0))  # from the record's time back
        sums = [grow * row[c] for c in RECORD_SUMS]
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
        gpu, idle_h, budget_h, rated_h, util_h = (max(0.0, x) for x in sums)
        return RecordSummary(
            events=row["events"] - len(recent),
            at=utc(at),
            gpu_hours=gpu,
            idle_gpu_hours=idle_h,
            budget_gpu_hours=budget_h,
            rated_gpu_hours=rated_h,
            util_gpu_hours=util_h,
        )

    def dump(self) -> list[str]:
        """Every row of every table ("table: row"), for tests that prove nothing changed."""
        with self.reading() as db:
            return [
                f"{t}: {r}"
                for t in TABLES
                for r in sorted(repr(tuple(r)) for r in db.execute(f"SELECT * FROM {t}"))
            ]
