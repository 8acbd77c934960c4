"""Max-min's preemptions (fleet.maxmin): a request waiting in a max-min line asks the running
allocations of its type that have received more service to yield, through Preempting._yield
(after their notice, audited, one transaction)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from fleet.budget import Moved
from fleet.ledger.placing import Placing
from fleet.ledger.preempting import Preempting
from fleet.ledger.rows import LedgerRow
from fleet.maxmin import Runner, levels, moves_up, service, sources, to_yield
from fleet.models import GPUInfo, Priority, Purpose, ReleaseReason
from fleet.placement import line_order, live
from fleet.preemption import DAY_S, yield_at
from fleet.scheduler import PRIORITY_FACTOR
from fleet.speeds import table_speed, unit_price
from fleet.sql import Conn


class _Mover(NamedTuple):
    """A running allocation that may move up (move_up), or that moved up (_moved_up: its
    `gpu_type` is then the type it came from)."""

    aid: str
    project: str
    gpu_type: str
    gpus: int
    notice: float
    deadline: float
    started: float
    workload: str | None
    resumes: str | None


class Levelling(Placing, Preempting):
    def preempt_for(self, row: LedgerRow, now: float, inventory: list[GPUInfo]) -> list[Moved]:
        """`row` waits in a max-min line (fleet.maxmin): where it is new work, what moved up
        to its type gives the GPUs back first (_moved_up: the move up was made where nobody
        waited for them); then the running allocations of its type that have received more
        service than those waiting are asked to yield, the most served first, as
        fleet.maxmin.to_yield says. Nothing under "fair-share"."""
        if not levels(self.config):
            return []
        t = row.gpu_type
        found = self.query(
            "SELECT id, project, request FROM allocations WHERE state='active' AND gpu_type=?",
            (t,),
        )
        requests = {r[0]: json.loads(r[2]) for r in found}  # each running request, as asked
        noticed = [r for r in found if requests[r[0]].get("notice_seconds") is not None]
        projects = sorted({r[1] for r in noticed})
        if not projects:
            return []  # nothing running there could yield without losing work
        settings = self.config.preemption
        with self.transaction(f"type:{t}", *(f"project:{p}" for p in projects)) as db:
            snap = self._line(db, t, row.project, now, inventory, money=False)
            supply, runners = self._runners(db, t, requests, now)
            asked: dict[str, int] = {}
            quantum = settings.min_run_minutes / 60.0
            line = line_order(snap, self.config, live(snap, self.config))
            short = sum(w.count for w in line) - len(snap.free) - supply
            moved, back = self._take_back(db, row, short, asked, now)
            supply += back
            runners = [r for r in runners if r.allocation_id not in {m.id for m in moved}]
            for runner, want in to_yield(line, len(snap.free) + supply, runners, quantum):
                why = (
                    f"{self.config.scheduler.policy}: {want.allocation_id} has received "
                    f"{want.attained:.2f} effective h of service, this {runner.attained:.2f} h"
                )
                held = (runner.allocation_id, runner.project, runner.deadline, runner.notice_s)
                moved += self._ask(db, held, why, asked, now)
            return moved

    def move_up(self, gpu_type: str, now: float, inventory: list[GPUInfo]) -> list[Moved]:
        """GPUs of `gpu_type` came free with nobody waiting for them (max-min only): running
        allocations on a slower type, of a pool that holds `gpu_type` too (or of any pool
        where the fleet lends), where it does their work for no more per unit
        (fleet.maxmin.moves_up), are asked to yield so that they
        go on there, sooner, as Gavel moves jobs between types: the least served first, as
        the lines serve (on the Philly trace, the longest leases first left the work that
        arrived while the faster type was full on the slower one, and two small projects
        slower than under slurm-cheapest), as many as the spare GPUs hold, each with a
        checkpoint notice, its minimum run done and more than that minimum of its lease left.
        Named types stay where they are."""
        if not levels(self.config):
            return []
        slower = sources(gpu_type, self.config)
        if not slower:
            return []
        marks = ",".join("?" * len(slower))
        settings = self.config.preemption
        candidates: list[_Mover] = []
        for row in self.query(
            "SELECT id, project, purpose, gpu_type, count, started_at, deadline, deadline_reason, "
            f"request, resumes FROM allocations WHERE state='active' AND gpu_type IN ({marks})",
            tuple(slower),
        ):
            aid, project, purpose, t, count, started, deadline, reason, request, resumes = row
            asked = json.loads(request)
            notice = asked.get("notice_seconds")
            workload = asked.get("workload")
            if (
                notice is None
                or asked.get("gpu_type") is not None
                or not moves_up(asked, Purpose(purpose), t, gpu_type, self.config)
                or reason == ReleaseReason.PREEMPTED.value
                or deadline - now < notice + settings.min_run_minutes * 60.0
                or yield_at(started, notice, now, settings) > now + notice
                or not self._pays_there(project, t, gpu_type, count, deadline - now, workload)
            ):
                continue
            candidates.append(
                _Mover(aid, project, t, count, notice, deadline, started, workload, resumes)
            )
        if not candidates:
            return []
        keys = [f"type:{t}" for t in sorted({gpu_type, *(c.gpu_type for c in candidates)})]
        keys += [f"project:{p}" for p in sorted({c.project for c in candidates})]
        with self.transaction(*keys) as db:
            spare = len(self._free(db, gpu_type, inventory))
            spare -= sum(q.count for q in self._queued(db, gpu_type).values())
            spare -= db.execute(  # already on their way, to here or elsewhere
                f"SELECT coalesce(sum(count), 0) FROM allocations WHERE state='active' "
                f"AND gpu_type IN ({marks}) AND deadline_reason=? AND deadline>?",
                (*slower, ReleaseReason.PREEMPTED.value, now),
            ).fetchone()[0]
            asked_of: dict[str, int] = {}
            moved = []
            served = {
                c.aid: self._attained(db, c.resumes, c.started, c.gpu_type, c.gpus, c.workload, now)
                for c in candidates
            }
            for aid, project, t, count, notice, deadline, *_ in sorted(
                candidates, key=lambda c: (served[c.aid], c.aid)
            ):
                if count > spare:
                    continue
                state, reason = db.execute(
                    "SELECT state, deadline_reason FROM allocations WHERE id=?", (aid,)
                ).fetchone()
                if state != "active" or reason == ReleaseReason.PREEMPTED.value:
                    continue
                why = (
                    f"{self.config.scheduler.policy}: {spare} {gpu_type} spare with nobody "
                    f"waiting, faster than its {t} and no dearer a unit of work"
                )
                asked = self._ask(db, (aid, project, deadline, notice), why, asked_of, now)
                spare -= count if asked else 0
                moved += asked
            return moved

    def _pays_there(
        self, project: str, here: str, there: str, count: int, left_s: float, workload: str | None
    ) -> bool:
        """Whether the project's budget pays for the rest of a lease (`left_s` on `here`) on
        `there`, where that costs more a unit of work (a dearer loan, `[preemption]
        borrow_dearer`): otherwise routing would send the requeued work back, or lease it
        only part of the way, and the move would cost its notice and restart for nothing.
        No budget, or no dearer: it does."""
        config = self.config
        if unit_price(config, workload, there) <= unit_price(config, workload, here):
            return True
        remaining = self.remaining_usd(project, running=False)
        if remaining is None:
            return True
        # the rest of the lease as units of work, priced there
        units = left_s / 3600.0 * table_speed(config, workload, here)
        return unit_price(config, workload, there) * count * units <= remaining

    def _take_back(
        self, db: Conn, row: LedgerRow, short: int, asked: dict[str, int], now: float
    ) -> tuple[list[Moved], int]:
        """Where `row` is new work (it resumes nothing) and its type's line is `short` of
        GPUs, the work that moved up to the type yields them back (_moved_up), the last to
        move first; returns what moved and how many GPUs come back."""
        new = db.execute("SELECT resumes FROM allocations WHERE id=?", (row.id,)).fetchone()
        if new is None or new[0] is not None:
            return [], 0
        moved: list[Moved] = []
        back = 0
        for up in self._moved_up(db, row.gpu_type, row.count, Priority(row.priority), now):
            if back >= short:
                break
            why = (
                f"{self.config.scheduler.policy}: new work {row.id} takes back the "
                f"{row.gpu_type} that this work moved up to from {up.gpu_type}"
            )
            asked_now = self._ask(db, (up.aid, up.project, up.deadline, up.notice), why, asked, now)
            back += up.gpus if asked_now else 0
            moved += asked_now
        return moved, back

    def _moved_up(
        self, db: Conn, gpu_type: str, most: int, priority: Priority, now: float
    ) -> list[_Mover]:
        """Running allocations of at most `most` GPUs and no higher priority than `priority`
        on `gpu_type` whose work moved up to it (they resume an allocation on a slower type),
        that could yield now (a checkpoint notice, their minimum run done by its end, not
        yielding yet): the last to move first. Their `gpu_type` is the type they came from."""
        if not levels(self.config):
            return []
        out = []
        for r in db.execute(
            "SELECT a.id, a.project, b.gpu_type, a.count, a.started_at, a.deadline, "
            "a.deadline_reason, a.request, a.resumes, a.priority "
            "FROM allocations a JOIN allocations b ON b.id = a.resumes "
            "WHERE a.state='active' AND a.gpu_type=? AND b.gpu_type<>? AND a.count<=? "
            "ORDER BY a.started_at DESC, a.id",
            (gpu_type, gpu_type, most),
        ):
            aid, project, came, count, started, deadline, reason, request, resumes, level = r
            asked = json.loads(request)
            notice, workload = asked.get("notice_seconds"), asked.get("workload")
            if (
                notice is None
                or PRIORITY_FACTOR[Priority(level)] > PRIORITY_FACTOR[priority]
                or reason == ReleaseReason.PREEMPTED.value
                or deadline <= now + notice
                or yield_at(started, notice, now, self.config.preemption) > now + notice
                or table_speed(self.config, workload, came)
                >= table_speed(self.config, workload, gpu_type)
            ):
                continue
            out.append(
                _Mover(aid, project, came, count, notice, deadline, started, workload, resumes)
            )
        return out

    def _given_back(
        self, db: Conn, gpu_type: str, count: int, free: int, priority: Priority, now: float
    ) -> float | None:
        """New work of `priority` for `count` GPUs of `gpu_type` starts, under a levelling
        policy, on the GPUs of work that moved up to the type once it yields them back after
        its notice (preempt_for): the move up was made where nobody waited for them."""
        back, at = free, 0.0
        for up in self._moved_up(db, gpu_type, count, priority, now):
            if back >= count:
                break
            back, at = back + up.gpus, max(at, up.notice)
        return at / 3600.0 if back >= count else None

    def _ask(
        self,
        db: Conn,
        held: tuple[str, str, float, float],
        why: str,
        asked: dict[str, int],
        now: float,
    ) -> list[Moved]:
        """Allocation (id, project, deadline, notice) is asked to yield after its notice
        (Preempting._yield, audited `preempt`), within the daily limit per project
        (_may_ask): what moved, nothing where the limit is reached."""
        if not self._may_ask(db, held[1], asked, now):
            return []
        return [self._yield(db, held, now + held[3], now, "gpu-agent", "preempt", why)]

    def _may_ask(self, db: Conn, project: str, asked: dict[str, int], now: float) -> bool:
        """Whether `project`'s allocations may be asked to yield once more within
        [preemption] max_per_project_per_day; counts the ask in `asked` (read once)."""
        if project not in asked:
            asked[project] = db.execute(
                "SELECT count(*) FROM audit WHERE action='preempt' AND project=? AND at>?",
                (project, now - DAY_S),
            ).fetchone()[0]
        if asked[project] >= self.config.preemption.max_per_project_per_day:
            return False
        asked[project] += 1
        return True

    def _attained(
        self,
        db: Conn,
        resumes: str | None,
        started: float,
        gpu_type: str,
        count: int,
        workload: str | None,
        now: float,
    ) -> float:
        """The effective service a running allocation's work has received by `now`: what the
        allocations it resumed held (Kept._served) and what it has held itself."""
        return self._served(db, resumes) + service(
            now - started, gpu_type, count, self.config, workload
        )

    def _runners(
        self, db: Conn, gpu_type: str, requests: dict[str, dict[str, Any]], now: float
    ) -> tuple[int, list[Runner]]:
        """The type's running allocations as max-min sees them: the GPUs that come back
        within their notice anyway (yielding, or ending), and those that could yield now
        (a checkpoint notice, their minimum run done by the end of it)."""
        supply, runners = 0, []
        for r in db.execute(
            "SELECT id, project, count, priority, started_at, deadline, deadline_reason, "
            "resumes FROM allocations WHERE state='active' AND gpu_type=?",
            (gpu_type,),
        ):
            aid, project, count, priority, started, deadline, reason, resumes = tuple(r)
            request = requests.get(aid, {})
            notice = request.get("notice_seconds")
            if notice is None:
                continue
            if reason == ReleaseReason.PREEMPTED.value or deadline <= now + notice:
                supply += count
            elif yield_at(started, notice, now, self.config.preemption) <= now + notice:
                workload = request.get("workload")
                served = self._attained(db, resumes, started, gpu_type, count, workload, now)
                runners.append(
                    Runner(aid, project, count, Priority(priority), served, notice, deadline)
                )
        return supply, runners
