"""Which guardrails an approval carries, chosen from the council's predicted waste.

Where a fleet opts in (`[council] guard_share`), between the human band and plain approval
the council approves with guardrails rather than ask a human or deny: the allocation is
released after `guard_idle_minutes` idle where nothing says its work goes on (no `gpu-agent
run` command running; sooner where `guard_idle_release = "stream"` and the allocation's
utilisation stream reads as ended; a pause the work came back from still stretches it,
fleet.monitoring.idle_limit_s; work that an idle release already ended, asking again with
`resumes`, is spared it, so that a pause that cost the work once does not cost it twice),
and where the predicted waste lies in the upper half of the guarded band, it is also routed
by price per unit of work even where the request asked for speed, so that what it may
waste costs the least. Where the fleet sets `guard_lease_hours`, it also holds its GPUs a
term at a time, renewed while they work (fleet.monitoring.renews): its budget commits one
term, and a command that hangs with its GPUs idle loses them at the term's end. A denial
is for requests below the human band, whose expected waste no guardrail would bound.
"""

from __future__ import annotations

from fleet.config import CouncilSettings
from fleet.models import Guardrails


def guardrails(p: float, settings: CouncilSettings, at_risk: float | None = None) -> Guardrails:
    """The guardrails for an approval at council probability `p`: a cheaper type too where
    `p` lies below the middle of the guarded band (guard to approve threshold); `at_risk`,
    the GPU-hours at risk where the fleet guards by them; the fleet's term, which placement
    applies only where the lease placed is longer (nodes.allocate.term_hours)."""
    guard = settings.guard()
    _, approve = settings.band()
    return Guardrails(
        predicted_waste=1.0 - p,
        idle_minutes=settings.guard_idle_minutes,
        cheaper_type=p < (guard + approve) / 2,
        at_risk_gpu_hours=at_risk,
        lease_hours=settings.guard_lease_hours,
        idle_stream=settings.guard_idle_release == "stream",
    )
