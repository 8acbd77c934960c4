"""The ledger: the single source of truth for who holds which GPU and what was spent.

SQLite in WAL mode by default, or one PostgreSQL database that workers on many hosts share
(fleet.sql: how each serialises the writers that compete). Guarantees, by schema:
a GPU has at most one hold (primary key), an allocation is charged at most once and written to
history at most once (primary keys), and a thread's request maps to one allocation (unique key).

One class, `Ledger`, over one connection; each of its concerns is a module of this package:
  store           the connection, transactions and plain reads
  kept            what the connection keeps between reads (held GPUs, lines, running)
  budgets         spend, admission's usage factor, deadlines that keep a budget
  project_record  a project's history and record for the council
  releasing       heartbeats, release (charged once), resume, reconcile
  placing         place, queue or deny; when a request could start
  migrations      the schema's versions (schema: its tables)
  audit, health, queries   the audit log, unhealthy GPUs, read-only views
  scheduler_jobs  the Slurm job that holds an allocation's GPUs
  preempting      asking a running allocation to yield (fleet.preemption)
  renewing        the next term of a lease renewed while its GPUs work
  runs            what `gpu-agent run --requeue` outlives its process with; requeued once
  threads         the request each caller-named thread was started for
  time_scale      the clock's speed its times run at, which every process must share
  rows            what the ledger hands out
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fleet.config import FleetConfig
from fleet.errors import StateDirError
from fleet.ledger.audit import Audit
from fleet.ledger.health import Health
from fleet.ledger.levelling import Levelling
from fleet.ledger.migrations import Migrations
from fleet.ledger.queries import Queries
from fleet.ledger.renewing import Renewing
from fleet.ledger.runs import Runs
from fleet.ledger.scheduler_jobs import SchedulerJobs
from fleet.ledger.threads import Threads
from fleet.ledger.time_scale import TimeScale

__all__ = ["Ledger"]


class Ledger(
    Levelling,
    Migrations,
    Audit,
    Health,
    Queries,
    SchedulerJobs,
    Runs,
    Threads,
    Renewing,
    TimeScale,
):
    def __init__(self, path: str | Path, config: FleetConfig, *, durable: bool = True) -> None:
        """`path`: a SQLite file, or a postgresql:// URL. `durable=False` (a simulation's
        scratch ledger, SQLite only): it works in memory and is written to its file when
        closed, and holds the file's lock while open, so no other process reads it
        meanwhile; a run killed before it closes leaves the file as it was."""
        super().__init__(path, config, durable=durable)
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
