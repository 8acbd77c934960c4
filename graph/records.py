"""The ledger's view, without the graph: release, budgets, history, costs, audit, status, jobs.

    with Records(project_dir) as records:
        print(records.costs())

What the everyday commands (`status`, `costs`, `release`, `history`, `audit`, `jobs`,
`budget`, `health`) need is the services over the state directory and who is asking; they
never run a thread, so neither LangGraph nor the checkpointer is opened and they start in a
fraction of a second. The Orchestrator (graph/orchestrator.py) is a Records that also builds
the graph and runs threads.
"""

from __future__ import annotations

import copy
import os
import shlex
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from fleet import left_running, names
from fleet.access import Identity, identify
from fleet.budget import Moved
from fleet.choose_backend import BackendChoice
from fleet.config import FleetConfig
from fleet.errors import InvalidInput, StateDirError
from fleet.jobs import STATES, Job, JobQueue
from fleet.ledger.rows import AuditEntry, LedgerRow, ProjectCost
from fleet.models import CALLER_REASONS, HistoryRecord, Release, ReleaseReason
from fleet.monitors import Monitors, Orphan
from fleet.services import Services, open_services
from fleet.sql import Conn
from fleet.statedir import CHECKPOINTS
from graph.status import fleet_status, scoped

if TYPE_CHECKING:
    from council.voting import Council
    from fleet.clock import Clock
    from fleet.fleet_backend import FleetBackend

# what each argument of Records (and the Orchestrator) must be, and how it is said: one line,
# before anything is opened or created (a clock given as "now" crashed with AttributeError
# after creating the state directory); objects by the methods they are used through
_WANTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "state_dir": (lambda v: v is None or isinstance(v, str | os.PathLike), "a path"),
    "fleet": (
        lambda v: v is None or isinstance(v, str | os.PathLike | FleetConfig),
        "a fleet file's path or a FleetConfig",
    ),
    "backend": (
        lambda v: isinstance(v, str | BackendChoice) or _has(v, "inventory", "reset"),
        "a backend's name, a BackendChoice or a FleetBackend",
    ),
    "clock": (lambda v: v is None or _has(v, "now", "sleep", "token"), "a Clock (fleet.clock)"),
    "council": (lambda v: v is None or _has(v, "decide"), "a Council (council.voting)"),
    "create": (lambda v: isinstance(v, bool), "true or false"),
    "token": (lambda v: v is None or isinstance(v, str), "a token (text)"),
    "identity": (lambda v: v is None or isinstance(v, Identity), "an Identity (fleet.access)"),
    "pool_size": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "a whole number of connections, at least 1",
    ),
}


def _has(value: object, *methods: str) -> bool:
    return all(callable(getattr(value, m, None)) for m in methods)


def check_arguments(**given: object) -> None:
    """InvalidInput in one line for the first argument that is not what it must be."""
    for name, value in given.items():
        if not _WANTED[name][0](value):
            raise _wrong(name, value)


def _wrong(name: str, value: object) -> InvalidInput:
    return InvalidInput(f"{name} must be {_WANTED[name][1]}, not {names.shown(value)}")


def checked_identity(identity: object) -> Identity:
    """`identity` if one may act as it, else InvalidInput in one line: an Identity (None
    names nobody) whose name, role and project an access file could hold (fleet.access), as
    its name is stamped on requests as who asked and written to the audit log."""
    if not isinstance(identity, Identity):
        raise _wrong("identity", identity)
    why = identity.problem()
    if why is not None:
        raise InvalidInput(why)
    return identity


class Records:
    def __init__(
        self,
        state_dir: str | Path | None = None,
        fleet: FleetConfig | str | Path | None = None,
        *,
        backend: str | BackendChoice | FleetBackend = "simulated",
        clock: Clock | None = None,
        council: Council | None = None,
        create: bool = True,
        database: str | None = None,
        token: str | None = None,
        identity: Identity | None = None,
        check_config: Callable[[FleetConfig], None] | None = None,
    ) -> None:
        """Open the services and identify the caller, then set the ledger right for a start:
        allocations whose Slurm job ended meanwhile end as Slurm ended them, leases that ran out
        while nothing ran end, GPU settings a crashed process left are reset, reservations
        (and Slurm jobs) are made to match the ledger. `database`: a postgresql:// URL
        (default: SQLite in the state directory). `token` (default: env GPU_AGENT_TOKEN): who
        is calling, where the state directory has an access file (fleet.access). `identity`:
        one the caller authenticated itself. `check_config`: what must hold of the fleet file
        before anything is opened (open_services' `check`)."""
        check_arguments(
            state_dir=state_dir,
            fleet=fleet,
            backend=backend,
            clock=clock,
            council=council,
            create=create,
            token=token,
            identity=identity,
        )
        if identity is not None:
            checked_identity(identity)
        self.services: Services = open_services(
            state_dir,
            fleet,
            backend=backend,
            clock=clock,
            council=council,
            create=create,
            database=database,
            check=check_config,
        )
        try:
            self.identity = identity or identify(
                self.services.state_dir, token or os.environ.get("GPU_AGENT_TOKEN")
            )
            self.services.actor = self.identity.name
        except BaseException:
            self.services.close()
            raise
        svc = self.services
        svc.reconcile_jobs()  # Slurm jobs that ended while down end their allocations
        left_running.reconcile(svc.ledger, svc.clock.now())  # leases that ran out while down
        held = svc.ledger.holders()  # power limits a crashed process left lowered
        svc.backend.reset([g.uuid for g in svc.gpus if g.uuid not in held])
        svc.reconcile_reservations()  # a crashed worker's placement groups (Ray), Slurm jobs

    def close(self) -> None:
        self.services.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def acting_as(self, identity: Identity) -> Self:
        """This object (same services, and for an Orchestrator the same graph and
        checkpoints) acting as `identity`: what a server that authenticates each request (the
        web page) calls per request. `identity` is checked as the constructor's."""
        checked = checked_identity(identity)
        other = copy.copy(self)
        other.identity = checked
        return other

    # ---- the ledger's view ----------------------------------------------------------------

    def release(
        self, allocation_id: str, reason: ReleaseReason = ReleaseReason.EXPLICIT
    ) -> Release:
        """Release now (or cancel a queued request). A second release returns the first.
        `reason`: one a caller gives (CALLER_REASONS); the others are the monitor's."""
        return self.release_once(allocation_id, reason)[0]

    def release_once(
        self, allocation_id: str, reason: ReleaseReason = ReleaseReason.EXPLICIT
    ) -> tuple[Release, bool]:
        """`release`, and whether this call released it (False: the monitor, the lease or
        another caller had, or did meanwhile: what a caller then reports is theirs)."""
        return self.release_checked(allocation_id, reason)[:2]

    def release_checked(
        self, allocation_id: str, reason: ReleaseReason = ReleaseReason.EXPLICIT
    ) -> tuple[Release, bool, bool]:
        """`release_once`, and whether a `gpu-agent run` that runs a command on it did not
        stop the command in time, or went quiet on another host (Services.release_asked): it
        may still run."""
        names.check("allocation id", allocation_id)
        if reason not in CALLER_REASONS:
            raise InvalidInput(
                f"a release's reason is one of {', '.join(r.value for r in CALLER_REASONS)}, "
                f"not {reason.value if isinstance(reason, ReleaseReason) else names.shown(reason)}"
            )
        reason = ReleaseReason(reason)
        self.identity.check_sees(
            self.services.ledger.get(allocation_id).project, f"no allocation {allocation_id!r}"
        )
        return self.services.release_asked(allocation_id, reason, self.identity.name)

    def set_budget(self, project: str, budget_usd: float) -> list[Moved]:
        """Set a project's budget; returns the allocations whose deadline it moved."""
        self.identity.check_admin("set budgets")
        return self.services.set_budget(project, budget_usd, by=self.identity.name)

    def preempt(self, allocation_id: str, why: str) -> Moved:
        """Ask a running allocation to yield its GPUs after its checkpoint notice (an
        administrator's decision: fleet.preemption); returns its deadline before and after."""
        names.check("allocation id", allocation_id)
        self.identity.check_admin("preempt allocations")
        if not isinstance(why, str) or not why.strip() or "\n" in why:
            raise InvalidInput("--why must be one line saying why the allocation must yield")
        problem = names.text_problem("--why", why.strip())
        if problem is not None:
            raise InvalidInput(problem)
        return self.services.preempt(allocation_id, why.strip(), by=self.identity.name)

    def _visible(self, project: str | None) -> str | None:
        """The project a caller may read (None: all, for an admin who asked for all)."""
        if project is not None:
            names.check("project", project)
            self.identity.check_project(project, "read the records")
            return project
        return self.identity.project if not self.identity.admin else None

    def history(self, project: str | None = None) -> list[HistoryRecord]:
        return self.services.ledger.history(self._visible(project))

    def costs(self) -> list[ProjectCost]:
        mine = self._visible(None)
        return [
            c
            for c in self.services.ledger.costs(self.services.clock.now())
            if mine is None or c.project == mine
        ]

    def audit(self, project: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Who approved, denied, decided, released and set budgets, and why; oldest first
        (the last `limit` entries: a positive whole number, or None for all)."""
        if limit is not None and (type(limit) is not int or limit < 1):
            raise InvalidInput(f"limit must be a whole number of at least 1, not {limit!r}")
        return self.services.ledger.audit_log(self._visible(project), limit)

    def _checkpointed(self, thread_ids: list[str]) -> set[str]:
        """Those of `thread_ids` that have a checkpoint."""
        return checkpointed(self.services, thread_ids)

    def problems(self) -> list[str]:
        """What in the ledger and checkpoints does not add up, each with a way out: live
        allocations on GPUs this fleet lacks (another --fleet or --backend than they were
        placed with), live allocations whose thread has no checkpoint (the checkpoint file
        replaced or its tables lost), which nothing will monitor or release, and live
        allocations no process monitors."""
        known = {g.uuid for g in self.services.gpus}
        live = self._live()
        saved = self._checkpointed([row.thread_id for row in live])
        out = []
        for row in live:
            end = (
                f"`gpu-agent release {row.id}` ends it and charges the time held"
                if row.state == "active"
                else f"`gpu-agent release {row.id}` cancels it"
            )
            missing = [g for g in row.gpu_ids if g not in known]
            if missing:
                out.append(
                    f"allocation {row.id} ({row.project}) holds {', '.join(missing)}, "
                    "which this fleet does not have (was it placed with another "
                    f"--fleet or --backend?): {end}"
                )
            if row.thread_id not in saved:
                out.append(
                    f"allocation {row.id} ({row.project}): its thread {row.thread_id} "
                    "has no checkpoint (were the checkpoints replaced or lost?), so "
                    f"nothing will monitor or release it: {end}"
                )
        wall = time.time()
        for orphan in self._orphans(live, saved):
            if orphan.checkpointed:
                row = orphan.row
                unwatched = (
                    "Slurm's time limit still ends it at its deadline"
                    if self.services.scheduler_holds
                    else "so idle release, the lease and the budget are not enforced"
                )
                out.append(
                    f"allocation {row.id} ({row.project}) is not monitored: "
                    f"{orphan.describe(wall)}, {unwatched}; `gpu-agent resume "
                    f"{shlex.quote(row.thread_id)}` or a worker adopts it"
                )
        return out

    def _live(self) -> list[LedgerRow]:
        """The queued and active allocations the caller may see, oldest first."""
        mine = self._visible(None)
        return [row for row in self.services.ledger.live() if mine is None or row.project == mine]

    def orphans(self) -> list[Orphan]:
        """The live allocations the caller may see that no process monitors (its monitor
        died, or it was left placed with --no-wait), oldest first."""
        return self._orphans(self._live())

    def _orphans(self, live: list[LedgerRow], saved: set[str] | None = None) -> list[Orphan]:
        """Those of `live` no process monitors; `saved`: the threads known to have a
        checkpoint (read when not given)."""
        found = Monitors(self.services.ledger).orphans(rows=live)
        if saved is None:
            saved = self._checkpointed([o.row.thread_id for o in found])
        return [replace(o, checkpointed=o.row.thread_id in saved) for o in found]

    def status(self) -> dict[str, Any]:
        """Every GPU with its holder and live reading, and the allocations the caller may see
        (the `status` JSON); GPUs held by other projects show no thread or allocation."""
        status = fleet_status(self.services) | {"problems": self.problems()}
        mine = self._visible(None)
        return status if mine is None else scoped(status, mine)

    def pending_reviews(self) -> list[str]:
        """Threads waiting for a human decision that the caller may see, oldest first."""
        return [thread for thread, _ in self.pending_review_entries()]

    def pending_review_entries(self) -> list[tuple[str, AuditEntry]]:
        """(thread, the council's "ask" entry: when and for which project) of each review
        waiting for a decision that the caller may see, oldest first; not one whose thread is
        gone (deleted on the server, or a stateless run's), which nobody can answer."""
        log = self.services.ledger.audit_log(self._visible(None))
        decided = {e.key.removeprefix("decide:") for e in log if e.key.startswith("decide:")}
        asks = [e for e in log if e.action == "ask" and e.key.removeprefix("ask:") not in decided]
        alive = checkpointed(self.services, (e.target for e in asks))
        return [(e.target, e) for e in asks if e.target in alive]

    def jobs(self) -> list[Job]:
        """The submitted requests the caller may see, oldest first."""
        mine = self._visible(None)
        return [
            j
            for j in JobQueue(self.services.ledger).jobs()
            if mine is None or j.request.project == mine
        ]

    def job_counts(self) -> dict[str, int]:
        """How many of the submitted requests the caller may see are pending, running and
        done (a member's: its project's)."""
        if self._visible(None) is None:
            return JobQueue(self.services.ledger).counts()
        counts = dict.fromkeys(STATES, 0)
        for j in self.jobs():
            counts[j.state] += 1
        return counts

    def job(self, thread_id: str) -> Job:
        """A submitted request's job: pending, running (on which worker) or done (how)."""
        job = JobQueue(self.services.ledger).get(names.check("thread id", thread_id))
        self.identity.check_sees(job.request.project, f"no submitted thread {thread_id!r}")
        return job


def checkpointed(services: Services, thread_ids: Iterable[str]) -> set[str]:
    """Those of `thread_ids` that have a checkpoint the graph would resume from, read straight
    from the store graph/checkpoint.py's savers write (table `checkpoints`, the root namespace
    ''), so no checkpointer (nor LangGraph) is opened and nothing is created: SQLite's
    checkpoints file in the state directory, or the PostgreSQL database the ledger shares."""
    wanted = sorted(set(thread_ids))
    if not wanted:
        return set()
    if services.database is not None:
        db = services.ledger.db
        with db.read() as conn:
            return _checkpointed_in(conn, wanted) if "checkpoints" in db.tables(conn) else set()
    path = services.state_dir / CHECKPOINTS
    if not path.exists():  # never written, or lost: no thread has a checkpoint
        return set()
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60.0)
        try:
            if (
                conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'"
                ).fetchone()
                is None
            ):
                return set()
            return _checkpointed_in(conn, wanted)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StateDirError(
            f"checkpoints {path} are unreadable ({exc}); move the file aside to start afresh "
            "(running requests then cannot be resumed)"
        ) from None


def _checkpointed_in(conn: Conn | sqlite3.Connection, wanted: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(wanted), 500):  # under any SQLite's limit on parameters
        chunk = wanted[i : i + 500]
        found |= {
            str(r[0])
            for r in conn.execute(
                "SELECT DISTINCT thread_id FROM checkpoints WHERE checkpoint_ns = '' "
                f"AND thread_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
        }
    return found
