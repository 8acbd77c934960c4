"""The services a fleet runs on: its backend, ledger, clock and the council a caller gives
(else the fleet file's, which nodes.context.council_of loads when first convened), opened once
over a state directory.

Plain Python, no LangGraph: the graph's nodes reach these through the runtime context
(nodes/context.py), and the commands that only read or write the ledger (graph/records.py)
open them directly, without building the graph.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fleet.borrowing import lenders, may_borrow
from fleet.budget import Moved
from fleet.choose_backend import BackendChoice, Resolved, make_backend, placeable_fleet, resolve
from fleet.clock import Clock, WakeToken
from fleet.commands import Commands, run_lives, work
from fleet.config import FleetConfig, load_fleet
from fleet.errors import InvalidInput, MonitoredElsewhere, RunStopped
from fleet.faults import SUBMITTED, fault
from fleet.fleet_backend import Ended, FleetBackend, Hold, Reserving, Scheduled
from fleet.ledger import Ledger
from fleet.ledger.notify import FreedListener
from fleet.ledger.rows import Lease, LedgerRow
from fleet.left_running import end_with
from fleet.models import GPUInfo, GPURequest, GPUSample, Release, ReleaseReason, RouteDecision
from fleet.monitoring import Work
from fleet.monitors import Heartbeat, Monitors, of_this_process, seen_from_here
from fleet.routing import Refusal, route, types_for
from fleet.speeds import learned_speeds
from fleet.sql import Conn, PostgresDatabase, is_postgres
from fleet.statedir import (
    LEDGER,
    clock_of,
    default_state_dir,
    opened,
    remove_new,
    scale_before,
    share_epoch,
)
from fleet.supervise import GRACE_S, RELEASE_WAIT_S, RUN_POLL_S, RunCommand, group_members
from fleet.topology import Topology
from fleet.validation import check_budget


@dataclass
class Services:
    config: FleetConfig
    backend: FleetBackend
    ledger: Ledger
    clock: Clock
    state_dir: Path
    database: str | None = None  # a postgresql:// URL: the ledger (and checkpoints) live there
    actor: str = "local"  # who acts through these services, for the audit log
    # The council a run convenes (council.voting.Council), typed loosely so that the domain
    # imports no council; None: the fleet file's, loaded on first use (nodes.context.council_of)
    chosen_council: Any = None
    note: str | None = None  # what `--backend auto` picked
    # What runs threads through these services ("cli", "worker", "page", "server", "python"),
    # for the heartbeat of the allocations it monitors (fleet.monitors); None: nothing beats
    # (the simulator, and the commands that only read the ledger).
    monitor_kind: str | None = None
    gpus: list[GPUInfo] = field(init=False)  # every GPU the backend reports
    inventory: list[GPUInfo] = field(init=False)  # those placement may use (a priced type)
    topology: Topology = field(init=False)
    _wakers: dict[str, WakeToken] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # (GPUs placement may not use, the inventory without them), kept while the set is the same
    _healthy: tuple[frozenset[str], list[GPUInfo]] | None = field(default=None, init=False)
    _reserving: Reserving | None = field(default=None, init=False)
    _scheduled: Scheduled | None = field(default=None, init=False)
    _heartbeat: Heartbeat | None = field(default=None, init=False)
    _listener: FreedListener | None = field(default=None, init=False)  # PostgreSQL only
    _watched: dict[str, str] = field(default_factory=dict, init=False)  # thread -> allocation
    _stopping: set[str] = field(default_factory=set, init=False)  # threads interrupted here
    # allocation -> how to stop the command this process's `gpu-agent run` supervises on it
    _supervised: dict[str, Callable[[], object]] = field(default_factory=dict, init=False)
    # the last route given: (Ledger.stamp, placeable GPUs, request, route), see route()
    _routed: tuple[Any, list[GPUInfo], GPURequest, RouteDecision | Refusal] | None = field(
        default=None, init=False
    )
    commands: Commands = field(init=False)  # what `gpu-agent run` says of each allocation

    def __post_init__(self) -> None:
        self.commands = Commands(self.ledger)
        self._reserving = self.backend if isinstance(self.backend, Reserving) else None
        self._scheduled = self.backend if isinstance(self.backend, Scheduled) else None
        self.gpus = self.backend.inventory()
        self.inventory = [g for g in self.gpus if g.gpu_type in self.config.catalog]
        self.topology = Topology(self.config, self.inventory)

    @property
    def scheduler_holds(self) -> bool:
        """A cluster's scheduler (Slurm) holds the GPUs, and ends them at their deadline by
        its own time limit even while no gpu-agent process watches."""
        return self._scheduled is not None

    @property
    def unpriced(self) -> list[GPUInfo]:
        """GPUs whose type the fleet file does not price: listed, never placed."""
        return [g for g in self.gpus if g.gpu_type not in self.config.catalog]

    def check_health(self) -> dict[str, str]:
        """Take the GPUs the backend found unusable out of placement; the unhealthy GPUs."""
        found = self.backend.unhealthy()
        if found:
            self.ledger.mark_unhealthy(found, self.clock.now())
        return self.ledger.unhealthy()

    def unavailable(self, holders: dict[str, tuple[str, str]] | None = None) -> dict[str, str]:
        """GPUs a cluster's scheduler keeps from placement now (Slurm: a drained or down node,
        a job gpu-agent did not submit), with why; none for other backends."""
        if self._scheduled is None:
            return {}
        held = self.ledger.holders() if holders is None else holders
        return self._scheduled.unavailable({g: aid for g, (aid, _) in held.items()})

    def placeable(self) -> list[GPUInfo]:
        """The inventory less unhealthy GPUs, GPUs the cluster's scheduler keeps, and free GPUs
        that run processes gpu-agent did not place (one list per such set, so the ledger's
        per-list index of it is kept). Only hardware reports any."""
        if not self.backend.hardware:
            return self.inventory
        bad = set(self.check_health())
        holders = self.ledger.holders()
        bad |= set(self.unavailable(holders))
        free = [g.uuid for g in self.inventory if g.uuid not in holders and g.uuid not in bad]
        bad |= {s.gpu_id for s in self.backend.sample(free, self.clock.now(), {}) if s.processes}
        if self._healthy is None or self._healthy[0] != bad:
            self._healthy = (
                frozenset(bad),
                [g for g in self.inventory if g.uuid not in bad] if bad else self.inventory,
            )
        return self._healthy[1]

    def starts_in_hours(self, types: Iterable[str], count: int) -> dict[str, float]:
        """Per type, at the latest how long until a request for `count` GPUs could start
        (Ledger.starts_in_hours on the GPUs placement may use): what routing weighs a
        cheaper type's wait against."""
        return self.ledger.starts_in_hours(types, count, self.clock.now(), self.placeable())

    def route(self, request: GPURequest, *, again: bool = False) -> RouteDecision | Refusal:
        """Route `request` now, as the route node does: within what the project's budget
        admits once its running work has ended (placement makes it wait for that), with
        each type's wait and the project's usage factor (fleet.routing.route).

        `again`: the route node's, right after the council priced the same request with no
        pause between. The route given then stands (once) if nothing it read has changed
        since: the ledger (Ledger.stamp: never on PostgreSQL) and the placeable GPUs."""
        stamp, placeable = self.ledger.stamp(), self.placeable()
        with self._lock:
            last, self._routed = self._routed, None
        if (
            again
            and last is not None
            and stamp is not None
            and last[0] == stamp
            and last[1] is placeable
            and last[2] == request
        ):
            return last[3]
        types = types_for(request, self.config)
        # and the other pools' types it may borrow (not on Slurm: a pool is a partition there)
        borrows = may_borrow(request, self.config) and not self.scheduler_holds
        if borrows:
            types += [t for t in self.config.catalog if t not in types]
        starts = self.ledger.starts_in_hours(  # as starts_in_hours, on the GPUs read above
            types,
            request.count,
            self.clock.now(),
            placeable,
            new_work=request.priority if request.resumes is None else None,
        )
        decision = route(
            request,
            self.config,
            self.ledger.remaining_usd(request.project, running=False),
            starts,
            self.ledger.usage_factor(request.project),
            lenders(request, self.config, starts) if borrows else (),
            learned_speeds(self.ledger, request.project, request.workload),
        )
        with self._lock:
            self._routed = (stamp, placeable, request, decision)
        return decision

    def sample(self, gpu_ids: list[str], now: float, holders: dict[str, str]) -> list[GPUSample]:
        """Read GPUs; those found unhealthy leave placement at once."""
        samples = self.backend.sample(gpu_ids, now, holders)
        bad = {s.gpu_id: s.health for s in samples if s.health}
        if bad:
            self.ledger.mark_unhealthy(bad, now)
        return samples

    def waker(self, allocation_id: str) -> WakeToken:
        """The token that ends this allocation's monitor or queue sleep early."""
        with self._lock:
            token = self._wakers.get(allocation_id)
            if token is None:
                token = self._wakers[allocation_id] = self.clock.token()
            return token

    def wake(self, allocation_id: str) -> None:
        self.waker(allocation_id).set()

    def wake_waiters(self, freed: str) -> None:
        """Allocation `freed` let its GPUs go (here, or in another process on PostgreSQL:
        fleet.ledger.notify): the queued requests in this process that can start now retry
        now, not at their next poll; under max-min, slower work may move up (Ledger.move_up)."""
        row = self.ledger.get(freed)
        for aid in self.ledger.placeable(row, self.clock.now(), self.placeable()):
            with self._lock:
                token = self._wakers.get(aid)
            if token is not None:
                token.set()
        # max-min: what runs slower elsewhere may move up to the GPUs nobody waits for
        self.moved(self.ledger.move_up(row.gpu_type, self.clock.now(), self.placeable()))

    def _heard(self, freed: str) -> None:
        """Another process released `freed` (fleet.ledger.notify): wake_waiters, where this
        process has anything asleep."""
        with self._lock:
            asleep = bool(self._wakers)
        if asleep:
            self.wake_waiters(freed)

    def reserve(self, row: LedgerRow, request: GPURequest) -> str | None:
        """Tell a reserving backend (Ray) about a placement, or have the cluster's scheduler
        (Slurm) hold its GPUs in a job (with the request's checkpoint notice, started within its
        max wait), recorded in the ledger; None, or why it could not."""
        if self._reserving is not None:
            return self._reserving.reserve(row.id, row.gpu_ids)
        if self._scheduled is None:
            return None
        assert row.deadline is not None
        job = self._scheduled.submit(
            Hold(
                row.id,
                row.project,
                row.purpose,
                row.gpu_ids,
                row.deadline,
                request.notice_seconds,
                request.notice_signal,
                request.give_up_at(row.enqueued_at),
            )
        )
        if isinstance(job, str):
            return job
        fault(SUBMITTED)  # the job runs; the ledger does not know it yet
        self.ledger.record_job(row.id, self.backend.name, job)
        return None

    def supervising(self, allocation_id: str, stop: Callable[[], object] | None) -> None:
        """This process runs a command on the allocation (`gpu-agent run`), and `stop` stops
        it (None: no longer): whatever releases the allocation here stops it first."""
        with self._lock:
            if stop is None:
                self._supervised.pop(allocation_id, None)
            else:
                self._supervised[allocation_id] = stop

    def stop_supervised(self, allocation_id: str) -> None:
        """Stop the command this process supervises on the allocation, if any, and wait for
        it (its SIGTERM and grace): its GPUs are never free in the ledger while it runs."""
        with self._lock:
            stop = self._supervised.get(allocation_id)
        if stop is not None:
            stop()

    def free(self, allocation_id: str) -> None:
        """Free what the backend holds for an allocation the ledger has released."""
        if self._reserving is not None:
            self._reserving.free(allocation_id)
        if self._scheduled is not None:
            self._scheduled.cancel(allocation_id)  # refused: start-up reconciliation retries

    def moved(self, moves: Iterable[Moved]) -> None:
        """Deadlines moved: their monitors hear at once, and a scheduler's time limits follow."""
        for m in moves:
            self.wake(m.id)
            self.follow(m.id, m.after)

    def follow(self, allocation_id: str, deadline: float) -> Ended | None:
        """Where the cluster's scheduler holds the GPUs (Slurm): None while the allocation's job
        runs (its time limit then covers `deadline`); else how the scheduler ended it, and
        when (a job gone with no record of its end: at the allocation's last heartbeat)."""
        if self._scheduled is None:
            return None
        job = self.ledger.scheduler_job(allocation_id)
        ended = None if job is None else self._scheduled.follow(job, deadline)
        if ended is None or ended.at is not None:
            return ended
        return replace(ended, at=self.ledger.get(allocation_id).heartbeat_at)

    def reconcile_jobs(self) -> list[Release]:
        """At start-up, where the cluster's scheduler holds the GPUs (Slurm): active allocations
        whose job ended while nothing watched end as the scheduler ended them (a job found by
        its name that the ledger had not recorded yet is recorded). The releases made."""
        scheduled = self._scheduled
        if scheduled is None or getattr(self.backend, "problem", None):
            return []
        released = []
        recorded = self.ledger.scheduler_jobs()
        for row in self.ledger.allocations("active"):
            assert row.deadline is not None
            job = recorded.get(row.id)
            if job is None:  # placed, and the process died before the job was recorded
                job = scheduled.found(row.id)
                if job is not None:
                    self.ledger.record_job(row.id, self.backend.name, job)
                continue  # never submitted: the thread's resume submits it
            ended = self.follow(row.id, row.deadline)
            if ended is not None:
                assert ended.at is not None
                release, now = self.ledger.release_once(
                    row.id, ended.reason, ended.at, f"{self.backend.name}: {ended.why}"
                )
                if now:
                    released.append(release)
        return released

    def reconcile_reservations(self) -> tuple[list[str], list[str]]:
        """At start-up: free the reservations (jobs) of allocations that ended while no process
        ran, and make the reservations an active allocation lacks (Ray). (freed, made)."""
        if self._scheduled is not None and not getattr(self.backend, "problem", None):
            states = {r.id: r.state for r in self.ledger.allocations()}
            ended = sorted(a for a in self._scheduled.live() if states.get(a) == "released")
            for aid in ended:
                self._scheduled.cancel(aid)
            return ended, []
        if self._reserving is None:
            return [], []
        active = {r.id: r.gpu_ids for r in self.ledger.allocations("active")}
        held = self._reserving.reservations()
        freed = sorted(a for a in held if a not in active)
        for aid in freed:
            self._reserving.free(aid)
        made = sorted(a for a in active if a not in held)
        for aid in made:
            self._reserving.reserve(aid, active[aid])
        return freed, made

    def release(
        self,
        allocation_id: str,
        reason: ReleaseReason,
        *,
        at: float | None = None,
        by: str | None = None,
    ) -> Release:
        """Release now, or at `at` (a lease's end that passed unseen), or cancel a queued
        request; its monitor and the queue hear at once. A second release returns the first.
        `by`: who, for the audit log (default: whoever these services act for)."""
        return self.release_once(allocation_id, reason, at=at, by=by)[0]

    def release_once(
        self,
        allocation_id: str,
        reason: ReleaseReason,
        *,
        at: float | None = None,
        by: str | None = None,
    ) -> tuple[Release, bool]:
        """`release`, and whether this call released it (False: something else did first)."""
        self.stop_supervised(allocation_id)
        release, here = self.ledger.release_once(
            allocation_id, reason, self.clock.now() if at is None else at, by or self.actor
        )
        self.free(allocation_id)
        self.wake(allocation_id)
        self.wake_waiters(allocation_id)
        return release, here

    def release_asked(
        self, allocation_id: str, reason: ReleaseReason, by: str | None = None
    ) -> tuple[Release, bool, bool]:
        """A caller's release (`gpu-agent release`, a tool, the page). Where a live
        `gpu-agent run` of another process (of this host, or by its beats another) runs a
        command on the allocation, its lease ends now instead (Ledger.end_now) and that run
        stops the command and then releases it, as at any lease end, so that its GPUs never
        show free while the command runs; this waits for that, at most the command's grace
        and RELEASE_WAIT_S. Then, or where no such run lives, the release goes ahead here,
        after a dead run's command left here has ended (fleet.left_running). Returns the
        release, whether this call released it (or asked first the run that did), and
        whether it gave up waiting for a run that did not stop its command in time, or went
        quiet on another host, or died leaving a command nothing here could stop (it may
        still run: the caller should say so)."""
        asked, gave_up = self._end_command_first(allocation_id, reason, by or self.actor)
        end_with(self.ledger, allocation_id)
        left = self.left_by_a_dead_run(allocation_id)
        release, here = self.release_once(allocation_id, reason, by=by)
        return release, here or asked, gave_up or left

    def left_by_a_dead_run(self, aid: str) -> bool:
        """A `gpu-agent run` that died left a command on active allocation `aid` whose exit
        nobody saw and that nothing here could stop or see gone (another host's; a run whose
        process group was not recorded, as `run --allocation` before schema 11; or a group
        with processes that do not name the allocation, which end_with leaves alone): it may
        still run."""
        lease = self.ledger.lease(aid)
        owner = lease.command_owner
        if (
            lease.state != "active"
            or owner is None
            or lease.command_ended_at is not None
            or run_lives(lease, self.config.monitor.heartbeat_stale_seconds)
        ):
            return False
        record = self.ledger.run_record(aid)  # its group's end is seen here (end_with)
        if not seen_from_here(owner) or record is None or record.owner != owner:
            return True
        return record.pgid is None or bool(group_members(record.pgid))

    def work(self, lease: Lease) -> Work:
        """What `gpu-agent run` says of the lease's work (fleet.commands.work), its run's
        beats judged by this fleet's heartbeat_stale_seconds."""
        return work(lease, self.config.monitor.heartbeat_stale_seconds)

    def _end_command_first(self, aid: str, reason: ReleaseReason, by: str) -> tuple[bool, bool]:
        """(whether this call asked the run of another process to stop its command on `aid`
        first, whether it gave up waiting for that run to release it: _wait_for_run).
        (False, False) where no such run lives, or one of this host died (its command is
        ended here: end_with)."""
        found = self._run_elsewhere(aid, self.ledger.lease(aid))
        if found is None:
            return False, False
        asked = self.ledger.end_now(aid, self.clock.now(), by, reason)
        if asked is None:
            return False, False
        return asked == "asked", self._wait_for_run(aid, *found)

    def await_run(self, aid: str, reason: ReleaseReason) -> bool:
        """Before this process's monitor releases `aid` at its deadline (its lease, its
        budget): where a living `gpu-agent run` of another process runs a command on it (`run
        --allocation`), that run stops the command and releases at the deadline, as at any
        lease end; wait for it, so that the GPUs never show free while the command runs.
        Whether it gave up waiting (_wait_for_run: the command may still run)."""
        lease = self.ledger.lease(aid)  # one read: every release of every allocation asks
        if lease.deadline is None or lease.deadline_reason is not reason:
            return False
        found = self._run_elsewhere(aid, lease)
        return False if found is None else self._wait_for_run(aid, *found)

    def _run_elsewhere(self, aid: str, lease: Lease) -> tuple[str, float] | None:
        """The living `gpu-agent run` of another process (of this host, or by its beats
        another) that runs a command on active allocation `aid` (its `lease`), and its
        command's grace."""
        owner = lease.command_owner
        if owner is None or lease.state != "active" or of_this_process(owner):
            return None  # this process's own run: Services.supervising stops it
        if not run_lives(lease, self.config.monitor.heartbeat_stale_seconds):
            return None
        record = self.ledger.run_record(aid)
        return owner, RunCommand.read(record.command).grace_s if record is not None else GRACE_S

    def _wait_for_run(self, aid: str, owner: str, grace: float) -> bool:
        """Wait until the run `owner` has released `aid`: False once it has, or died on this
        host (its command is ended here: end_with); True where it gave up (the command may
        still run): its grace and RELEASE_WAIT_S went by, or a run of another host went quiet,
        whose command nothing here can stop."""
        stale = self.config.monitor.heartbeat_stale_seconds
        give_up = time.monotonic() + grace + RELEASE_WAIT_S
        while (lease := self.ledger.lease(aid)).state != "released":
            if not run_lives(lease, stale):
                return not seen_from_here(owner) and lease.command_ended_at is None
            if time.monotonic() >= give_up:
                return True
            time.sleep(RUN_POLL_S)
        return False

    def forget(self, allocation_id: str) -> None:
        """The allocation ended: no more wake-ups for it, no more heartbeat."""
        with self._lock:
            self._wakers.pop(allocation_id, None)
        self.unwatch(allocation_id)

    # ---- who monitors (fleet.monitors) ----------------------------------------------------

    def watch(self, allocation_id: str, thread_id: str, db: Conn | None = None) -> None:
        """This process runs the allocation's thread from now on: claim its monitor row and
        beat for it. MonitoredElsewhere when a live monitor of another process holds it (two
        processes never run one allocation's thread). No-op without a monitor_kind. `db`: the
        claim joins that transaction (a placement's, which then commits both at once)."""
        if self.monitor_kind is None:
            return
        with self._lock:
            pg = self.ledger.db
            listens = isinstance(pg, PostgresDatabase) and self.config.scheduler.notify
            if self._listener is None and listens:  # other hosts' releases wake our queue
                assert isinstance(pg, PostgresDatabase)
                self._listener = FreedListener(pg.url, self._heard, pg.backend_pid)
            if self._heartbeat is None:
                self._heartbeat = Heartbeat(
                    Monitors(self.ledger),
                    self.monitor_kind,
                    self.config.monitor.heartbeat_seconds,
                    lost=self.wake,
                )
            beat = self._heartbeat
            mine = self._watched.get(thread_id) == allocation_id
        if mine and beat.holds(allocation_id):
            return
        holder = beat.claim(allocation_id, db)
        if holder is not None:
            raise MonitoredElsewhere(
                f"allocation {allocation_id} is monitored by {holder.describe(time.time())}; "
                "nothing changed (it carries the thread on)"
            )
        with self._lock:
            self._watched[thread_id] = allocation_id

    def stop_thread(self, thread_id: str) -> None:
        """The thread's run here was interrupted (Ctrl-C): the sleep of its node (a tick's,
        a queue poll's) ends now and the node stops there (check_watched), where the caller
        waited for the next tick, up to a minute, before it could stop."""
        with self._lock:
            self._stopping.add(thread_id)
            allocation_id = self._watched.get(thread_id)
        if allocation_id is not None:
            self.wake(allocation_id)

    def go_on(self, thread_id: str) -> None:
        """The interrupted run has stopped: the thread may run here again (a resume)."""
        with self._lock:
            self._stopping.discard(thread_id)

    def check_watched(self, allocation_id: str) -> None:
        """MonitoredElsewhere if another process adopted the allocation meanwhile (this one
        was silent longer than heartbeat_stale_seconds): its monitor here must stop.
        RunStopped if the run of its thread here was interrupted (stop_thread)."""
        if self._stopping:
            with self._lock:
                threads = [t for t, a in self._watched.items() if a == allocation_id]
                stopped = any(t in self._stopping for t in threads)
            if stopped:
                raise RunStopped(f"allocation {allocation_id}: its run was interrupted here")
        beat = self._heartbeat
        if beat is not None and not beat.holds(allocation_id):
            raise MonitoredElsewhere(
                f"allocation {allocation_id} was adopted by another "
                "process while this one was silent; it stops here"
            )

    def unwatch(self, allocation_id: str) -> None:
        if self._heartbeat is not None:
            with self._lock:
                for thread in [t for t, a in self._watched.items() if a == allocation_id]:
                    del self._watched[thread]
            self._heartbeat.release(allocation_id)

    def unwatch_thread(self, thread_id: str) -> None:
        """The thread stopped running here (it ended, waits for someone, or failed)."""
        with self._lock:
            aid = self._watched.get(thread_id)
        if aid is not None:
            self.unwatch(aid)

    def set_budget(self, project: str, budget_usd: float, *, by: str | None = None) -> list[Moved]:
        """Set a project's budget; the monitors of allocations whose deadline moved hear at
        once. Returns what moved, and from when to when."""
        check_budget(project, budget_usd)
        moved = self.ledger.set_budget(project, budget_usd, self.clock.now(), by or self.actor)
        self.moved(moved)
        return moved

    def reclaim(self, row: LedgerRow) -> list[Moved]:
        """`row` queued for a type of its own pool: the youngest loans on that type (fleet.
        borrowing) are asked to yield, after their notice, until enough GPUs come back."""
        moved = self.ledger.reclaim(row, self.clock.now(), self.placeable())
        self.moved(moved)
        return moved

    def preempt_for(self, row: LedgerRow) -> list[Moved]:
        """`row` queued in a max-min line (fleet.maxmin): the running allocations of its type
        that have received more service are asked to yield, after their notice."""
        moved = self.ledger.preempt_for(row, self.clock.now(), self.placeable())
        self.moved(moved)
        return moved

    def preempt(self, allocation_id: str, why: str, *, by: str | None = None) -> Moved:
        """Ask a running allocation to yield its GPUs (fleet.preemption); its monitor and the
        command running on it hear at once, and a scheduler's time limit follows."""
        moved = self.ledger.preempt(allocation_id, self.clock.now(), by or self.actor, why)
        self.moved([moved])
        return moved

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._heartbeat is not None:
            self._heartbeat.close()
        self.ledger.close()
        close = getattr(self.backend, "close", None)  # NVML's session; nothing to close for sims
        if close is not None:
            close()


def open_services(
    state_dir: str | Path | None = None,
    fleet: FleetConfig | str | Path | None = None,
    *,
    backend: str | BackendChoice | FleetBackend = "simulated",
    clock: Clock | None = None,
    council: Any = None,  # a council.voting.Council; None: the fleet file's
    create: bool = True,
    durable: bool = True,
    database: str | None = None,
    check: Callable[[FleetConfig], None] | None = None,
) -> Services:
    """Services over a backend named (or chosen: BackendChoice) or given ready-made. Without a
    fleet file, real GPUs get the host policy (fleet/data/host_fleet.toml), the simulated
    fleet the default fleet. `database`: a postgresql:// URL for the ledger (default: SQLite
    in the state directory). `check`: what must hold of the fleet before anything is
    created (the models it names, nodes.context.check_models). A state directory created
    here is taken away again, while empty, if opening fails after it."""
    choice = BackendChoice(backend) if isinstance(backend, str) else backend
    given_clock = clock is not None
    resolved: Resolved | None = None
    if isinstance(choice, BackendChoice):
        resolved = resolve(choice)
        hardware = resolved.hardware
    else:
        hardware = choice.hardware
    config = fleet if isinstance(fleet, FleetConfig) else load_fleet(fleet, hardware=hardware)
    if database is not None and not is_postgres(database):
        raise InvalidInput(
            f"--database must be a postgresql:// URL, not {database!r} "
            "(SQLite, the default, lives in --state-dir)"
        )
    if check is not None:
        check(config)
    directory, made = opened(
        state_dir or default_state_dir(), create=create, ledger_here=database is None
    )
    try:
        # a shared database's other hosts have state directories of their own: not known
        before = scale_before(directory) if database is None else None
        clock = clock or clock_of(directory, config.clock)
        if isinstance(choice, BackendChoice):
            assert resolved is not None
            fleet_backend = make_backend(resolved, choice, config, clock=clock, state_dir=directory)
        else:
            fleet_backend = choice
        config = placeable_fleet(config, fleet_backend)
        ledger = Ledger(database or directory / LEDGER, config, durable=durable)
        if not given_clock:  # one the caller gives (virtual time) is theirs to keep right
            _agree_on_time(ledger, directory, clock, config.clock.time_scale, before)
    except BaseException:
        if made:
            remove_new(directory)
        raise
    return Services(
        config=config,
        backend=fleet_backend,
        ledger=ledger,
        clock=clock,
        database=database,
        chosen_council=council,
        state_dir=directory,
        note=resolved.note if resolved else None,
    )


def _agree_on_time(
    ledger: Ledger, directory: Path, clock: Clock, scale: float, before: float | None
) -> None:
    """The ledger's time scale recorded and the sped-up clock's epoch shared, or the ledger
    refused at another scale (closed again, and no clock.json written for it)."""
    try:
        ledger.keep_time_scale(scale, before)
        share_epoch(directory, clock)
    except BaseException:
        ledger.close()
        raise
