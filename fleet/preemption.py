"""When a running allocation may be asked to yield its GPUs, and when it yields.

A preemption must lose no work. Only an allocation whose request carries a checkpoint notice
(`GPURequest.notice_seconds`: `gpu-agent run --notice`, which also carries it as Slurm's
`--signal`) may be asked, and it yields no sooner than that notice after the ask, so that its
work checkpoints first; `gpu-agent run --requeue` then asks again with a request that resumes it
(queued ahead of new work of its standing; in a levelling line, fleet.maxmin, by the service
its work received), on the same type or another. So that nobody
thrashes, it has run at least `min_run_minutes` when it yields, and a project's allocations
are asked at most `max_per_project_per_day` times in any 24 hours (fleet.config's
[preemption]). The yield is its lease's new end and deadline, in the ledger, reason
`preempted`: the monitor releases it there like any lease, charged once for what it held.
"""

from __future__ import annotations

from fleet.config import PreemptionSettings

DAY_S = 86400.0


def yield_at(started_at: float, notice_s: float, now: float, settings: PreemptionSettings) -> float:
    """When an allocation asked to yield at `now` gives its GPUs back: after its notice, and
    not before it has run `min_run_minutes`."""
    return max(now + notice_s, started_at + settings.min_run_minutes * 60.0)


def refusal(
    allocation_id: str,
    project: str,
    notice_s: float | None,
    yields_today: int,
    settings: PreemptionSettings,
) -> str | None:
    """Why an active allocation may not be asked to yield (None: it may). `yields_today`: how
    often its project's allocations were asked in the last 24 hours."""
    if notice_s is None:
        return (
            f"allocation {allocation_id} has no checkpoint notice (`gpu-agent run --notice`): "
            "preempting it would lose its work"
        )
    if yields_today >= settings.max_per_project_per_day:
        return (
            f"{project}'s allocations were asked to yield {yields_today} time(s) in the last "
            f"24 h, the most [preemption] max_per_project_per_day allows"
        )
    return None
