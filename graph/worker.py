"""`gpu-agent worker`: serve the job queue with N threads at once, beside other workers.

Each thread claims a job (fleet.jobs), runs its request's thread to the end (placement,
monitoring, release) and marks the job done with the thread's status. A job whose request
waits in the fleet's fair queue for GPUs lets its turn go to a new thread (up to
`max_waiting` such jobs at once), so that jobs behind it reach the fair queue, where
priority, fairness and other types' free GPUs decide, instead of waiting behind it.

A job whose thread was checkpointed already (its worker died, or handed it back on SIGTERM)
is resumed, not restarted: every side effect from allocate on is idempotent on (thread,
request), so a GPU is freed and a cost charged once whoever finishes the thread.

A thread with no job to claim also adopts live allocations whose monitor died (a `request`
or `resume --approve` killed, a page, another worker's thread: fleet.monitors) or that were
left placed with --no-wait, and monitors them to their end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fleet.errors import InvalidInput, MonitoredElsewhere, StateDirError
from fleet.jobs import Job, JobQueue
from fleet.models import Event, EventKind, ReleaseReason, Status
from graph.orchestrator import Orchestrator

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_WAIT_SECONDS = 86400.0  # a worker's lease and poll: a dead worker's jobs wait a day at most
# A lease renews every quarter of its length: shorter, a living worker's lease lapses between
# two commits and another claims its job, which it then counts as stopped; a poll shorter
# than a hundredth of a second only spins.
MIN_LEASE_SECONDS, MIN_POLL_SECONDS = 0.2, 0.01


@dataclass
class Worker:
    orch: Orchestrator
    concurrency: int = 4
    lease_seconds: float = 30.0  # a dead worker's jobs are claimed again after this long
    poll_seconds: float = 1.0  # how often an idle thread looks for work
    exit_when_idle: bool = False  # stop once no job is pending or running anywhere
    max_attempts: int = 3  # a job that fails this often (an exception, not a status) is failed
    max_waiting: int = 64  # jobs waiting for GPUs in the fair queue beside `concurrency`
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )
    stopping: threading.Event = field(default_factory=threading.Event)
    finished: Counter[str] = field(default_factory=Counter)  # outcomes of the jobs it ended

    def __post_init__(self) -> None:
        self.orch.identity.check_admin("run a worker (it runs every project's requests)")
        if self.concurrency < 1:
            raise InvalidInput(f"--concurrency must be at least 1, not {self.concurrency}")
        if not MIN_LEASE_SECONDS <= self.lease_seconds <= MAX_WAIT_SECONDS:
            raise InvalidInput(
                f"--lease-seconds must be from {MIN_LEASE_SECONDS:g} to {MAX_WAIT_SECONDS:g} "
                f"(a day), not {self.lease_seconds}"
            )
        if not MIN_POLL_SECONDS <= self.poll_seconds <= MAX_WAIT_SECONDS:
            raise InvalidInput(
                f"--poll-seconds must be from {MIN_POLL_SECONDS:g} to {MAX_WAIT_SECONDS:g}, "
                f"not {self.poll_seconds}"
            )
        if self.max_waiting < 0:
            raise InvalidInput(f"--max-waiting must be at least 0, not {self.max_waiting}")
        self.queue = JobQueue(self.orch.services.ledger)
        self._lock = threading.Lock()
        self._turns = threading.Semaphore(self.concurrency)
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # jobs that let their turn go and wait for GPUs
        self._jobs: set[str] = set()  # the jobs this worker's threads run: their leases renew
        self._adopted: set[str] = set()  # threads this worker's threads are adopting
        self._stranded: set[str] = set()  # allocations adopted whose thread does not run them
        self._failed: Counter[str] = Counter()  # adoptions that raised, by allocation

    def serve(self) -> Counter[str]:
        """Run until `stopping` is set (or, with exit_when_idle, the queue is empty), then
        hand the jobs still running back to the queue. The outcomes of the jobs it ended."""
        for _ in range(self.concurrency):
            self._spawn()
        try:
            while not self.stopping.wait(self.lease_seconds / 4):
                self._renew()
                with self._lock:
                    self._threads = [t for t in self._threads if t.is_alive()]
                    if not self._threads:
                        break
        finally:
            self.stopping.set()  # handed back uncounted: stopping is no failed attempt
            handed = self._persist(  # tried once (stopping); else their leases lapse
                f"worker {self.worker_id} handing its jobs back",
                lambda: self.queue.hand_back(self.worker_id, retry=True),
            )
            if handed:
                log.info("worker %s handed %d running job(s) back", self.worker_id, handed)
        return self.finished

    def _renew(self) -> None:
        """Extend this worker's leases. A database that went away for a moment (a restart,
        a dropped connection) is tried again at the next beat, the jobs running on: ended
        here, the worker would leave every job it runs to lapse (and their monitors)."""
        with self._lock:
            running = set(self._jobs)
        try:
            self.queue.renew(self.worker_id, self.lease_seconds, threads=running)
        except Exception:
            log.exception("worker %s could not renew its leases", self.worker_id)

    def _spawn(self) -> None:
        t = threading.Thread(target=self._loop, name="job", daemon=True)
        with self._lock:  # started before serve's count of the living can see it
            self._threads.append(t)
            t.start()

    def _loop(self) -> None:
        """A thread of the worker: each of its rounds holds one of `concurrency` turns. One
        whose job let its turn go (to a new thread) ends with that job."""
        while not self.stopping.is_set():
            if not self._turns.acquire(timeout=self.poll_seconds):
                continue
            turn = _Turn(self)
            try:
                go_on = self._round(turn)
            finally:
                kept = turn.end()
            if not (go_on and kept):
                return

    def _round(self, turn: _Turn) -> bool:
        """Claim a job and run it, or adopt an orphan, or wait a poll; False: idle, and
        told to exit when idle."""
        try:
            job = self.queue.claim(self.worker_id, self.lease_seconds)
        except Exception:  # the database went away for a moment: try again
            log.exception("claiming a job failed")
            self.stopping.wait(self.poll_seconds)
            return True
        if job is None:
            if self._adopt_one(turn):
                return True
            if self.exit_when_idle and self._idle():
                return False
            self.stopping.wait(self.poll_seconds)
            return True
        self._run(job, turn)
        return True

    def _adopt_one(self, turn: _Turn | None = None) -> bool:
        """Monitor one allocation nobody monitors (whose thread no job of the queue holds:
        the job's own takeover resumes those); whether there was one."""
        try:
            orphans = [o for o in self.orch.orphans() if o.checkpointed]
            queued = self.queue.open_threads() if orphans else set()
        except Exception:  # the database went away for a moment: try again later
            log.exception("looking for unmonitored allocations failed")
            return False
        for orphan in orphans:
            tid = orphan.row.thread_id
            if tid in queued or orphan.row.id in self._stranded:
                continue
            with self._lock:
                if tid in self._adopted:  # another thread of this worker has it
                    continue
                self._adopted.add(tid)
            try:
                if not self.orch.claim_orphan(orphan):
                    continue
                log.info(
                    "worker %s adopts %s (thread %s): %s",
                    self.worker_id,
                    orphan.row.id,
                    tid,
                    orphan.describe(time.time()),
                )
                if turn is not None and orphan.row.state == "queued":  # waits, as a job
                    turn.let_go()
                outcome = self.orch.resume(tid, on_event=_hook(turn))
                with self._lock:
                    self.finished[f"adopted {outcome.status.value}"] += 1
                if self.orch.services.ledger.get(orphan.row.id).state != "released":
                    with self._lock:  # its thread does not run it (it ended, or waits for a
                        self._stranded.add(orphan.row.id)  # review): not adopted again here
                    log.warning(
                        "allocation %s stays unmonitored: its thread %s is %s and does not "
                        "run it (gpu-agent release %s frees it)",
                        orphan.row.id,
                        tid,
                        outcome.status.value,
                        orphan.row.id,
                    )
                return True
            except Exception:  # let go, for another adopter; left after max_attempts
                self.orch.services.unwatch(orphan.row.id)
                with self._lock:
                    self._failed[orphan.row.id] += 1
                    left = self._failed[orphan.row.id] >= self.max_attempts
                    if left:
                        self._stranded.add(orphan.row.id)
                log.exception(
                    "adopted thread %s stopped%s", tid, "; this worker leaves it" if left else ""
                )
                return True
            finally:
                with self._lock:
                    self._adopted.discard(tid)
        return False

    def _idle(self) -> bool:
        counts = self.queue.counts()
        return counts["pending"] == 0 and counts["running"] == 0

    def _run(self, job: Job, turn: _Turn | None = None) -> None:
        """Run the job's thread to its end (its request waiting in the fair queue lets its
        `turn` go); what it ends as is recorded, and the job is handed back where its run
        raised or the database could not be reached."""
        with self._lock:
            self._jobs.add(job.thread_id)
        try:
            self._run_job(job, turn)
        finally:
            with self._lock:
                self._jobs.discard(job.thread_id)

    def _run_job(self, job: Job, turn: _Turn | None) -> None:
        tid = job.thread_id
        if job.attempts > self.max_attempts:  # its workers stopped while running it
            try:
                orphaned = self._orphaned(tid)
            except Exception:  # the database went away: the next claim looks again
                log.exception("reading job %s's allocations failed", tid)
                orphaned = None
            if orphaned is None:  # no attempt: try again after a poll, as below
                self._hand_back(tid, retry=True)
                self.stopping.wait(self.poll_seconds)
            else:
                why = f"its workers stopped {job.attempts - 1} times running it"
                self._give_up(job, orphaned, why)
            return
        try:
            heard = _hook(turn)
            if self.orch.checkpointer.get_tuple({"configurable": {"thread_id": tid}}) is None:
                outcome = self.orch.start_job(job, on_event=heard)
            else:
                if turn is not None and self.orch.outcome(tid).status is Status.QUEUED:
                    turn.let_go()  # it queued before: it waits
                outcome = self.orch.resume(tid, on_event=heard)
            status, error = outcome.status.value, None
        except MonitoredElsewhere:  # its old monitor still beats: try again after a poll
            self._hand_back(tid, retry=True)
            self.stopping.wait(self.poll_seconds)
            return
        except StateDirError as exc:  # the database cannot be reached (a restart): no attempt
            if not self.stopping.is_set():
                log.warning("job %s handed back to be tried again: %s", tid, exc)
                self._hand_back(tid, retry=True)
            return
        except InvalidInput as exc:
            status, error = "invalid", str(exc)
        except Exception as exc:
            if self.stopping.is_set():
                return  # stopping: the job is handed back
            log.exception("job %s failed (attempt %d)", tid, job.attempts)
            if job.attempts < self.max_attempts:
                self._hand_back(tid)
                return
            status, error = "failed", f"{type(exc).__name__}: {exc}"  # what it placed: adopted
        self._finish(tid, status, error)

    def _finish(self, tid: str, status: str, error: str | None) -> None:
        if self._persist(
            f"recording job {tid}'s end",
            lambda: self.queue.finish(tid, self.worker_id, status, error),
        ):
            with self._lock:
                self.finished[status] += 1

    def _hand_back(self, tid: str, *, retry: bool = False) -> None:
        self._persist(
            f"handing job {tid} back",
            lambda: self.queue.hand_back(self.worker_id, tid, retry=retry),
        )

    def _persist(self, what: str, write: Callable[[], T]) -> T | None:
        """A write to the queue, tried again every poll while the database cannot take it
        (a restart); None where the worker stops first (once stopping, one try): the job's
        lease, renewed no more, lapses and it is claimed again."""
        while True:
            try:
                return write()
            except Exception:
                log.exception("%s failed; trying again", what)
                if self.stopping.wait(self.poll_seconds):
                    return None

    def _orphaned(self, tid: str) -> list[str] | None:
        """What the job's thread placed and nobody monitors; None where a live process still
        monitors some of it: its old worker runs it (its lease lapsed), and the claim was no
        attempt."""
        live = {aid for aid, _ in self.orch.services.ledger.live_on(tid)}
        orphaned = [o.row.id for o in self.orch.orphans() if o.row.id in live]
        return None if len(orphaned) < len(live) else orphaned

    def _give_up(self, job: Job, orphaned: list[str], why: str) -> None:
        """A job its workers kept dying on (a crash it causes) fails for good: what its
        thread placed or queued, which nobody monitors, is released (each worker adopting it
        would die as the job's did), and the job ends failed, saying why."""
        log.warning("job %s given up after %d claims: %s", job.thread_id, job.attempts, why)
        try:
            for aid in orphaned:
                self.orch.services.release(aid, ReleaseReason.CANCELLED)
        except Exception:  # the database went away: the next claim gives it up again
            log.exception("giving job %s up failed", job.thread_id)
            with contextlib.suppress(Exception):
                self.queue.hand_back(self.worker_id, job.thread_id, retry=True)
            return
        self._finish(job.thread_id, "failed", why)


def _hook(turn: _Turn | None) -> Callable[[Event], None] | None:
    """What a job's events tell its turn: queued, it waits; placed, it waits no more."""
    if turn is None:
        return None

    def heard(event: Event) -> None:
        if event.kind is EventKind.QUEUED:
            turn.let_go()
        elif event.kind is EventKind.PLACED:
            turn.placed()

    return heard


class _Turn:
    """One of a worker's `concurrency` turns, held by a thread for a round. A job that waits
    for GPUs in the fair queue lets it go (`let_go`, once; while fewer than `max_waiting`
    jobs wait so), to a new thread that claims the next job; placed later, the job waits no
    more and runs on beside the others (its GPUs are monitored whatever the count)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.held = True
        self.waiting = False  # let go, and counted among the worker's waiting jobs

    def let_go(self) -> None:
        w = self.worker
        with w._lock:
            if not self.held or w._waiting >= w.max_waiting:
                return
            self.held, self.waiting = False, True
            w._waiting += 1
        w._turns.release()
        w._spawn()

    def placed(self) -> None:
        with self.worker._lock:
            self._counted_out()

    def end(self) -> bool:
        """The round is over: give the turn back; False where it was let go (this thread's
        job waited, and another thread took its turn: this one ends)."""
        w = self.worker
        with w._lock:
            self._counted_out()
            if not self.held:
                return False
            self.held = False
        w._turns.release()
        return True

    def _counted_out(self) -> None:
        if self.waiting:  # the worker's lock is held
            self.waiting = False
            self.worker._waiting -= 1
