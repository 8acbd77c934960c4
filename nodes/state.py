"""The graph's one typed state. Values inside are the pydantic models of fleet.models."""

from __future__ import annotations

import operator
from datetime import datetime
from typing import Annotated, Any

from typing_extensions import TypedDict

from fleet.models import (
    Allocation,
    CouncilDecision,
    Event,
    GPURequest,
    GPUSample,
    Guardrails,
    HumanDecision,
    MonitorState,
    Release,
    ReleaseReason,
    RouteDecision,
    Status,
)


class InputState(TypedDict):
    """What a caller sends: a request (a GPURequest or its fields as a dict)."""

    request: GPURequest | dict[str, Any]


class State(TypedDict, total=False):
    request: GPURequest | dict[str, Any]
    thread_id: str
    status: Status
    reason: str
    council: CouncilDecision
    human: HumanDecision
    route: RouteDecision
    allocation_id: str
    allocation: Allocation
    monitor: MonitorState
    samples: list[GPUSample]  # the latest tick's readings only
    release_reason: ReleaseReason
    release_at: datetime
    release: Release
    cost_usd: float
    events: Annotated[list[Event], operator.add]


def guardrails_of(state: State) -> Guardrails | None:
    """The guardrails the allocation runs under: the council's, unless the human who
    approved it dropped them."""
    decision, human = state.get("council"), state.get("human")
    if decision is None or (human is not None and human.approve and not human.guardrails):
        return None
    return decision.guardrails


def request_of(state: State) -> GPURequest:
    """The validated request (validate replaces the raw input with the model)."""
    req = state["request"]
    return req if isinstance(req, GPURequest) else GPURequest.model_validate(req)
