"""What `gpu-agent run` says of an allocation's work: a command runs on it, or it exited.

The monitor reads it at every tick (fleet.monitoring.IdlePolicy): while a command runs, an
idle spell is a pause; once it has exited, the work is done and idle time is hoarding. Nothing
else is evidence that the work is done. A command whose `run` process has died on this host
counts as unknown, so a killed supervisor never shields an allocation from idle release.
"""

from __future__ import annotations

from fleet.ledger import Ledger
from fleet.ledger.rows import Lease
from fleet.monitoring import Work
from fleet.monitors import gone_here


class Commands:
    """The `commands` table of a ledger's database: one row per allocation, the latest
    command run on it."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self.ledger.db.lock:
            self.ledger.db.conn().execute(sql, args)

    def started(self, allocation_id: str, owner: str, at: float) -> None:
        """A command started on the allocation under the `run` process `owner`."""
        self._write(
            "INSERT INTO commands (allocation_id, owner, started_at) VALUES (?, ?, ?) "
            "ON CONFLICT (allocation_id) DO UPDATE SET owner=excluded.owner, "
            "started_at=excluded.started_at, ended_at=NULL, exit_code=NULL",
            (allocation_id, owner, at),
        )

    def ended(self, allocation_id: str, at: float, exit_code: int | None) -> None:
        """The command exited by itself: the allocation's work is done."""
        self._write(
            "UPDATE commands SET ended_at=?, exit_code=? WHERE allocation_id=? "
            "AND ended_at IS NULL",
            (at, exit_code, allocation_id),
        )


def work(lease: Lease) -> Work:
    """What the lease's command says of the work (the monitor reads it with the lease)."""
    if lease.command_owner is None:
        return "unknown"
    if lease.command_ended_at is not None:
        return "done"
    return "unknown" if gone_here(lease.command_owner) else "running"
