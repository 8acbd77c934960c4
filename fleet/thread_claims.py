"""Who may start a thread its caller named: the rule over fleet.ledger.threads' claims.

A request (or a submission) on a named thread claims the name before anything runs. A name
already claimed is refused while its thread exists (resume it instead), while it is a
submitted job's, and while its claimant may still be starting it. It is taken over from a
claimant known to be dead: a process of this host (and PID namespace) that exited before its
thread's first checkpoint. Whether a claimant on another host (or in another PID namespace)
lives cannot be seen: its claim is taken over at once for the very same request (an id fixed
by the caller, or by a requeue that `gpu-agent run --resume` places again there), which alone
can be placed on the thread anyway, and for another request only once it is older than
UNSEEN_SECONDS with still no checkpoint. A decision takes milliseconds; a claimant stalled
that long (SIGSTOP, a paused VM) that wakes up places nothing (placement checks the claim's
request), though its decision's checkpoint may still land in the thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fleet.errors import InvalidInput, ThreadStarting
from fleet.ledger import Ledger
from fleet.ledger.threads import JOB, ThreadClaim
from fleet.monitors import describe_owner, gone_here, new_owner, seen_from_here

UNSEEN_SECONDS = 600.0  # a claim elsewhere without a checkpoint this long: its process is gone


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
    for _ in range(3):  # another taker was quicker between our statements: look again
        won, held = ledger.claim_thread(thread_id, owner, request_id, now)
        if won:
            return owner
        if held is None:  # given back meanwhile: the name is free again
            continue
        _refuse_unless_gone(held, request_id, started, now)
        if ledger.take_thread(held, owner, request_id, now):
            return owner
    raise ThreadStarting(f"thread {thread_id!r} is being started by another request; try again")


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
    unseen = not seen_from_here(held.owner)
    if unseen and (held.request_id == request_id or now - held.at > UNSEEN_SECONDS):
        return
    later = f", or after {UNSEEN_SECONDS:.0f} s if that process is gone" if unseen else ""
    raise ThreadStarting(
        f"thread {thread_id!r} is being started by {describe_owner(held.owner)} "
        f"(claimed {max(0.0, now - held.at):.0f} s ago); wait for it{later}, or name "
        "another thread"
    )
