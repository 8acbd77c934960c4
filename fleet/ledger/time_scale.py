"""The speed the ledger's times run at (`[clock] time_scale`), recorded in the ledger itself.

Leases, job leases and history are timestamps on the clock that wrote them. Read on a clock of
another speed they are wrong: a sped-up clock reads wall-clock leases as long expired (a start
reconciles them as expired-while-down), the wall clock reads a sped-up clock's as years away.
So the scale lives beside what it times, in the ledger's `meta` table: every process sharing
the ledger (a PostgreSQL one on many hosts too) reads it and agrees, or is refused.
"""

from __future__ import annotations

from fleet.errors import StateDirError
from fleet.ledger.store import Store
from fleet.sql import Conn

KEY = "time_scale"
SCALE = f"SELECT value FROM meta WHERE key='{KEY}'"


def _said(scale: float | None) -> str:
    """A scale as the refusal names it (None: a sped-up clock whose scale was not recorded)."""
    if scale is None:
        return "a time_scale other than 1 (not recorded then)"
    return "time_scale 1 (the wall clock)" if scale == 1 else f"time_scale {scale:g}"


def _with(scale: float | None) -> str:
    """What the fleet file must say to open the ledger at the speed its times were kept."""
    if scale is None:
        return " (a [clock] time_scale other than 1)"
    return " (no [clock] time_scale)" if scale == 1 else f" ([clock] time_scale = {scale:g})"


def agrees(ran: float | None, scale: float) -> bool:
    """Whether times written at `ran` read right at `scale` (None: some scale other than 1)."""
    return scale != 1 if ran is None else ran == scale


class TimeScale(Store):
    """Recording and checking the time scale."""

    def keep_time_scale(self, scale: float, before: float | None) -> None:
        """Record `scale` as this ledger's, or refuse (StateDirError, nothing written) where the
        ledger runs at another and holds times read at it. `before`: the scale a ledger that
        records none ran at (one from before this was recorded; fleet.statedir.scale_before).
        A ledger that holds no allocation and no job has no time to misread: it takes the new
        scale. Read first without a lock (every start does it, mostly to find it agrees),
        then settled in one transaction, so that two processes opening it at once agree."""
        if [float(v) for (v,) in self.query(SCALE)] == [scale]:
            return
        with self.transaction() as db:
            row = db.execute(SCALE).fetchone()
            ran = float(row["value"]) if row else before
            if ran == scale and row is not None:
                return
            if not agrees(ran, scale) and _holds_times(db):
                raise StateDirError(
                    f"ledger {self.name} ran at {_said(ran)}, not at {_said(scale)}: "
                    "read at another speed its leases would end at the wrong "
                    f"times. Open it with the fleet file it ran with{_with(ran)}, or use a "
                    "new --state-dir or --database"
                )
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (KEY, repr(float(scale))),
            )


def _holds_times(db: Conn) -> bool:
    """Anything timed on the ledger's clock: an allocation (live or history) or a job."""
    return any(
        db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
        for table in ("allocations", "jobs")
    )
