"""Creating the ledger's tables and upgrading an older ledger to the current schema
(fleet.ledger.schema), in one transaction."""

from __future__ import annotations

import json

from fleet.errors import StateDirError
from fleet.ledger.project_record import ProjectRecord
from fleet.ledger.schema import (
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    V2,
    V3,
    V4,
    V4_COLUMNS,
    V5,
    V6,
    V7,
    V8,
    V9_COLUMNS,
    V10_COLUMNS,
    V11_COLUMNS,
)
from fleet.ledger.threads import JOB
from fleet.models import ReleaseReason
from fleet.sql import Conn


class Migrations(ProjectRecord):
    """The schema's versions, applied in order."""

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
                self._create(db, SCHEMA + V2 + V3 + V4 + V5 + V6 + V7 + V8)
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
                self._add_columns(db, V4_COLUMNS)
                self._recount_hoarding(db)
            if version < 5:
                self._create(db, V5)
            if version < 6:
                self._create(db, V6)
            if version < 7:
                self._create(db, V7)
            if version < 8:
                self._create(db, V8)
                self._claim_submitted(db)
            if version < 9:
                self._add_columns(db, V9_COLUMNS)
            if version < 10:
                self._add_columns(db, V10_COLUMNS)
            if version < 11:
                self._add_columns(db, V11_COLUMNS)
            if version < SCHEMA_VERSION:
                db.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                )

    def _add_columns(self, db: Conn, columns: dict[str, list[str]]) -> None:
        """The columns a version added, where the table lacks them (a table created since
        has them)."""
        for table, added in columns.items():
            for column in added:
                if column.split()[0] not in self.db.columns(db, table):
                    db.execute(self.db.schema(f"ALTER TABLE {table} ADD COLUMN {column}"))

    def _claim_submitted(self, db: Conn) -> None:
        """Threads submitted before version 8 and not done are claimed by their jobs, as
        submit claims them now, so that no `request --thread-id` runs one beside its worker.
        Only the request's id is read: a request today's model would refuse (a bound added
        since) is still its job's."""
        for r in db.execute(
            "SELECT thread_id, request, submitted_at FROM jobs WHERE state != 'done'"
        ).fetchall():
            try:
                request_id = str(json.loads(r["request"])["request_id"])
            except (ValueError, TypeError, KeyError):
                continue  # unreadable: the worker that claims it finds it invalid
            db.execute(
                "INSERT INTO threads (thread_id, owner, request_id, at) VALUES (?, ?, ?, ?)",
                (r["thread_id"], JOB, request_id, r["submitted_at"]),
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
