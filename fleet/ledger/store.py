"""The ledger's connection: its transactions and one-statement queries, and the plain reads
every part of the ledger makes (an allocation, a project's budget and spend, the usage that
fair share reads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.ledger.rows import ROW, LedgerRow, read_row
from fleet.scheduler import decayed
from fleet.sql import Conn, Database, open_database


class Store:
    """One connection to the ledger's database (fleet.sql), with the fleet it accounts for."""

    def __init__(self, path: str | Path, config: FleetConfig, *, durable: bool = True) -> None:
        self.db: Database = open_database(path, durable=durable)
        self.name = self.db.name
        self.config = config
        self._writes = 0  # this connection's write transactions, begun and ended (x2)

    def stamp(self) -> tuple[int, int] | None:
        """What changes when anything this connection reads may have: another connection's
        commit (SQLite's data_version) or a write of its own; None on PostgreSQL (no
        data_version: every read may have changed)."""
        version = self.db.version()
        return None if version is None else (version, self._writes)

    @property
    def postgres(self) -> bool:
        return self.db.dialect == "postgresql"

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _begin(self, tx: AbstractContextManager[Conn], write: bool = True) -> Iterator[Conn]:
        self._writes += write  # what was kept before a write of ours is kept no longer
        try:
            with tx as db:
                yield db
            self._writes += write
        except BaseException:
            self._writes += write
            self._rolled_back()
            raise

    def _rolled_back(self) -> None:
        """A transaction of this connection was undone: what it keeps (fleet.ledger.kept)
        may hold the changes it made."""

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
        """One read statement outside a transaction (a statement is consistent by itself)."""
        return self.db.rows(sql, args)

    def _get(self, db: Conn, aid: str) -> LedgerRow | None:
        r = db.execute(f"{ROW} WHERE id=?", (aid,)).fetchone()
        return read_row(r) if r else None

    def get(self, aid: str) -> LedgerRow:
        rows = self.query(f"{ROW} WHERE id=?", (aid,))
        if not rows:
            raise InvalidInput(f"no allocation {aid!r}")
        return read_row(rows[0])

    def _budget(self, db: Conn, project: str) -> float | None:
        row = db.execute("SELECT budget_usd FROM budgets WHERE project=?", (project,)).fetchone()
        return float(row["budget_usd"]) if row else self.config.budgets.get(project)

    def _spent(self, db: Conn, project: str) -> float:
        """The sum of the project's charges, kept beside them in the same transactions."""
        row = db.execute("SELECT usd FROM spend WHERE project=?", (project,)).fetchone()
        return float(row["usd"]) if row else 0.0

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
