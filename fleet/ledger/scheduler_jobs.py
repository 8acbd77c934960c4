"""The job that holds an allocation's GPUs where a cluster's scheduler holds them (Slurm):
recorded once it runs, read by `status`, the monitor and start-up reconciliation."""

from __future__ import annotations

from fleet.fleet_backend import SchedulerJob
from fleet.ledger.store import Store


class SchedulerJobs(Store):
    """Recording and reading scheduler jobs."""

    def record_job(self, aid: str, scheduler: str, job: SchedulerJob) -> None:
        """The allocation's job (the same job again after a crash: nothing changes)."""
        with self.db.lock:  # one statement: atomic without a transaction around it
            self.db.conn().execute(
                "INSERT INTO scheduler_jobs (allocation_id, scheduler, job_id, node, gpus, "
                "started_at) VALUES (?,?,?,?,?,?) ON CONFLICT (allocation_id) DO UPDATE SET "
                "scheduler=excluded.scheduler, job_id=excluded.job_id, node=excluded.node, "
                "gpus=excluded.gpus, started_at=excluded.started_at",
                (aid, scheduler, job.job_id, job.node, job.gpus, job.started_at),
            )

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
