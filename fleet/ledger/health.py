"""GPUs out of placement (an XID error, a lost GPU) until an administrator clears them."""

from __future__ import annotations

from fleet.ledger.store import Store


class Health(Store):
    """Marking, listing and clearing unhealthy GPUs."""

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
