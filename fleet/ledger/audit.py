"""The audit log: who placed, approved, released or budgeted what, written once per key."""

from __future__ import annotations

from fleet.ledger.rows import AUDIT, AuditEntry
from fleet.ledger.store import Store


class Audit(Store):
    """Appending to and reading the audit log."""

    def audit(self, entry: AuditEntry) -> None:
        """Append to the audit log (once per key). One statement: atomic by itself."""
        with self.db.lock:
            self.db.conn().execute(AUDIT, entry.row())

    def claim(self, entry: AuditEntry) -> tuple[bool, AuditEntry]:
        """Append `entry` unless its key is taken: (whether it was, the entry that holds the
        key). Two approvers deciding one review at once: exactly one claim wins."""
        with self.db.lock:
            won = self.db.conn().execute(AUDIT, entry.row()).rowcount > 0
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
