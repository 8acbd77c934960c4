"""Asking a running allocation to yield its GPUs (fleet.preemption): its lease's new end and
deadline, and the audit entry that says who asked and why, in one transaction."""

from __future__ import annotations

import json
import uuid

from fleet.budget import Moved
from fleet.errors import InvalidInput
from fleet.ledger.budgets import Budgets
from fleet.ledger.rows import AUDIT
from fleet.models import ReleaseReason, utc
from fleet.preemption import DAY_S, refusal, yield_at


class Preempting(Budgets):
    def preempt(self, aid: str, now: float, by: str, why: str) -> Moved:
        """Ask active allocation `aid` to yield at fleet.preemption.yield_at: its lease ends
        there (a budget that cuts sooner still does), reason `preempted`. Refused, changing
        nothing, where fleet.preemption.refusal says so or it ends by then anyway."""
        found = self.query("SELECT gpu_type, project FROM allocations WHERE id=?", (aid,))
        if not found:
            raise InvalidInput(f"no allocation {aid!r}")
        gpu_type, project = found[0][0], found[0][1]
        with self.transaction(f"type:{gpu_type}", f"project:{project}") as db:
            state, started, deadline, reason, request = db.execute(
                "SELECT state, started_at, deadline, deadline_reason, request FROM allocations "
                "WHERE id=?",
                (aid,),
            ).fetchone()
            if state != "active":
                raise InvalidInput(f"allocation {aid} is {state}, not running: nothing to yield")
            notice = json.loads(request).get("notice_seconds")
            asked = db.execute(
                "SELECT count(*) FROM audit WHERE action='preempt' AND project=? AND at>?",
                (project, now - DAY_S),
            ).fetchone()[0]
            refused = refusal(aid, project, notice, int(asked), self.config.preemption)
            if refused is not None:
                raise InvalidInput(refused)
            at = yield_at(started, notice, now, self.config.preemption)
            if deadline <= at:
                raise InvalidInput(
                    f"allocation {aid} ends at {utc(deadline):%Y-%m-%d %H:%M:%S} UTC ({reason}), "
                    f"no later than it could yield ({utc(at):%H:%M:%S})"
                )
            db.execute(
                "UPDATE allocations SET lease_end=?, deadline=?, deadline_reason=? WHERE id=?",
                (at, at, ReleaseReason.PREEMPTED.value, aid),
            )
            self._track(db, aid)
            db.execute(
                AUDIT,
                (
                    f"preempt:{aid}:{now!r}:{uuid.uuid4().hex[:8]}",
                    now,
                    by,
                    "preempt",
                    project,
                    aid,
                    f"yields at {utc(at):%Y-%m-%d %H:%M:%S} UTC after its {notice:g} s "
                    f"checkpoint notice: {why}",
                ),
            )
            return Moved(aid, deadline, at)
