"""What a caller gets back: where a request's thread stands, and the errors it maps to."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import Denied, GPUAgentError, InvalidInput, NotPlaced
from fleet.ledger.rows import NOT_RENEWED
from fleet.models import (
    Allocation,
    CouncilDecision,
    Event,
    GPURequest,
    Guardrails,
    HumanDecision,
    Release,
    ReleaseReason,
    RouteDecision,
    Status,
)


class PendingReview(GPUAgentError):
    """The council was split; a human must approve or deny the thread."""

    exit_code = 0

    def __init__(self, thread_id: str, reason: str) -> None:
        super().__init__(
            f"{reason}; decide with: gpu-agent resume {shlex.quote(thread_id)} "
            "--approve (or --deny)"
        )
        self.thread_id = thread_id


@dataclass(frozen=True)
class RequestOutcome:
    """Where a request's thread stands: the CLI prints this, with --json as `to_json()`."""

    thread_id: str
    status: Status
    reason: str
    cost_usd: float
    allocation: Allocation | None = None
    council: CouncilDecision | None = None
    route: RouteDecision | None = None
    release: Release | None = None
    events: list[Event] = field(default_factory=list)
    next: tuple[str, ...] = ()
    request: GPURequest | None = None  # as validated (None before validation)
    human: HumanDecision | None = None  # the review's decision, where a human decided

    def guardrails(self) -> tuple[str, Guardrails] | None:
        """The council's guardrails and where they stand, as the CLI and the page say it:
        "if approved" (waiting for a human), "approved", or "dropped by NAME" (the human who
        approved without them); None where it chose none or the request was denied."""
        rails = self.council.guardrails if self.council is not None else None
        if rails is None or self.status is Status.DENIED:
            return None
        if self.allocation is not None and rails.lease_hours is not None:  # as placed: a
            term = self.allocation.term_hours  # term where the lease is longer (allocate)
            rails = rails.model_copy(update={"lease_hours": term})
        if self.status is Status.PENDING_REVIEW:
            return "if approved", rails
        human = self.human
        if human is not None and human.approve and not human.guardrails:
            return f"dropped by {human.by}", rails
        return "approved", rails

    def to_json(self) -> dict[str, Any]:
        a = self.allocation
        return {
            "thread_id": self.thread_id,
            "status": self.status.value,
            "reason": self.reason,
            "cost_usd": round(self.cost_usd, 6),
            "allocation": None
            if a is None
            else {
                "id": a.id,
                "project": a.project,
                "gpu_ids": a.gpu_ids,
                "node": a.node,
                "gpu_type": a.gpu_type,
                "count": a.count,
                "cuda_visible_devices": a.cuda_visible_devices,
                "started_at": a.started_at.isoformat(),
                "lease_end": a.lease_end.isoformat(),
                "price_per_hour": a.price_per_hour,
                # held a term at a time (the council's guardrails): the term and the end
                # it renews to while its GPUs work; null: the lease runs whole
                "term_hours": a.term_hours,
                "renewed_up_to": None if a.renewed_up_to is None else a.renewed_up_to.isoformat(),
                # where the ledger renews or lengthens its lease no more: "preempted" or
                # "not-renewed" (its term let end); null: the lease stands as placed
                "lease_cut": a.lease_cut,
            },
            "release": None if self.release is None else self.release.model_dump(mode="json"),
            "council": None if self.council is None else self.council.model_dump(mode="json"),
            "route": None if self.route is None else self.route.model_dump(mode="json"),
            "events": [e.model_dump(mode="json") for e in self.events],
            "next": list(self.next),
        }

    def raise_for_status(self) -> None:
        """Turn an outcome without GPUs into the error an API caller expects."""
        if self.status is Status.INVALID:
            raise InvalidInput(self.reason)
        if self.status is Status.DENIED:
            raise Denied(self.reason)
        if self.status is Status.TIMED_OUT:
            raise NotPlaced(self.reason)
        if self.status is Status.PENDING_REVIEW:
            raise PendingReview(self.thread_id, self.reason)


# why the ledger ends a lease sooner than placed or renewed, and renews it no more
# (Allocation.lease_cut), as lease_note says it
LEASE_CUT = {
    ReleaseReason.PREEMPTED.value: "preempted: it yields its GPUs at the end shown, after its "
    "checkpoint notice, and is renewed no more",
    NOT_RENEWED: "its term not renewed (its GPUs sat idle all of it): the lease ends with it",
    ReleaseReason.EXPLICIT.value: "released on request: its command under gpu-agent run stops "
    "first, then its GPUs go back",
}


def lease_note(outcome: RequestOutcome) -> str | None:
    """Why the lease is not the hours asked, when it is not: it is held a term at a time (an
    approval's guardrails), the project's budget shortened it (fleet.budget.admitted_hours),
    or the request's hours are time on its reference type (fleet.routing) and a slower type
    takes longer over the same work (a faster type's lease is the hours asked all the
    same)."""
    a, req = outcome.allocation, outcome.request
    if a is None or req is None:
        return None
    if a.lease_cut is not None:  # what follows explains a lease as placed or renewed
        return LEASE_CUT[a.lease_cut]
    lease = (a.lease_end - a.started_at).total_seconds() / 3600.0
    route = outcome.route
    on_type = (route.asked_hours or route.est_hours) if route is not None else None
    if a.term_hours is not None and a.renewed_up_to is not None:
        up_to = (a.renewed_up_to - a.started_at).total_seconds() / 3600.0
        term = round(a.term_hours, 2)
        return f"held {term:g} h at a time, renewed while its GPUs work, up to " + (
            f"{up_to:.2f} h (the council's guardrails)"
            if on_type is None or up_to >= on_type - 0.005
            else f"{up_to:.2f} h, not the {on_type:.2f} h this work takes on {a.gpu_type}: "
            "the project's budget buys no more (the council's guardrails; "
            "limits.min_lease_share)"
        )
    if on_type is not None and lease < on_type - 0.005:
        return (
            f"lease {lease:.2f} h, not the {on_type:.2f} h this work takes on "
            f"{a.gpu_type}: the project's budget buys no more (limits.min_lease_share)"
        )
    if on_type is not None and lease < req.duration_hours - 0.005:  # fleet.routing.lease_hours
        return (
            f"lease {lease:.2f} h, not the {req.duration_hours:g} h asked: the project's "
            "budget buys no more (limits.min_lease_share)"
        )
    if abs(lease - req.duration_hours) < 0.005:
        return None
    options = route.alternatives if route is not None else []
    ref = req.gpu_type or next(
        (
            o.gpu_type
            for o in options
            if abs((o.asked_hours or o.est_hours) - req.duration_hours) < 1e-9
        ),
        None,
    )
    on = f"time on {ref}, the reference type" if ref else "time on the pool's reference type"
    fast = f"{req.duration_hours / lease:.2f}x" if lease > 0 else "many times"  # under 1 µs
    return (
        f"lease {lease:.2f} h, not the {req.duration_hours:g} h asked: --hours counts {on}; "
        f"{a.gpu_type} does that work {fast} as fast"
    )


def outcome_from(
    thread_id: str, values: Mapping[str, Any], review: bool, nxt: tuple[str, ...]
) -> RequestOutcome:
    return RequestOutcome(
        thread_id=thread_id,
        # Status(): PostgresSaver stores a str-valued enum inline as JSON, a plain str on load
        status=Status.PENDING_REVIEW if review else Status(values.get("status", Status.PENDING)),
        reason=values.get("reason", ""),
        cost_usd=values.get("cost_usd", 0.0),
        allocation=values.get("allocation"),
        council=values.get("council"),
        route=values.get("route"),
        release=values.get("release"),
        events=values.get("events", []),
        next=nxt,
        request=values["request"] if isinstance(values.get("request"), GPURequest) else None,
        human=values.get("human"),
    )
