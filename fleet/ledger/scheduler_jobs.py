"""The job that holds an allocation's GPUs where a cluster's scheduler holds them (Slurm):
recorded once it runs, read by `status`, the monitor and start-up reconciliation."""

from __future__ import annotations

from fleet.fleet_backend import SchedulerJob
from fleet.ledger.kept import Kept
from fleet.models import ReleaseReason

# The allocation runs from its job's start, not from its placement: a job Slurm kept pending
# held nothing meanwhile. Its lease (and a deadline that is the lease's end) moves with it; a
# budget's deadline stays, so what it commits the project to only shrinks.
STARTED_LATER = (
    "UPDATE allocations SET lease_end = lease_end + (? - started_at), "
    "deadline = CASE WHEN deadline_reason = ? THEN deadline + (? - started_at) ELSE deadline END, "
    "started_at = ? WHERE id = ? AND state = 'active' AND started_at < ?"
)


class SchedulerJobs(Kept):
    """Recording and reading scheduler jobs."""

    def record_job(self, aid: str, scheduler: str, job: SchedulerJob) -> None:
        """The allocation's job (the same job again after a crash: nothing changes); an
        allocation placed before its job started starts when the job did (STARTED_LATER)."""
        at = job.started_at
        with self.transaction() as db:
            db.execute(
                "INSERT INTO scheduler_jobs (allocation_id, scheduler, job_id, node, gpus, "
                "started_at) VALUES (?,?,?,?,?,?) ON CONFLICT (allocation_id) DO UPDATE SET "
                "scheduler=excluded.scheduler, job_id=excluded.job_id, node=excluded.node, "
                "gpus=excluded.gpus, started_at=excluded.started_at",
                (aid, scheduler, job.job_id, job.node, job.gpus, at),
            )
            db.execute(STARTED_LATER, (at, ReleaseReason.LEASE_EXPIRED.value, at, at, aid, at))
            self._track(db, aid)

    def scheduler_jobs(self) -> dict[str, SchedulerJob]:
        """Allocation id -> its job, for every allocation that had one."""
        return {
            r["allocation_id"]: SchedulerJob(r["job_id"], r["node"], r["gpus"], r["started_at"])
            for r in self.query(
                "SELECT allocation_id, job_id, node, gpus, started_at FROM scheduler_jobs"
            )
        }

    def scheduler_job(self, aid: str) -> SchedulerJob | None:
        rows = self.query(
            "SELECT job_id, node, gpus, started_at FROM scheduler_jobs WHERE allocation_id=?",
            (aid,),
        )
        return SchedulerJob(*rows[0]) if rows else None
