"""What `gpu-agent run` must outlive its own process for (graph.run_command): per
allocation, the `run` process in charge, the command, the requeues left, the command's process
group, and the allocation that resumes this one once it was yielded or lost. A `run
--allocation` is recorded too (given: no requeue, nothing to resume), so that whoever ends the
allocation after it died stops its command (fleet.left_running).

A requeue is made exactly once, whoever asks first (the `run` that started the command, or a
`gpu-agent run --resume` after it died): the successor is written in the same transaction as
its own row and the audit entry, only where none was, and a second asker is handed the one
that was. Its id is fixed by the allocation it resumes (successor_thread), so a successor
whose asker died before placing it is placed under the same id by whoever carries on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fleet.errors import InvalidInput
from fleet.ledger.rows import AUDIT, allocation_id
from fleet.ledger.store import Store
from fleet.models import GPURequest, utc
from fleet.sql import Conn

RUN = (
    "SELECT allocation_id, owner, command, requeues_left, pgid, noticed_at, successor, given "
    "FROM runs"
)


@dataclass(frozen=True)
class RunRecord:
    """One allocation of a `run`: who is in charge, and what it runs there."""

    allocation_id: str
    owner: str  # fleet.monitors.new_owner of the `run` process in charge
    command: dict[str, Any]  # argv, cwd, grace_s, notice_s, notice_signal (graph.run_command)
    requeues_left: int
    pgid: int | None  # the command's process group on the owner's host, once started
    noticed_at: float | None  # when the command was sent its checkpoint notice here
    successor: str | None  # the allocation that resumes this one (set once)
    given: bool  # `run --allocation`: left to its owner, nothing to resume or requeue


def _record(r: Any) -> RunRecord:
    return RunRecord(
        str(r[0]),
        str(r[1]),
        json.loads(r[2]),
        int(r[3]),
        None if r[4] is None else int(r[4]),
        None if r[5] is None else float(r[5]),
        None if r[6] is None else str(r[6]),
        bool(r[7]),
    )


def successor_thread(aid: str) -> str:
    """The thread (and request id) of the request that resumes allocation `aid`: fixed, so
    that every claimant places the same one (its allocation id follows, rows.allocation_id)."""
    return f"requeue-{aid}"


def successor_id(aid: str) -> str:
    thread = successor_thread(aid)
    return allocation_id(thread, thread)


MAX_REQUEUES = 100  # what `run --requeue N` may ask: a count, not a number of any size


class Runs(Store):
    """The `runs` table."""

    def record_run(self, aid: str, owner: str, command: dict[str, Any], requeues: int) -> None:
        """`owner` runs `command` on allocation `aid` and may requeue it `requeues` times
        (recorded once: a second call changes nothing)."""
        with self.transaction(f"run:{aid}") as db:
            db.execute(
                "INSERT INTO runs (allocation_id, owner, command, requeues_left) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (allocation_id) DO NOTHING",
                (aid, owner, json.dumps(command), requeues),
            )

    def record_given(
        self, aid: str, owner: str, command: dict[str, Any], replacing: str | None
    ) -> bool:
        """`owner` runs `command` on allocation `aid`, which it was given (`run --allocation`):
        recorded where `aid` has no record, or in place of the given run `replacing` (whose
        command is over); False where another run took the record first."""
        with self.transaction(f"run:{aid}") as db:
            if replacing is None:
                sql = (
                    "INSERT INTO runs (allocation_id, owner, command, requeues_left, given) "
                    "VALUES (?, ?, ?, 0, 1) ON CONFLICT (allocation_id) DO NOTHING"
                )
                args: tuple[object, ...] = (aid, owner, json.dumps(command))
            else:
                sql = (
                    "UPDATE runs SET owner=?, command=?, pgid=NULL, noticed_at=NULL "
                    "WHERE allocation_id=? AND owner=? AND given=1"
                )
                args = (owner, json.dumps(command), aid, replacing)
            return bool(db.execute(sql, args).rowcount)

    def restore_run(self, aid: str, owner: str, was: RunRecord | None) -> None:
        """`owner`'s command never started: `aid`'s record is what it was (`was`; None: none),
        where `owner` holds it (record_given made or replaced it)."""
        with self.transaction(f"run:{aid}") as db:
            if was is None:
                db.execute("DELETE FROM runs WHERE allocation_id=? AND owner=?", (aid, owner))
                return
            db.execute(
                "UPDATE runs SET owner=?, command=?, pgid=?, noticed_at=? "
                "WHERE allocation_id=? AND owner=?",
                (was.owner, json.dumps(was.command), was.pgid, was.noticed_at, aid, owner),
            )

    def run_record(self, aid: str) -> RunRecord | None:
        rows = self.query(f"{RUN} WHERE allocation_id=?", (aid,))
        return _record(rows[0]) if rows else None

    def run_chain(self, aid: str) -> list[RunRecord]:
        """The allocations of the run that allocation `aid` belongs to, first to newest
        (each the successor of the one before); empty when `aid` is none of a `run
        --requeue`."""
        record = self.run_record(aid)
        if record is None:
            return []
        chain = [record]
        while found := self.query(f"{RUN} WHERE successor=?", (chain[0].allocation_id,)):
            chain.insert(0, _record(found[0]))
        while chain[-1].successor is not None:
            later = self.run_record(chain[-1].successor)
            assert later is not None  # written in one transaction with the link
            chain.append(later)
        return chain

    def _set(self, sql: str, args: tuple[object, ...]) -> int:
        with self.transaction(f"run:{args[-1]}") as db:
            return int(db.execute(sql, args).rowcount)

    def take_over(self, aid: str, was: str, owner: str) -> bool:
        """`owner` is in charge of allocation `aid`'s command from now on, where `was` still
        is (its process died); False where someone else took it over first."""
        return bool(
            self._set(
                "UPDATE runs SET owner=? WHERE owner=? AND allocation_id=?", (owner, was, aid)
            )
        )

    def command_started(self, aid: str, owner: str, pgid: int) -> None:
        self._set("UPDATE runs SET pgid=? WHERE owner=? AND allocation_id=?", (pgid, owner, aid))

    def noticed(self, aid: str, owner: str, at: float) -> None:
        """The command on `aid` was sent its checkpoint notice: not again by a successor."""
        self._set(
            "UPDATE runs SET noticed_at=? WHERE owner=? AND allocation_id=?", (at, owner, aid)
        )

    def requeue(self, aid: str, owner: str, now: float, why: str) -> str:
        """The allocation that resumes `aid`'s work: made here where none was (its row,
        owned by `owner`, one requeue fewer, and the audit entry, in one transaction), else
        the one already made, whoever made it. Refused where no requeue is left."""
        successor = successor_id(aid)
        with self.transaction(f"run:{aid}") as db:
            found = db.execute(f"{RUN} WHERE allocation_id=?", (aid,)).fetchone()
            if found is None:
                raise InvalidInput(f"allocation {aid} was not started by `gpu-agent run --requeue`")
            record = _record(found)
            if record.successor is not None:
                return record.successor
            if record.requeues_left <= 0:
                raise InvalidInput(f"allocation {aid}'s command has no requeue left")
            db.execute(
                "INSERT INTO runs (allocation_id, owner, command, requeues_left) "
                "VALUES (?, ?, ?, ?)",
                (successor, owner, json.dumps(record.command), record.requeues_left - 1),
            )
            db.execute(
                "UPDATE runs SET successor=? WHERE allocation_id=? AND successor IS NULL",
                (successor, aid),
            )
            self._audit_requeue(db, aid, successor, now, why, record.requeues_left - 1)
            return successor

    def _audit_requeue(
        self, db: Conn, aid: str, successor: str, now: float, why: str, left: int
    ) -> None:
        project = db.execute("SELECT project FROM allocations WHERE id=?", (aid,)).fetchone()
        detail = (
            f"{why}: its command goes on as {successor}, asked for at "
            f"{utc(now):%Y-%m-%d %H:%M:%S} UTC ({left} requeue(s) left)"
        )
        db.execute(
            AUDIT,
            (f"requeue:{aid}", now, "gpu-agent run", "requeue", project[0], aid, detail),
        )

    def successor_request(self, aid: str) -> GPURequest:
        """The request that resumes allocation `aid`: its own, resuming it, under the fixed
        id (successor_thread)."""
        rows = self.query("SELECT request FROM allocations WHERE id=?", (aid,))
        if not rows:
            raise InvalidInput(f"no allocation {aid!r}")
        request = GPURequest.model_validate_json(rows[0][0])
        return request.model_copy(update={"resumes": aid, "request_id": successor_thread(aid)})
