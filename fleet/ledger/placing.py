"""Placing requests: reserve GPUs, queue the request or deny it (fleet.placement decides; the
ledger gives it the fleet as the request sees it), and what the lines and the running
allocations say about when a request could start."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import replace

from fleet.backfill import Ending, reserve
from fleet.ledger.releasing import Releasing
from fleet.ledger.rows import AUDIT, AuditEntry, LedgerRow, PlaceResult, allocation_id
from fleet.ledger.threads import check_placeable
from fleet.maxmin import levels
from fleet.models import GPUInfo, GPURequest, Priority, ReleaseReason, RouteDecision
from fleet.placement import Decision, Kind, Snapshot, Ticket, decide, in_line
from fleet.routing import lease_hours
from fleet.sql import Conn
from fleet.topology import Topology


class Placing(Releasing):
    """Placement and the lines."""

    def place(
        self,
        request: GPURequest,
        route: RouteDecision,
        thread_id: str,
        now: float,
        inventory: list[GPUInfo],
        topology: Topology,
        approval: AuditEntry | None = None,
        first: Callable[[Conn], None] | None = None,
        renew_hours: float | None = None,
    ) -> PlaceResult:
        """Reserve GPUs for the request, queue it, or deny it; idempotent per (thread, request),
        and never on a thread claimed for another request (fleet.ledger.threads). `approval`
        (who approved it) is written to the audit log when the request is first placed or
        queued. Admission is on expected cost (fleet.budget); a placement then fits the
        deadlines of the project's active allocations to its budget. `first` runs first
        in the same transaction (the claim of the allocation's monitor: one commit for both,
        and where it raises nothing is placed). `renew_hours`: the lease is held that many hours
        at a time where it asks for more (an approval's guardrails; Ledger.renew)."""
        aid = allocation_id(thread_id, request.request_id)
        was = self.query("SELECT gpu_type FROM allocations WHERE id=?", (aid,))
        types = {route.gpu_type, *(r[0] for r in was)}  # a queued request may move type
        keys = sorted(f"type:{t}" for t in types)
        with self.transaction(*keys, f"project:{request.project}") as db:
            check_placeable(db, thread_id, request.request_id)
            if first is not None:
                first(db)
            existing = self._get(db, aid)
            if existing is not None and existing.state == "active":
                return PlaceResult(Decision(Kind.PLACE, "already placed"), existing)
            if existing is not None and existing.state == "released":
                reason = existing.release_reason.value if existing.release_reason else "released"
                return PlaceResult(Decision(Kind.GONE, f"already ended ({reason})"), existing)
            enqueued_at = existing.enqueued_at if existing else now
            lease = lease_hours(route, request)
            me = Ticket(
                aid,
                request.project,
                route.gpu_type,
                request.count,
                request.priority,
                enqueued_at,
                now,
                lease,
                request.resumes is not None,
            )
            if levels(self.config) and request.resumes is not None:
                me = replace(me, attained=self._served(db, request.resumes))
            decision = decide(
                me,
                route.est_cost_usd * lease / route.est_hours,
                self._snapshot(db, me, now, inventory),
                self.config,
                topology,
                route.est_hours,
            )
            if existing is None:
                if decision.kind is Kind.DENY:
                    return PlaceResult(decision, None)
                if approval is not None:
                    db.execute(AUDIT, approval.row())
                db.execute(
                    "INSERT INTO allocations (id, thread_id, request_id, project, purpose, "
                    "priority, gpu_type, count, price_per_hour, hours, state, enqueued_at, "
                    "heartbeat_at, request, resumes) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?, 'queued', ?,?,?,?)",
                    (
                        aid,
                        thread_id,
                        request.request_id,
                        request.project,
                        request.purpose.value,
                        request.priority.value,
                        route.gpu_type,
                        request.count,
                        route.price_per_hour,
                        lease,
                        now,
                        now,
                        request.model_dump_json(),
                        request.resumes,
                    ),
                )
            if decision.kind is Kind.PLACE:
                # never before its GPUs were let go: a clock read before this transaction
                # waited for the lock may be older than the release that freed them
                marks = ",".join("?" * len(decision.gpus))
                freed = db.execute(
                    f"SELECT max(at) FROM freed WHERE gpu_uuid IN ({marks})",
                    [g.uuid for g in decision.gpus],
                ).fetchone()[0]
                now = max(now, freed) if freed is not None else now
                hours = decision.hours or lease
                term = renew_hours if renew_hours is not None and renew_hours < hours else None
                lease_end = now + (hours if term is None else term) * 3600.0
                held = db.execute("SELECT count(*) FROM holds").fetchone()[0]
                busy = min(1.0, held / len(inventory)) if inventory else 0.0
                db.executemany(
                    "INSERT INTO holds (gpu_uuid, allocation_id) VALUES (?, ?)",
                    [(g.uuid, aid) for g in decision.gpus],
                )
                if route.gpu_type in self._held:
                    self._held[route.gpu_type].update(g.uuid for g in decision.gpus)
                    self._free_of.pop(route.gpu_type, None)
                nodes = sorted({g.node for g in decision.gpus})
                if existing is not None and existing.gpu_type != route.gpu_type:
                    old_queue = self._queues.get(existing.gpu_type)
                    if old_queue is not None:
                        old_queue.pop(aid, None)
                db.execute(
                    "UPDATE allocations SET state='active', started_at=?, lease_end=?, "
                    "deadline=?, deadline_reason=?, heartbeat_at=?, gpu_ids=?, nodes=?, "
                    "busy_at_start=?, hours=?, gpu_type=?, price_per_hour=?, renew_hours=? "
                    "WHERE id=?",
                    (
                        now,
                        lease_end,
                        lease_end,
                        ReleaseReason.LEASE_EXPIRED.value,
                        now,
                        json.dumps([g.uuid for g in decision.gpus]),
                        json.dumps(nodes),
                        busy,
                        hours,
                        route.gpu_type,
                        route.price_per_hour,
                        term,
                        aid,
                    ),
                )
                self._track(db, aid)
                moved = self._fit_deadlines(db, request.project, now)
                return PlaceResult(decision, self._get(db, aid), [m for m in moved if m.id != aid])
            if decision.kind is Kind.QUEUE:
                db.execute("UPDATE allocations SET heartbeat_at=? WHERE id=?", (now, aid))
                self._track(db, aid)
            else:
                self._close(db, aid, ReleaseReason.CANCELLED, now, 0.0)
            return PlaceResult(decision, self._get(db, aid))

    def _snapshot(self, db: Conn, me: Ticket, now: float, inventory: list[GPUInfo]) -> Snapshot:
        return self._line(db, me.gpu_type, me.project, now, inventory, me.allocation_id, me.count)

    def _line(
        self,
        db: Conn,
        gpu_type: str,
        project: str,
        now: float,
        inventory: list[GPUInfo],
        leave_out: str = "",
        count: int = 0,
        money: bool = True,
    ) -> Snapshot:
        """The fleet as a request of `project` for `gpu_type` (`count` GPUs) sees it: free
        GPUs, the line (without `leave_out`), when held GPUs come back, usage and (unless
        `money` is False: who is in line only) the project's money."""
        waiting = [t for t in self._queued(db, gpu_type).values() if t.allocation_id != leave_out]
        free = self._free(db, gpu_type, inventory)
        # only a line that cannot all start now needs a reservation, hence the endings
        short = count + sum(t.count for t in waiting) > len(free)
        # a request alone in its line needs no fair order, and without a quota no holdings
        alone = not waiting and self.config.quotas.max_gpus(project) is None
        active_gpus, usage = ({}, {}) if alone else self._active(db, now)
        budget = self._budget(db, project) if money else None
        expected, factor = self._expected(db, project) if budget is not None else (0.0, 1.0)
        return Snapshot(
            now=now,
            free=free,
            waiting=waiting,
            endings=self._endings(db, gpu_type, inventory) if short else [],
            usage=usage,
            active_gpus=active_gpus,
            budget_usd=budget,
            spent_usd=self._spent(db, project) if money else 0.0,
            committed_usd=expected,
            usage_factor=factor,
        )

    def _endings(self, db: Conn, gpu_type: str, inventory: list[GPUInfo]) -> list[Ending]:
        """When the type's active allocations let their GPUs go at the latest (their
        deadlines), counting the GPUs placement may use again."""
        runs = self._running(db)
        fresh = self._usable_of is not None and self._usable_of[0] is inventory
        if (
            runs is not None
            and fresh
            and runs.endings.get(gpu_type, (-1, []))[0] == runs.changes[gpu_type]
        ):  # no allocation of the type started, ended or moved
            return runs.endings[gpu_type][1]
        if self._usable_of is None or self._usable_of[0] is not inventory:
            self._usable_of = (inventory, {})
        usable, known = self._usable_of[1].get(gpu_type) or (
            {g.uuid for g in self._of_type(inventory, gpu_type)},
            {},
        )
        counts: dict[str, int] = {}  # the active ones only: the next call reuses them
        out = []
        rows = (
            db.execute(
                "SELECT id, deadline, gpu_ids FROM allocations WHERE state='active' AND gpu_type=?",
                (gpu_type,),
            )
            if runs is None
            else (
                (r.active.id, r.active.deadline, r.gpu_ids)
                for r in runs.of_type.get(gpu_type, {}).values()
            )
        )
        for aid, deadline, gpu_ids in rows:
            gpus = known.get(aid)
            if gpus is None:  # an allocation's GPUs never change: decoded once
                gpus = sum(g in usable for g in json.loads(gpu_ids))
            counts[aid] = gpus
            if gpus:
                out.append(Ending(deadline, gpus))
        self._usable_of[1][gpu_type] = (usable, counts)
        if runs is not None:
            runs.endings[gpu_type] = (runs.changes[gpu_type], out)
        return out

    def placeable(self, freed: LedgerRow, now: float, inventory: list[GPUInfo]) -> list[str]:
        """Ids of the queued requests that `freed`'s release may let start: those of its
        type's line that `placement.in_line` starts now (backfill included), and, where the
        project has a quota, the project's own queued requests."""
        with self.reading() as db:
            ids = []
            if self._queued(db, freed.gpu_type):
                line = in_line(
                    self._line(db, freed.gpu_type, freed.project, now, inventory, money=False),
                    self.config,
                )
                ids = [t.allocation_id for t in line]
            if self.config.quotas.max_gpus(freed.project) is not None:
                ids += [
                    r["id"]
                    for r in db.execute(
                        "SELECT id FROM allocations WHERE state='queued' AND project=? "
                        "AND gpu_type<>? ORDER BY enqueued_at, id",
                        (freed.project, freed.gpu_type),
                    )
                ]
        return ids

    def starts_in_hours(
        self,
        types: Iterable[str],
        count: int,
        now: float,
        inventory: list[GPUInfo],
        *,
        new_work: Priority | None = None,
    ) -> dict[str, float]:
        """Per type, at the latest how long until a new request for `count` GPUs could
        start (0: now): when running allocations have let enough GPUs go by their deadlines.
        Infinite (unknown) while others wait for the type: the fair queue orders them and
        may put them ahead, so no bound holds (waiting behind a line was what made routing
        to a full type cost queueing time on the Philly trace). `new_work`, the priority of a
        request that resumes nothing: under a levelling policy, work of no higher priority
        that moved up to the type gives it back after its notice (Levelling._given_back)."""
        with self.reading() as db:
            return {t: self._starts_in(db, t, count, now, inventory, new_work) for t in types}

    def _starts_in(
        self,
        db: Conn,
        gpu_type: str,
        count: int,
        now: float,
        inventory: list[GPUInfo],
        new_work: Priority | None = None,
    ) -> float:
        free = len(self._free(db, gpu_type, inventory))
        queued = sum(t.count for t in self._queued(db, gpu_type).values())
        if free - queued >= count:
            return 0.0
        if queued:
            return math.inf
        back = (
            None if new_work is None else self._given_back(db, gpu_type, count, free, new_work, now)
        )
        if back is not None:
            return back
        at = reserve(count, free, self._endings(db, gpu_type, inventory), now).at
        return (at - now) / 3600.0

    def _given_back(
        self, db: Conn, gpu_type: str, count: int, free: int, priority: Priority, now: float
    ) -> float | None:
        """Hours until new work of `priority` for `count` GPUs of `gpu_type` could start on
        what running work gives back to it (Levelling); None: nothing is given back."""
        return None

    def held_by_type(self) -> dict[str, int]:
        """GPUs held now, per GPU type."""
        return {
            r["gpu_type"]: int(r["n"])
            for r in self.query(
                "SELECT gpu_type, sum(count) AS n FROM allocations WHERE state='active' "
                "GROUP BY gpu_type"
            )
        }
