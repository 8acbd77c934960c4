"""Who may start a thread its caller named: the rule over fleet.ledger.threads' claims.

A request (or a submission) on a named thread claims the name before anything runs. A name
already claimed is refused while its thread exists (resume it instead), while it is a
submitted job's, and while its claimant may still be starting it. It is taken over only from a
claimant known to be dead: a process of this host (and PID namespace) that exited before its
thread's first checkpoint. Age alone never frees a name: a claimant stalled on another host
(SIGSTOP, a paused VM) would wake up and write its decision into the thread beside the new
one, so a name whose claimant died on another host stays refused, saying who holds it,
unless the claim is for the very same request (its id fixed by the caller, or by a requeue:
`gpu-agent run --resume` on another host): then a claimant there is not waited for, since
only that request can be placed on the thread anyway, as when two processes resume one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fleet.errors import InvalidInput
from fleet.ledger import Ledger
from fleet.ledger.threads import JOB, ThreadClaim
from fleet.monitors import describe_owner, gone_here, new_owner, seen_from_here


def claim(
    ledger: Ledger,
    thread_id: str,
    request_id: str,
    kind: str,
    started: Callable[[], bool],
    now: float | None = None,
) -> str:
    """Claim `thread_id` for the request: the claim's owner, or InvalidInput saying who
    holds the name. `started`: whether the thread has a checkpoint."""
    owner = new_owner(kind)
    now = time.time() if now is None else now
    for _ in range(2):  # another taker was quicker between our reads: look again
        held = ledger.claim_thread(thread_id, owner, request_id, now)
        if held is None:
            return owner
        _refuse_unless_gone(held, request_id, started, now)
        if ledger.take_thread(held, owner, request_id, now):
            return owner
    raise InvalidInput(f"thread {thread_id!r} is being started by another request; try again")


def _refuse_unless_gone(
    held: ThreadClaim, request_id: str, started: Callable[[], bool], now: float
) -> None:
    thread_id = held.thread_id
    if started():
        raise InvalidInput(f"thread {thread_id!r} already exists; resume it instead")
    if held.owner == JOB:
        raise InvalidInput(f"thread {thread_id!r} was already submitted")
    if gone_here(held.owner):
        return
    if held.request_id == request_id and not seen_from_here(held.owner):
        return
    raise InvalidInput(
        f"thread {thread_id!r} is being started by {describe_owner(held.owner)} "
        f"(claimed {max(0.0, now - held.at):.0f} s ago); wait for it, or, if that process "
        "is gone, name another thread"
    )
