"""The speed the ledger's times run at (`[clock] time_scale`), recorded in the ledger itself.

Leases, job leases and history are timestamps on the clock that wrote them. Read on a clock of
another speed they are wrong: a sped-up clock reads wall-clock leases as long expired (a start
reconciles them as expired-while-down), the wall clock reads a sped-up clock's as years away.
So the scale lives beside what it times, in the ledger's `meta` table: every process sharing
the ledger (a PostgreSQL one on many hosts too) reads it and agrees, or is refused. The first
opening records it, and it binds from then on, also while the ledger holds nothing yet: a
process at another speed may be running on it already (a server on an empty ledger).
"""

from __future__ import annotations

from fleet.errors import StateDirError
from fleet.ledger.store import Store
from fleet.sql import Conn

KEY = "time_scale"
SCALE = f"SELECT value FROM meta WHERE key='{KEY}'"


def _said(scale: float) -> str:
    """A scale as the refusal names it."""
    return "time_scale 1 (the wall clock)" if scale == 1 else f"time_scale {scale:g}"


def _with(scale: float) -> str:
    """What the fleet file must say to open the ledger at the speed its times were kept."""
    return "no [clock] time_scale" if scale == 1 else f"[clock] time_scale = {scale:g}"


class TimeScale(Store):
    """Recording and checking the time scale."""

    def keep_time_scale(self, scale: float, before: float | None) -> None:
        """Record `scale` as this ledger's at its first opening, or refuse (StateDirError,
        nothing written) where it runs at another. `before`: the scale a ledger that records
        none ran at, where that can be told (one from before the scale was recorded;
        fleet.statedir.scale_before); None: not known, and the first opening's scale is
        taken, as before the scale was recorded. Read first without a lock (every start does
        it, mostly to find it agrees), then settled in one transaction that takes every
        writer's lock, so that of two processes opening it at once the second sees the first's."""
        if [float(v) for (v,) in self.query(SCALE)] == [scale]:
            return
        with self.transaction() as db:
            row = db.execute(SCALE).fetchone()
            if row is not None:
                ran = float(row["value"])
            elif before is not None and _holds_times(db):
                ran = before
            else:
                ran = scale
            if ran != scale:
                raise StateDirError(
                    f"ledger {self.name} ran at {_said(ran)}, not at {_said(scale)}: read at "
                    "another speed its leases would end at the wrong times. Open it with the "
                    f"fleet file it ran with ({_with(ran)}), or use a new --state-dir or "
                    "--database"
                )
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (KEY, repr(float(scale))))


def _holds_times(db: Conn) -> bool:
    """Anything timed on the ledger's clock: an allocation (live or history) or a job."""
    return any(
        db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
        for table in ("allocations", "jobs")
    )
