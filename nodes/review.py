"""A split council stops the run for a human: interrupt(), then Command(resume=decision).

No side effects before interrupt(): LangGraph re-runs this node from its first line on resume.
"""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import ValidationError

from fleet import names
from fleet.errors import InvalidInput
from fleet.models import Event, EventKind, HumanDecision, Status, utc
from nodes import audit
from nodes.context import Context, services_for
from nodes.state import State, request_of


def parse_decision(answer: Any) -> HumanDecision:
    """A human's answer: true/false, "approve"/"deny", or {"approve": bool, "by", "comment",
    "guardrails": bool (false: an approval without the council's guardrails)}.
    `by` is a name (fleet.names: it is printed in the audit log); the comment's line breaks
    and tabs become spaces, and other control characters are refused."""
    if isinstance(answer, HumanDecision):
        return _checked(answer)
    if isinstance(answer, bool):
        return HumanDecision(approve=answer)
    if isinstance(answer, str) and answer.strip().lower() in ("approve", "deny"):
        return HumanDecision(approve=answer.strip().lower() == "approve")
    if isinstance(answer, dict):
        try:
            return _checked(HumanDecision.model_validate(answer, strict=True))
        except ValidationError:
            pass
    raise InvalidInput(
        'a review decision must be true/false, "approve"/"deny" or '
        '{"approve": true|false, "by": "...", "comment": "...", "guardrails": true|false}'
    )


def _checked(human: HumanDecision) -> HumanDecision:
    names.check("identity", human.by)
    comment = " ".join(human.comment.split())
    why = names.text_problem("a review comment", comment)
    if why is not None:
        raise InvalidInput(why)
    return human if comment == human.comment else human.model_copy(update={"comment": comment})


def question(state: State) -> dict[str, Any]:
    """What the human is asked: the request and every member's vote."""
    request = request_of(state)
    return {
        "question": f"approve {request.count} GPU(s) for {request.project}?",
        "thread_id": state.get("thread_id", ""),
        "request": request.model_dump(mode="json"),
        "council": state["council"].model_dump(mode="json"),
    }


def decided(state: State, runtime: Runtime[Context], answer: Any) -> State:
    """The update a human's answer makes (the simulator's reviewer answers through this too)."""
    human = parse_decision(answer)
    svc = services_for(runtime)
    now = svc.clock.now()
    audit.decision(svc, state, request_of(state), human)
    verdict = "approved" if human.approve else "denied"
    if human.approve and not human.guardrails and state["council"].guardrails is not None:
        verdict += " without the council's guardrails"
    note = f" ({human.comment})" if human.comment else ""
    event = Event(at=utc(now), kind=EventKind.HUMAN_DECISION, message=f"{human.by} {verdict}{note}")
    update: State = {"human": human, "events": [event]}
    if human.approve:
        return update | {"status": Status.PENDING, "reason": f"approved by {human.by}"}
    return update | {"status": Status.DENIED, "reason": f"denied by {human.by}{note}"}


def review(state: State, runtime: Runtime[Context]) -> State:
    """Asks until an answer is a decision: a malformed one does not stand (LangGraph replays
    a node's answers in order on each re-run, so an answer that raised would raise for good
    and block the review); the next ask says why it was refused."""
    ask = question(state)
    while True:
        answer = interrupt(ask)
        try:
            human = parse_decision(answer)
        except InvalidInput as exc:
            ask = question(state) | {"refused": f"not a decision: {exc}"}
            continue
        return decided(state, runtime, human)
