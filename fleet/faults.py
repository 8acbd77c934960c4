"""Fault injection for the reliability tests: the process dies (SIGKILL), raises or stalls at a
point.

`GPU_AGENT_FAULT=POINT` kills the process when it reaches POINT; `POINT,raise` raises
InjectedFault there instead; `POINT,stop` stops the process there (SIGSTOP: a stalled
process, which the test continues or kills). Points are `before:NODE` and `after:NODE` for
every node of the graph (graph.builder wraps the nodes when the variable is set as it builds
them) and the places inside the side-effect nodes where a death would split what they do
(INSIDE). Unset, a check is one environment lookup and the nodes are not wrapped at all.
"""

from __future__ import annotations

import os
import signal

ENV = "GPU_AGENT_FAULT"
INSIDE = (
    "allocate:placed",  # the ledger placed or queued it; nothing returned to the graph yet
    "monitor:heartbeat",  # a tick's heartbeat and utilisation totals written
    "deallocate:released",  # released and charged in the ledger; the backend not yet reset
    "deallocate:freed",  # the backend's reservation freed too
)
# `gpu-agent run`: its GPUs placed, its command not yet recorded or started (graph.run_command)
RUN_PLACED = "run:placed"
# `gpu-agent run`: its command started, not yet recorded or watched
RUN_STARTED = "run:started"
# Reached only where a cluster's scheduler holds the GPUs (Slurm: tests/test_slurm.py): the job
# is submitted and runs, the ledger has not recorded it, the graph has not checkpointed.
SUBMITTED = "allocate:submitted"


class InjectedFault(RuntimeError):
    """Raised at an armed point (`POINT,raise`)."""


def armed() -> bool:
    return bool(os.environ.get(ENV))


def fault(point: str) -> None:
    """Die, raise or stall here if GPU_AGENT_FAULT names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, action = spec.partition(",")
    if where != point:
        return
    if action == "raise":
        raise InjectedFault(f"fault injected at {point}")
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    os.kill(os.getpid(), signal.SIGKILL)
