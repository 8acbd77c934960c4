"""What `gpu-agent run` says of an allocation's work: a command runs on it, or it exited.

The monitor reads it at every tick (fleet.monitoring.IdlePolicy): while a command runs, an
idle spell is a pause; once it has exited, the work is done and idle time is hoarding. Nothing
else is evidence that the work is done. A command whose `run` process has died counts as
unknown, so a killed supervisor never shields an allocation from idle release: on this host
its PID says so at once; from another host, its beats (every `heartbeat_seconds` of wall
clock while it supervises the command) stopping for `heartbeat_stale_seconds` do.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from fleet.ledger import Ledger
from fleet.ledger.rows import Lease
from fleet.monitoring import Work
from fleet.monitors import gone_here, seen_from_here


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
            "INSERT INTO commands (allocation_id, owner, started_at, beat_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (allocation_id) DO UPDATE SET "
            "owner=excluded.owner, started_at=excluded.started_at, ended_at=NULL, "
            "exit_code=NULL, beat_at=excluded.beat_at",
            (allocation_id, owner, at, time.time()),
        )

    @contextlib.contextmanager
    def beating(self, allocation_id: str, owner: str, period: float) -> Iterator[None]:
        """While inside: `owner` says every `period` wall seconds, from a thread of its own
        (so that a stop's grace does not silence it), that it still supervises the command."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(period):
                with contextlib.suppress(Exception):  # the database went away: the next one
                    self.ledger.db.liveness(
                        "UPDATE commands SET beat_at=? WHERE allocation_id=? AND owner=?",
                        (time.time(), allocation_id, owner),
                    )

        thread = threading.Thread(target=beat, name="gpu-agent-run-beat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def ended(self, allocation_id: str, at: float, exit_code: int | None) -> None:
        """The command exited by itself: the allocation's work is done."""
        self._write(
            "UPDATE commands SET ended_at=?, exit_code=? WHERE allocation_id=? "
            "AND ended_at IS NULL",
            (at, exit_code, allocation_id),
        )


def run_lives(lease: Lease, stale_s: float) -> bool:
    """The `run` in charge of the lease's command has not exited (the command may run on):
    on this host, while its process lives; elsewhere, while it beat within `stale_s` wall
    seconds (a run from before the beats never did: its host's monitor ends what it left)."""
    owner = lease.command_owner
    if owner is None or lease.command_ended_at is not None:
        return False
    if seen_from_here(owner):
        return not gone_here(owner)
    return lease.command_beat_at is not None and time.time() - lease.command_beat_at <= stale_s


def work(lease: Lease, stale_s: float) -> Work:
    """What the lease's command says of the work (the monitor reads it with the lease)."""
    if lease.command_owner is None:
        return "unknown"
    if lease.command_ended_at is not None:
        return "done"
    return "running" if run_lives(lease, stale_s) else "unknown"
