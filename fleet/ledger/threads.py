"""Threads their callers named (`--thread-id`): the one request each was started for, and the
process that claimed it.

Two callers may name one thread at once. Each claims the name before its request runs; the
first wins, and the claim records its request: a placement on the thread is refused, in the
placement's own transaction, for any other request (`check_placeable`), so a second request on
the name never holds GPUs, whatever a race or a stalled process does with the thread's
checkpoints. Who may take a claim over is fleet.thread_claims' rule. A claim stays after its
request ran (its checkpoint then says the thread exists). Every thread id a caller passes is
claimed (`gpu-agent run` and the agent tools pass one), and a submission's even where it is
generated (it is shown before anything runs under it); only the id `request` generates is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.errors import InvalidInput
from fleet.ledger.store import Store
from fleet.sql import Conn

JOB = "job"  # the owner of a submitted thread: its job's lease says which worker runs it
REVOKED = ""  # the request id of a thread on which nothing may be placed (no request has it)


@dataclass(frozen=True)
class ThreadClaim:
    thread_id: str
    owner: str  # fleet.monitors.new_owner of the claimant, or JOB
    request_id: str  # the one request that may be placed on the thread
    at: float  # when it was claimed (wall clock)


def _claim(r: Any) -> ThreadClaim:
    return ThreadClaim(str(r[0]), str(r[1]), str(r[2]), float(r[3]))


CLAIM = "SELECT thread_id, owner, request_id, at FROM threads WHERE thread_id=?"


def check_placeable(db: Conn, thread_id: str, request_id: str) -> None:
    """InvalidInput, in a placement's transaction, where the thread was claimed for another
    request."""
    r = db.execute(CLAIM, (thread_id,)).fetchone()
    if r is None or str(r[2]) == request_id:
        return
    if str(r[2]) == REVOKED:
        raise InvalidInput(f"thread {thread_id!r} was given up by its caller; nothing was placed")
    raise InvalidInput(
        f"thread {thread_id!r} was started for request {r[2]}, not {request_id}; nothing was placed"
    )


def hand_to_job(db: Conn, thread_id: str, owner: str) -> None:
    """In a submission's transaction: the submitter's claim becomes its job's (InvalidInput if
    it was lost meanwhile)."""
    moved = db.execute(
        "UPDATE threads SET owner=? WHERE thread_id=? AND owner=?", (JOB, thread_id, owner)
    ).rowcount
    if not moved:
        raise InvalidInput(f"thread {thread_id!r} was taken by another request; nothing queued")


class Threads(Store):
    """The `threads` table. Its statements only matter while the claimant lives (after its
    first checkpoint the thread exists anyway), so they commit as liveness statements do
    (fleet.sql.Database.liveness: not synced on SQLite)."""

    def claim_thread(
        self, thread_id: str, owner: str, request_id: str, now: float
    ) -> tuple[bool, ThreadClaim | None]:
        """Claim a name nobody holds: (True, None) when won, else (False, the claim that holds
        it, or None where it was given back between the two statements: try again)."""
        won = self.db.liveness(
            "INSERT INTO threads (thread_id, owner, request_id, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (thread_id) DO NOTHING",
            (thread_id, owner, request_id, now),
        )
        return (True, None) if won else (False, self.thread_claim(thread_id))

    def thread_claim(self, thread_id: str) -> ThreadClaim | None:
        rows = self.query(CLAIM, (thread_id,))
        return _claim(rows[0]) if rows else None

    def take_thread(self, held: ThreadClaim, owner: str, request_id: str, now: float) -> bool:
        """Take over `held` (its claimant is gone); False if it changed meanwhile."""
        return bool(
            self.db.liveness(
                "UPDATE threads SET owner=?, request_id=?, at=? "
                "WHERE thread_id=? AND owner=? AND request_id=?",
                (owner, request_id, now, held.thread_id, held.owner, held.request_id),
            )
        )

    def give_thread_back(self, thread_id: str, owner: str) -> None:
        """Free a name whose request stopped before anything of it was kept (no checkpoint,
        no job): a retry of the same name must not find it held by a call that failed."""
        self.db.liveness("DELETE FROM threads WHERE thread_id=? AND owner=?", (thread_id, owner))

    def revoke_thread(self, thread_id: str) -> None:
        """No request may be placed on the thread from now on (check_placeable refuses every
        one): a start given up while its placement may still be in flight."""
        self.db.liveness("UPDATE threads SET request_id=? WHERE thread_id=?", (REVOKED, thread_id))
