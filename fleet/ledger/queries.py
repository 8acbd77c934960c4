"""Read-only views of the ledger for status, metrics and the tests."""

from __future__ import annotations

from fleet.errors import InvalidInput
from fleet.ledger.rows import ROW, Lease, LedgerRow, read_row
from fleet.ledger.schema import TABLES
from fleet.ledger.store import Store
from fleet.models import ReleaseReason


class Queries(Store):
    """Allocations, leases, holders and counts as they stand."""

    def lease(self, aid: str) -> Lease:
        rows = self.query(
            "SELECT a.state, a.deadline, a.deadline_reason, a.released_at, "
            "a.release_reason, c.owner, c.ended_at, a.lease_end, a.renew_hours, "
            "a.started_at + a.hours * 3600.0, c.beat_at "
            "FROM allocations a "
            "LEFT JOIN commands c ON c.allocation_id = a.id WHERE a.id=?",
            (aid,),
        )
        if not rows:
            raise InvalidInput(f"no allocation {aid!r}")
        (
            state,
            deadline,
            deadline_reason,
            released_at,
            release_reason,
            owner,
            ended,
            lease_end,
            renew_hours,
            asked_end,
            beat_at,
        ) = rows[0]
        return Lease(
            state,
            deadline,
            ReleaseReason(deadline_reason) if deadline_reason else None,
            released_at,
            ReleaseReason(release_reason) if release_reason else None,
            owner,
            ended,
            lease_end,
            renew_hours,
            asked_end,
            beat_at,
        )

    def allocations(self, state: str | None = None) -> list[LedgerRow]:
        if state is None:
            rows = self.query(f"{ROW} ORDER BY enqueued_at, id")
        else:
            rows = self.query(f"{ROW} WHERE state=? ORDER BY enqueued_at, id", (state,))
        return [read_row(r) for r in rows]

    def live(self) -> list[LedgerRow]:
        """Queued and active allocations, oldest first."""
        return [
            read_row(r)
            for r in self.query(
                f"{ROW} WHERE state IN ('queued', 'active') ORDER BY enqueued_at, id"
            )
        ]

    def live_on(self, thread_id: str) -> list[tuple[str, str]]:
        """(id, project) of the queued and active allocations a thread placed: what deleting
        the thread would orphan."""
        return [
            (r[0], r[1])
            for r in self.query(
                "SELECT id, project FROM allocations WHERE thread_id=? "
                "AND state IN ('queued', 'active') ORDER BY enqueued_at, id",
                (thread_id,),
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

    def holding(self, gpu_ids: list[str]) -> dict[str, str]:
        """GPU uuid -> the allocation id holding it, for those of `gpu_ids` that are held: one
        allocation's GPUs without reading every hold in the fleet (a release asks this)."""
        if not gpu_ids:
            return {}
        marks = ",".join("?" * len(gpu_ids))
        return {
            r["gpu_uuid"]: r["allocation_id"]
            for r in self.query(
                f"SELECT gpu_uuid, allocation_id FROM holds WHERE gpu_uuid IN ({marks})",
                tuple(gpu_ids),
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

    def dump(self) -> list[str]:
        """Every row of every table ("table: row"), for tests that prove nothing changed."""
        with self.reading() as db:
            return [
                f"{t}: {r}"
                for t in TABLES
                for r in sorted(repr(tuple(r)) for r in db.execute(f"SELECT * FROM {t}"))
            ]
