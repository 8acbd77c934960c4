"""The job queue `gpu-agent worker` serves: requests submitted to the database, run by whichever
worker claims them, and claimed again by another if that worker dies.

A claim is a lease: a worker renews its leases while it lives; once one runs out, any worker
may claim the job and carry its thread on from the last checkpoint. On PostgreSQL claims take
the row with `FOR UPDATE SKIP LOCKED`, so workers never wait for each other's claims. Lease
times are wall-clock seconds (hosts are expected to keep NTP time; a lease outlives any sane
skew).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

from fleet.errors import InvalidInput
from fleet.ledger import Ledger
from fleet.ledger.threads import hand_to_job
from fleet.models import GPURequest

STATES = ("pending", "running", "done")


@dataclass(frozen=True)
class Job:
    thread_id: str
    request: GPURequest
    state: str  # pending | running | done
    submitted_at: float
    worker: str | None
    claimed_at: float | None  # by its current (or last) worker
    lease_until: float | None
    attempts: int
    outcome: str | None  # the thread's status when the job ended (or "failed")
    error: str | None
    finished_at: float | None


COLUMNS = (
    "thread_id, request, state, submitted_at, worker, claimed_at, lease_until, attempts, "
    "outcome, error, finished_at"
)


def _job(r: tuple[object, ...]) -> Job:
    values = list(r)
    values[1] = GPURequest.model_validate_json(str(values[1]))
    return Job(*values)  # type: ignore[arg-type]


class JobQueue:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def submit(
        self,
        thread_id: str,
        request: GPURequest,
        now: float | None = None,
        claimed_by: str | None = None,
    ) -> Job:
        """Queue a request for the workers; a thread id is submitted once. `claimed_by`: the
        owner of the thread's claim (fleet.thread_claims), handed to the job in the same
        transaction, so no `request` on the name runs beside its worker."""
        with self.ledger.queue_transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE thread_id=?", (thread_id,)).fetchone():
                raise InvalidInput(f"thread {thread_id!r} was already submitted")
            if claimed_by is not None:
                hand_to_job(db, thread_id, claimed_by)
            db.execute(
                "INSERT INTO jobs (thread_id, request, state, submitted_at) "
                "VALUES (?, ?, 'pending', ?)",
                (thread_id, request.model_dump_json(), time.time() if now is None else now),
            )
        return self.get(thread_id)

    def claim(self, worker: str, lease_seconds: float, now: float | None = None) -> Job | None:
        """The oldest job nobody holds (pending, or its worker's lease ran out), now ours.
        Never one this worker holds itself: its lease ran out while one of its threads runs
        it (a renewal held up), and a second thread would run the same graph thread."""
        now = time.time() if now is None else now
        with self.ledger.queue_transaction() as db:
            row = db.execute(
                "SELECT thread_id FROM jobs WHERE state='pending' OR (state='running' AND "
                "lease_until<? AND worker<>?) ORDER BY submitted_at, thread_id LIMIT 1"
                + self.ledger.db.skip_locked,
                (now, worker),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', worker=?, claimed_at=?, lease_until=?, "
                "attempts=attempts+1 WHERE thread_id=?",
                (worker, now, now + lease_seconds, row[0]),
            )
        return self.get(row[0])

    def renew(
        self,
        worker: str,
        lease_seconds: float,
        now: float | None = None,
        *,
        threads: Collection[str] | None = None,
    ) -> int:
        """Extend the leases this worker holds (of `threads` only, where given: the jobs its
        threads still run; one whose thread stopped lapses and is claimed again); how many."""
        now = time.time() if now is None else now
        sql = "UPDATE jobs SET lease_until=? WHERE worker=? AND state='running'"
        args: tuple[str, ...] = ()
        if threads is not None:
            if not threads:
                return 0
            sql += f" AND thread_id IN ({', '.join('?' * len(threads))})"
            args = tuple(sorted(threads))
        with self.ledger.queue_transaction() as db:
            return int(db.execute(sql, (now + lease_seconds, worker, *args)).rowcount)

    def finish(
        self,
        thread_id: str,
        worker: str,
        outcome: str,
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """The job ended; False when another worker had taken it over (its result counts)."""
        now = time.time() if now is None else now
        with self.ledger.queue_transaction() as db:
            return bool(
                db.execute(
                    "UPDATE jobs SET state='done', outcome=?, error=?, finished_at=?, "
                    "lease_until=NULL WHERE thread_id=? AND worker=? AND state='running'",
                    (outcome, error, now, thread_id, worker),
                ).rowcount
            )

    def hand_back(self, worker: str, thread_id: str | None = None, *, retry: bool = False) -> int:
        """Give jobs back to the queue (a worker stopping, or a job to retry), at once.
        `retry`: the claim was not an attempt (the thread's old monitor still beat), so it
        does not count towards the job's attempts."""
        spent = "attempts-1" if retry else "attempts"
        sql = (
            f"UPDATE jobs SET state='pending', worker=NULL, lease_until=NULL, "
            f"attempts={spent} WHERE worker=? AND state='running'"
        )
        args: tuple[str, ...] = (worker,)
        if thread_id is not None:
            sql += " AND thread_id=?"
            args += (thread_id,)
        with self.ledger.queue_transaction() as db:
            return int(db.execute(sql, args).rowcount)

    def get(self, thread_id: str) -> Job:
        rows = self.ledger.query(f"SELECT {COLUMNS} FROM jobs WHERE thread_id=?", (thread_id,))
        if not rows:
            raise InvalidInput(f"no submitted thread {thread_id!r}")
        return _job(rows[0])

    def jobs(self, state: str | None = None) -> list[Job]:
        sql = f"SELECT {COLUMNS} FROM jobs"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state=?"
            args = (state,)
        return [_job(r) for r in self.ledger.query(sql + " ORDER BY submitted_at, thread_id", args)]

    def open_threads(self) -> set[str]:
        """The threads of jobs not done (pending, or running on some worker)."""
        return {
            str(r[0])
            for r in self.ledger.query(
                "SELECT thread_id FROM jobs WHERE state IN ('pending', 'running')"
            )
        }

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts |= {
            r[0]: int(r[1])
            for r in self.ledger.query("SELECT state, count(*) FROM jobs GROUP BY state")
        }
        return counts
