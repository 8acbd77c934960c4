"""Who monitors each live allocation, and whether that process is still alive.

A live allocation (queued or active) needs a process that runs its thread: the monitor that
enforces idle release, the lease and the budget, or the wait that places a queued request.
That process (the CLI after `request` or `resume`, a worker, the web page, a Python program)
claims the allocation's row in `monitors` and beats on it from a background thread every
`heartbeat_seconds` of wall-clock time. No row, a row whose beat is older than
`heartbeat_stale_seconds`, or a row of a process on this host that has exited (seen at once,
without waiting for the beats to go stale) means nobody monitors the allocation: `status`,
the page and the metrics say so, and a worker or `gpu-agent resume` adopts it by claiming the
row (a claim wins only over a dead or absent monitor, so two adopters never both run it).

Beats are wall-clock seconds on purpose: a process is alive or not in real time, whatever a
scaled or virtual clock says about the allocation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.ledger import Ledger
from fleet.ledger.rows import LedgerRow
from fleet.sql import Conn

# How a process that monitors says what it is, for `status` ("cli", "worker", "page", ...).
KINDS = ("cli", "worker", "page", "server", "python")


@dataclass(frozen=True)
class Watcher:
    """A monitor's row: which process, what kind, when it last beat (wall clock)."""

    allocation_id: str
    owner: str
    kind: str
    beat_at: float
    since: float

    def describe(self, now: float) -> str:
        return f"{describe_owner(self.owner)}, beat {max(0.0, now - self.beat_at):.0f} s ago"

    def gone_here(self) -> bool:
        """Its process ran on this host and has exited: dead without waiting for the beats to
        go stale. (A reused PID only makes us wait for staleness, never adopt a live one.)"""
        return gone_here(self.owner)


def describe_owner(owner: str) -> str:
    """new_owner's name as people read it: "cli pid 123 on host"."""
    host, pid = [*owner.split(":"), "", ""][:2]
    host = host.split("@", 1)[0]  # without its PID namespace (this_host)
    return f"{owner.rsplit(':', 1)[-1]} pid {pid} on {host}"


@functools.cache
def this_host() -> str:
    """This host's name and PID namespace (name@inode), read once (the monitor asks at every
    tick). A PID says which process it is only in its own namespace: containers that share a
    host name (a Kubernetes pod's) and a state directory but not their PIDs must not judge
    each other's processes by PID (gone_here), only by their beats."""
    try:
        namespace = f"@{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: the host's name alone
        namespace = ""
    return socket.gethostname() + namespace


def seen_from_here(owner: str) -> bool:
    """The process named by `owner` ran on this host, in this PID namespace: whether it lives
    can be seen (gone_here); elsewhere only what it writes says so."""
    return owner.split(":", 1)[0] == this_host()


def gone_here(owner: str) -> bool:
    """The process named by `owner` (new_owner's host:pid:...) ran on this host, in this PID
    namespace, and exited. (An owner written before namespaces were named never is: its
    beats decide.)"""
    pid = [*owner.split(":"), ""][1]
    if not seen_from_here(owner) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@dataclass(frozen=True)
class Orphan:
    """A live allocation nobody monitors: never claimed, or its monitor went quiet."""

    row: LedgerRow
    last: Watcher | None  # the monitor that stopped beating (None: none, or it let go)
    checkpointed: bool = True  # its thread can be resumed (adopted)

    def describe(self, now: float) -> str:
        if self.last is None:
            return "no process monitors it"
        return f"its monitor ({self.last.describe(now)}) stopped beating"


def of_this_process(owner: str) -> bool:
    """`owner` names this very process (new_owner's host:pid:...)."""
    return seen_from_here(owner) and [*owner.split(":"), ""][1] == str(os.getpid())


def new_owner(kind: str) -> str:
    """A unique name for one monitoring process (or one Orchestrator in it)."""
    return f"{this_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{kind}"


def _watcher(r: Any) -> Watcher:
    owner = str(r[1])
    return Watcher(str(r[0]), owner, owner.rsplit(":", 1)[-1], float(r[2]), float(r[3]))


WATCHER = "SELECT allocation_id, owner, beat_at, since FROM monitors"


class Monitors:
    """The `monitors` table of a ledger's database."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.stale_seconds = ledger.config.monitor.heartbeat_stale_seconds

    def _one(self, sql: str, args: tuple[object, ...], db: Conn | None = None) -> int:
        """One statement, in `db`'s transaction or else outside one (atomic by itself); the
        rows it changed."""
        if db is not None:
            return int(db.execute(sql, args).rowcount)
        with self.ledger.db.lock:
            return int(self.ledger.db.conn().execute(sql, args).rowcount)

    def claim(
        self, allocation_id: str, owner: str, now: float | None = None, db: Conn | None = None
    ) -> Watcher | None:
        """Become the allocation's monitor: wins when nobody monitors it, its monitor is
        stale, or it is ours already. None when won, else the live monitor that holds it.
        One statement, so two claimers at once cannot both win; in `db`'s transaction when
        given (a placement's: the claim commits with it, or neither does)."""
        now = time.time() if now is None else now
        won = self._one(
            "INSERT INTO monitors (allocation_id, owner, beat_at, since) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (allocation_id) DO UPDATE SET owner=excluded.owner, "
            "beat_at=excluded.beat_at, since=excluded.since "
            "WHERE monitors.owner=excluded.owner OR monitors.beat_at<?",
            (allocation_id, owner, now, now, now - self.stale_seconds),
            db,
        )
        if won:
            return None
        holder = self.get(allocation_id, db)
        if (
            holder is not None
            and holder.gone_here()
            and self._one(
                "UPDATE monitors SET owner=?, beat_at=?, since=? WHERE allocation_id=? AND owner=?",
                (owner, now, now, allocation_id, holder.owner),
                db,
            )
        ):
            return None
        return self.get(allocation_id, db) if holder is not None else None

    def beat(self, owner: str, allocation_ids: set[str], now: float | None = None) -> set[str]:
        """Say `owner` is alive for its allocations; those it no longer holds (another process
        adopted them after this one went quiet too long, or its claim was undone with the
        transaction it joined). A released allocation's row went with its release
        (Ledger._close): it ended, nobody adopted it, so it is not among them."""
        if not allocation_ids:
            return set()
        now = time.time() if now is None else now
        self.ledger.db.liveness("UPDATE monitors SET beat_at=? WHERE owner=?", (now, owner))
        held = {
            str(r[0])
            for r in self.ledger.query("SELECT allocation_id FROM monitors WHERE owner=?", (owner,))
        }
        missing = sorted(allocation_ids - held)
        if not missing:
            return set()
        marks = ",".join("?" * len(missing))
        ended = {
            str(r[0])
            for r in self.ledger.query(
                f"SELECT id FROM allocations WHERE state='released' AND id IN ({marks})",
                tuple(missing),
            )
        }
        return set(missing) - ended

    def drop(self, allocation_id: str, owner: str) -> None:
        """Stop monitoring (the thread ended, or stopped before its allocation did). A drop
        that a power failure loses (fleet.sql.Database.liveness) leaves the row of a process
        that died with it: adopters take it over as they do any dead monitor's."""
        self.ledger.db.liveness(
            "DELETE FROM monitors WHERE allocation_id=? AND owner=?", (allocation_id, owner)
        )

    def get(self, allocation_id: str, db: Conn | None = None) -> Watcher | None:
        sql, args = f"{WATCHER} WHERE allocation_id=?", (allocation_id,)
        rows = self.ledger.query(sql, args) if db is None else db.execute(sql, args).fetchall()
        return _watcher(rows[0]) if rows else None

    def watchers(self) -> dict[str, Watcher]:
        return {w.allocation_id: w for w in map(_watcher, self.ledger.query(WATCHER))}

    def alive(self, watcher: Watcher | None, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return (
            watcher is not None
            and watcher.beat_at >= now - self.stale_seconds
            and not watcher.gone_here()
        )

    def orphans(
        self, now: float | None = None, rows: list[LedgerRow] | None = None
    ) -> list[Orphan]:
        """Live allocations (queued or active; or those of `rows`, already read) whose
        monitor is absent, stale or dead, oldest first."""
        now = time.time() if now is None else now
        watchers = self.watchers()
        return [
            Orphan(row, watchers.get(row.id))
            for row in (self.ledger.live() if rows is None else rows)
            if not self.alive(watchers.get(row.id), now)
        ]


class Heartbeat:
    """One process's beats: a daemon thread that beats for the allocations this process
    monitors, every `period` seconds while there are any. `lost` hears of an allocation that
    another process adopted (this one was silent too long): its monitor should stop."""

    def __init__(
        self,
        monitors: Monitors,
        kind: str,
        period: float,
        lost: Callable[[str], None] | None = None,
    ) -> None:
        self.monitors = monitors
        self.owner = new_owner(kind)
        self.period = period
        self._lost = lost
        self._held: set[str] = set()
        self._gone: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def claim(self, allocation_id: str, db: Conn | None = None) -> Watcher | None:
        """Monitor this allocation from now on: None, or the live monitor that holds it. In
        `db`'s transaction when given: where it is undone, the next beat finds the claim lost."""
        holder = self.monitors.claim(allocation_id, self.owner, db=db)
        if holder is None:
            with self._lock:
                self._held.add(allocation_id)
                self._gone.discard(allocation_id)
                self._start()
        return holder

    def release(self, allocation_id: str) -> None:
        with self._lock:
            self._held.discard(allocation_id)
        self.monitors.drop(allocation_id, self.owner)

    def holds(self, allocation_id: str) -> bool:
        """False once another process adopted it (see `lost`)."""
        with self._lock:
            return allocation_id not in self._gone

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._run, name="gpu-agent-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                held = set(self._held)
            try:
                lost = self.monitors.beat(self.owner, held)
            except Exception:  # the database went away for a moment: beat at the next one
                lost = set()
            for aid in lost:
                with self._lock:
                    self._held.discard(aid)
                    self._gone.add(aid)
                if self._lost is not None:
                    self._lost(aid)
            self._wake.wait(self.period)
            self._wake.clear()

    def close(self) -> None:
        """Stop beating and give up every claim (their threads are not running any more)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            held, self._held = set(self._held), set()
        for aid in held:
            with contextlib.suppress(Exception):  # a broken database: the beats stop anyway
                self.monitors.drop(aid, self.owner)
