"""The audit entries nodes write: approvals (with the placement), denials, human decisions.

Keys make each entry happen once per (thread, request): LangGraph re-runs a node from its first
line on resume, and a re-run appends nothing.
"""

from __future__ import annotations

from fleet.ledger.rows import AuditEntry
from fleet.models import CouncilOutcome, GPURequest, HumanDecision
from nodes.context import Services
from nodes.state import State

REVIEW = "human review: "
BARE = "human review, without the council's guardrails: "  # an approval that dropped them


def _key(kind: str, state: State, request: GPURequest) -> str:
    return f"{kind}:{state.get('thread_id') or 'anonymous'}:{request.request_id}"


def _entry(
    kind: str, svc: Services, state: State, request: GPURequest, who: str, action: str, detail: str
) -> AuditEntry:
    return AuditEntry(
        _key(kind, state, request),
        svc.clock.now(),
        who,
        action,
        request.project,
        state.get("thread_id") or "anonymous",
        detail,
    )


def denial(svc: Services, state: State, request: GPURequest, who: str, reason: str) -> None:
    svc.ledger.audit(_entry("deny", svc, state, request, who, "deny", reason))


def asked(svc: Services, state: State, request: GPURequest, summary: str) -> None:
    """The council split: a human is asked (the page's list of pending reviews)."""
    svc.ledger.audit(_entry("ask", svc, state, request, "council", "ask", summary))


def ask_key(state: State, request: GPURequest) -> str:
    """The key of the council's "ask" entry for a review (written once per request)."""
    return _key("ask", state, request)


def decision_key(state: State, request: GPURequest) -> str:
    """The key of a review's one decision (a claim of it, and the entry the review writes)."""
    return _key("decide", state, request)


def decision_entry(
    svc: Services, state: State, request: GPURequest, human: HumanDecision
) -> AuditEntry:
    """A human decision's entry; its key is the review's, so one decision per review."""
    return _entry(
        "decide",
        svc,
        state,
        request,
        human.by,
        "approve" if human.approve else "deny",
        f"{BARE if human.approve and not human.guardrails else REVIEW}{human.comment}",
    )


def decision(svc: Services, state: State, request: GPURequest, human: HumanDecision) -> None:
    svc.ledger.audit(decision_entry(svc, state, request, human))


def recorded(entry: AuditEntry) -> HumanDecision:
    """The decision an entry records (to apply a claimed decision a crash left unapplied)."""
    bare = entry.detail.startswith(BARE)
    return HumanDecision(
        approve=entry.action == "approve",
        by=entry.who,
        comment=entry.detail.removeprefix(BARE if bare else REVIEW),
        guardrails=not bare,
    )


def approval(svc: Services, state: State, request: GPURequest) -> AuditEntry | None:
    """Who let the request through, written with its placement. None after a human approval:
    the decision's own entry says it (one row per decision)."""
    human, council = state.get("human"), state.get("council")
    if human is not None and human.approve:
        return None
    if council is not None and council.outcome == CouncilOutcome.AUTO_APPROVED:
        who, detail = "auto-approval", council.summary
    elif council is not None:
        who, detail = "council", council.summary
    else:
        who, detail = "rules", "no council"
    return _entry("approve", svc, state, request, who, "approve", detail)
