"""What one connection keeps of the ledger between reads, so that placement does not read
the same rows at every decision: held GPUs, the lines, the running allocations and values
derived from them. Kept while no other connection has committed (SQLite's data_version) and
updated as this connection changes them; nothing is kept on PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from fleet.backfill import Ending
from fleet.budget import Active
from fleet.config import FleetConfig
from fleet.ledger.store import Store
from fleet.maxmin import levels, service
from fleet.models import GPUInfo, Priority
from fleet.placement import Ticket
from fleet.sql import Conn

T = TypeVar("T")

PRIORITIES = {p.value: p for p in Priority}  # a dict read is many times faster than Priority(v)

TICKET = "id, project, gpu_type, count, priority, enqueued_at, heartbeat_at, hours, resumes"


def ticket_of(r: Any) -> Ticket:
    """A queued allocation as placement sees it, from a row that starts with TICKET."""
    aid, project, gpu_type, count, priority, enqueued, beat, hours, resumes = tuple(r)[:9]
    return Ticket(
        aid,
        project,
        gpu_type,
        count,
        PRIORITIES[priority],
        enqueued,
        beat,
        hours,
        resumes is not None,
    )


@dataclass(frozen=True)
class Running:
    """An active allocation as the ledger keeps it between reads (Ledger._running)."""

    project: str
    gpu_type: str
    gpu_ids: str  # as stored (JSON): decoded where needed
    active: Active


class Runs:
    """The active allocations by GPU type and by project, each by id."""

    def __init__(self) -> None:
        self.of_type: dict[str, dict[str, Running]] = {}
        self.of_project: dict[str, dict[str, Running]] = {}
        self.changes: Counter[str] = Counter()  # per type: what is derived from it is stale
        self.endings: dict[str, tuple[int, list[Ending]]] = {}  # Ledger._endings, per type

    def put(self, run: Running) -> None:
        self.of_type.setdefault(run.gpu_type, {})[run.active.id] = run
        self.of_project.setdefault(run.project, {})[run.active.id] = run
        self.changes[run.gpu_type] += 1

    def drop(self, aid: str, gpu_type: str, project: str) -> None:
        self.of_type.get(gpu_type, {}).pop(aid, None)
        self.of_project.get(project, {}).pop(aid, None)
        self.changes[gpu_type] += 1


RUNNING = "project, gpu_type, gpu_ids, id, price_per_hour, count, started_at, lease_end, deadline"


def run_of(r: Any) -> Running:
    """An active allocation from a row that starts with RUNNING."""
    project, gpu_type, gpu_ids, aid, price, count, started, lease_end, deadline = tuple(r)[:9]
    return Running(
        project,
        gpu_type,
        gpu_ids,
        Active(aid, price * count / 3600.0, started, lease_end, deadline),
    )


class Kept(Store):
    """The ledger's connection and what it keeps between reads."""

    def __init__(self, path: str | Path, config: FleetConfig, *, durable: bool = True) -> None:
        super().__init__(path, config, durable=durable)
        self._types: tuple[list[GPUInfo], dict[str, list[GPUInfo]]] | None = None
        # per type, for the inventory list it was built from: its GPUs, and how many of them
        # each active allocation holds (see Placing._endings)
        self._usable_of: tuple[list[GPUInfo], dict[str, tuple[set[str], dict[str, int]]]] | None = (
            None
        )
        # GPU type -> held GPU uuids, valid while no other connection has committed
        # (SQLite's data_version); this connection's own changes update it as they are made.
        self._held: dict[str, set[str]] = {}
        # GPU type -> its queued requests as tickets, in the order the table stores them;
        # kept the same way (placement reads the whole line of a type at every decision)
        self._queues: dict[str, dict[str, Ticket]] = {}
        self._runs: Runs | None = None  # the active allocations, kept the same way
        self._window: list[tuple[float, str, float]] | None = None  # see Budgets._newest
        self._free_of: dict[str, tuple[list[GPUInfo], set[str], list[GPUInfo]]] = {}
        self._remaining: dict[tuple[str, bool], tuple[tuple[int | None, int], float | None]] = {}
        self._factors: dict[str, tuple[tuple[int | None, int], float]] = {}  # likewise
        # allocations this connection moved to history, in all and per project (where it
        # also counts a history it corrected, see Releasing.resume)
        self._finished = 0
        self._finished_of: Counter[str] = Counter()
        self._kept_values: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}
        self._version: int | None = None
        # released allocation -> effective hours its work received (fleet.maxmin), its
        # own and those it resumed: a released allocation's never changes
        self._served_of: dict[str, float] = {}

    def _rolled_back(self) -> None:
        self._version = None  # what is kept may hold changes just undone: read again
        self._kept_values.clear()

    def _fresh(self, db: Conn) -> bool:
        """Whether what this connection keeps up to date (held GPUs, the lines, the running
        allocations, the fleet's newest shares) may be kept: all of it is dropped when
        another connection has committed since (SQLite's data_version; PostgreSQL has none,
        so nothing is kept there)."""
        version = self.db.data_version(db)
        if version is None or version != self._version:
            self._held.clear()
            self._queues.clear()
            self._runs = self._window = None
            self._version = version
        return version is not None

    def _held_of(self, db: Conn, gpu_type: str) -> set[str]:
        """The held GPUs of a type, read once and then kept up to date (see __init__)."""
        fresh = self._fresh(db)
        held = self._held.get(gpu_type)
        if held is None:
            held = {
                r[0]
                for r in db.execute(
                    "SELECT h.gpu_uuid FROM holds h JOIN allocations a ON a.id = h.allocation_id "
                    "WHERE a.gpu_type=?",
                    (gpu_type,),
                )
            }
            if fresh:
                self._held[gpu_type] = held
        return held

    def _free(self, db: Conn, gpu_type: str, inventory: list[GPUInfo]) -> list[GPUInfo]:
        """The type's GPUs in `inventory` nobody holds, kept while the inventory list and the
        held set are the same objects (placement and release drop it when they change the
        set; callers do not change the list)."""
        held = self._held_of(db, gpu_type)
        kept = self._free_of.get(gpu_type)
        if kept is not None and kept[0] is inventory and kept[1] is held:
            return kept[2]
        free = [g for g in self._of_type(inventory, gpu_type) if g.uuid not in held]
        self._free_of[gpu_type] = (inventory, held, free)
        return free

    def _of_type(self, inventory: list[GPUInfo], gpu_type: str) -> list[GPUInfo]:
        """The inventory's GPUs of one type (indexed once per inventory list)."""
        if self._types is None or self._types[0] is not inventory:
            by_type: dict[str, list[GPUInfo]] = {}
            for g in inventory:
                by_type.setdefault(g.gpu_type, []).append(g)
            self._types = (inventory, by_type)
        return self._types[1].get(gpu_type, [])

    def _queued(self, db: Conn, gpu_type: str) -> dict[str, Ticket]:
        """The type's queued requests by id, in the table's order, read once and then kept up
        to date as the held GPUs are (_track)."""
        fresh = self._fresh(db)
        queue = self._queues.get(gpu_type)
        if queue is None:
            queue = {
                r[0]: self._served_ticket(db, r)
                for r in db.execute(
                    f"SELECT {TICKET} FROM allocations WHERE state='queued' AND gpu_type=?",
                    (gpu_type,),
                )
            }
            if fresh:
                self._queues[gpu_type] = queue
        return queue

    def _track(self, db: Conn, aid: str) -> None:
        """This connection changed allocation `aid`: what is kept of it follows (in the kept
        line an update keeps its place, a new request goes last, as in the table)."""
        if not self._queues and self._runs is None:
            return
        r = db.execute(
            f"SELECT {TICKET}, state, {RUNNING} FROM allocations WHERE id=?", (aid,)
        ).fetchone()
        if r is None:
            return
        queue = self._queues.get(r["gpu_type"])  # None: not kept, read whole when next asked
        if queue is not None and r["state"] == "queued":
            queue[aid] = self._served_ticket(db, r)
        elif queue is not None:
            queue.pop(aid, None)
        if self._runs is not None and r["state"] == "active":
            self._runs.put(run_of(tuple(r)[10:]))
        elif self._runs is not None:
            self._runs.drop(aid, r["gpu_type"], r["project"])

    def _served_ticket(self, db: Conn, r: Any) -> Ticket:
        """ticket_of(r), with the service its work received where lines level (fleet.maxmin)."""
        ticket = ticket_of(r)
        resumes = tuple(r)[8]
        if not levels(self.config) or resumes is None:
            return ticket
        return replace(ticket, attained=self._served(db, resumes))

    def _served(self, db: Conn, aid: str | None) -> float:
        """Effective hours (fleet.maxmin) the work of allocation `aid` received: what it
        held, and what the allocations it resumed held, each at its speed on its type."""
        chain: list[tuple[str, Any]] = []
        while aid is not None and aid not in self._served_of and len(chain) < 10_000:
            r = db.execute(
                "SELECT resumes, gpu_type, started_at, released_at, state, request, count "
                "FROM allocations WHERE id=?",
                (aid,),
            ).fetchone()
            if r is None:
                break
            chain.append((aid, r))
            aid = r[0]
        total = self._served_of.get(aid, 0.0) if aid is not None else 0.0
        for link, (_, gpu_type, started, released, state, request, count) in reversed(chain):
            if started is not None and released is not None:
                workload = json.loads(request).get("workload")
                total += service(released - started, gpu_type, count, self.config, workload)
            if state == "released":
                self._served_of[link] = total
        return total

    def _running(self, db: Conn) -> Runs | None:
        """The active allocations, read once and then kept up to date as the held GPUs are;
        None where nothing is kept (PostgreSQL): the caller asks the database."""
        if not self._fresh(db):
            return None
        if self._runs is None:
            self._runs = Runs()
            for r in db.execute(f"SELECT {RUNNING} FROM allocations WHERE state='active'"):
                self._runs.put(run_of(r))
        return self._runs

    def _actives(self, db: Conn, project: str) -> list[Active]:
        """The project's active allocations, by id."""
        runs = self._running(db)
        if runs is not None:
            return [r.active for _, r in sorted(runs.of_project.get(project, {}).items())]
        return [
            run_of(r).active
            for r in db.execute(
                f"SELECT {RUNNING} FROM allocations WHERE state='active' AND project=? ORDER BY id",
                (project,),
            )
        ]

    def _follow(
        self, db: Conn, key: tuple[str, str], generation: int, update: Callable[[T], T]
    ) -> None:
        """This connection just changed what the value kept under `key` is computed from, as
        one step of `generation`: the value follows (`update` of the value kept at the step
        before) instead of being computed again at the next read, if no other connection
        has committed since it was kept."""
        version = self.db.data_version(db)
        kept = self._kept_values.get(key)
        if version is not None and kept is not None and kept[0] == (version, generation - 1):
            self._kept_values[key] = ((version, generation), update(kept[1]))

    def _kept(self, db: Conn, key: tuple[str, str], generation: int, compute: Callable[[], T]) -> T:
        """`compute()`, kept under `key` while `generation` (a count of this connection's
        changes to what it reads) stays and no other connection commits (never on
        PostgreSQL, which has no data_version)."""
        version = self.db.data_version(db)
        kept = self._kept_values.get(key)
        if version is not None and kept is not None and kept[0] == (version, generation):
            return cast(T, kept[1])
        value = compute()
        if version is not None:
            self._kept_values[key] = ((version, generation), value)
        return value
