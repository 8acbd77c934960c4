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
from dataclasses import dataclass

from fleet.ledger import Ledger
from fleet.ledger.rows import Lease
from fleet.monitoring import Work
from fleet.monitors import gone_here, seen_from_here

KEPT = ("owner", "started_at", "ended_at", "exit_code", "beat_at")  # what unclaim puts back
STARTED = (
    "INSERT INTO commands (allocation_id, owner, started_at, beat_at) "
    "VALUES (?, ?, ?, ?) ON CONFLICT (allocation_id) DO UPDATE SET "
    "owner=excluded.owner, started_at=excluded.started_at, ended_at=NULL, "
    "exit_code=NULL, beat_at=excluded.beat_at"
)


@dataclass(frozen=True)
class Claim:
    """Commands.claim's answer: the living run that holds the allocation's command (None:
    the claim is this one's), and the row as it was (None: none)."""

    holder: str | None
    was: dict[str, object] | None  # KEPT, by name


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
        self._write(STARTED, (allocation_id, owner, at, time.time()))

    def claim(self, allocation_id: str, owner: str, at: float, stale_s: float) -> Claim:
        """`owner` is about to start a command on the allocation (as `started`), unless a
        living run already runs one there: one command at a time, for the monitor reads one
        (fleet.monitoring.IdlePolicy). The claim says which run holds it where refused, and
        what `unclaim` puts back if the command then fails to start."""
        with self.ledger.transaction(f"run:{allocation_id}") as db:
            row = db.execute(
                f"SELECT {', '.join(KEPT)} FROM commands WHERE allocation_id=?", (allocation_id,)
            ).fetchone()
            was = None if row is None else dict(zip(KEPT, row, strict=True))
            if row is not None:
                holder, _, ended_at, _, beat_at = row  # KEPT
                if ended_at is None and lives(str(holder), beat_at, stale_s):
                    return Claim(str(holder), was)
            db.execute(STARTED, (allocation_id, owner, at, time.time()))
        return Claim(None, was)

    def unclaim(self, allocation_id: str, owner: str, claim: Claim) -> None:
        """`owner`'s command never started: the allocation's command is what it was."""
        if claim.was is None:
            self._write(
                "DELETE FROM commands WHERE allocation_id=? AND owner=?", (allocation_id, owner)
            )
            return
        self._write(
            f"UPDATE commands SET {', '.join(f'{k}=?' for k in KEPT)} "
            "WHERE allocation_id=? AND owner=?",
            (*claim.was.values(), allocation_id, owner),
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

    def ended(self, allocation_id: str, owner: str, at: float, exit_code: int | None) -> None:
        """`owner`'s command exited by itself: the allocation's work is done."""
        self._write(
            "UPDATE commands SET ended_at=?, exit_code=? WHERE allocation_id=? AND owner=? "
            "AND ended_at IS NULL",
            (at, exit_code, allocation_id, owner),
        )


def run_lives(lease: Lease, stale_s: float) -> bool:
    """The `run` in charge of the lease's command has not exited (the command may run on):
    on this host, while its process lives; elsewhere, while it beat within `stale_s` wall
    seconds (a run from before the beats never did: its host's monitor ends what it left)."""
    owner = lease.command_owner
    if owner is None or lease.command_ended_at is not None:
        return False
    return lives(owner, lease.command_beat_at, stale_s)


def lives(owner: str, beat_at: float | None, stale_s: float) -> bool:
    """The `run` process `owner` has not exited: on this host, while its process lives;
    elsewhere, while it beat (last at `beat_at`, wall clock) within `stale_s` seconds."""
    if seen_from_here(owner):
        return not gone_here(owner)
    return beat_at is not None and time.time() - beat_at <= stale_s


def work(lease: Lease, stale_s: float) -> Work:
    """What the lease's command says of the work (the monitor reads it with the lease)."""
    if lease.command_owner is None:
        return "unknown"
    if lease.command_ended_at is not None:
        return "done"
    return "running" if run_lives(lease, stale_s) else "unknown"
