"""Turn raw input into a GPURequest the fleet can serve, or one clear line saying why not."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fleet import names
from fleet.config import FleetConfig
from fleet.errors import InvalidInput, one_line
from fleet.models import MAX_USD, GPURequest, RouteDecision
from fleet.routing import Refusal, route


def parse_request(raw: GPURequest | Mapping[str, Any]) -> GPURequest:
    if isinstance(raw, GPURequest):
        return raw
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"request must be an object, not {type(raw).__name__}")
    try:
        return GPURequest.model_validate(dict(raw))
    except ValidationError as exc:
        raise InvalidInput(one_line(exc, prefix="invalid request: ")) from None


def check_against_fleet(request: GPURequest, config: FleetConfig) -> None:
    """Checks that need the fleet: known type, sane duration, a count the fleet can ever hold."""
    limits = config.limits
    if request.duration_hours > limits.max_duration_hours:
        raise InvalidInput(
            f"duration {request.duration_hours:g} h is over the limit of "
            f"{limits.max_duration_hours:g} h"
        )
    if request.duration_hours * 60 < limits.min_duration_minutes:
        raise InvalidInput(
            f"duration {request.duration_hours:g} h is under the minimum of "
            f"{limits.min_duration_minutes:g} minutes"
        )
    if request.gpu_type is not None and request.gpu_type not in config.catalog:
        known = ", ".join(sorted(config.catalog))
        raise InvalidInput(f"unknown GPU type {request.gpu_type!r} (known: {known})")
    types = [request.gpu_type] if request.gpu_type else config.pool(request.purpose)
    if request.min_memory_gb is not None:
        roomy = [t for t in types if config.catalog[t].memory_gb >= request.min_memory_gb]
        if not roomy:
            best = max(config.catalog[t].memory_gb for t in types)
            raise InvalidInput(
                f"no GPU of {'/'.join(types)} has {request.min_memory_gb:g} GB "
                f"(largest: {best:g} GB)"
            )
        types = roomy
    capacity = max(config.gpus_of_type(t) for t in types)
    if request.count > capacity:
        raise InvalidInput(
            f"count {request.count} is more than the fleet has ({capacity} x {'/'.join(types)})"
        )


def check_budget(project: str, budget_usd: float) -> None:
    names.check("project", project)
    if (
        isinstance(budget_usd, bool)
        or not isinstance(budget_usd, int | float)
        or not math.isfinite(budget_usd)
        or not 0 <= budget_usd <= MAX_USD
    ):
        raise InvalidInput(f"budget must be an amount from $0 to ${MAX_USD:,.0f}, not {budget_usd}")


def refusal(
    request: GPURequest,
    config: FleetConfig,
    remaining_usd: float | None,
    routed: RouteDecision | Refusal | None = None,
) -> str | None:
    """Why a hard rule (quota, budget, duration on every type) refuses the request, if one does.

    Checked before the council sits and again before it votes, so nobody is asked to approve
    what the rules forbid anyway. `routed`: the request's route on the same `remaining_usd`,
    where the caller has one (Services.route), which is then not routed again: routing refuses
    on the options the budget leaves alone, whatever the waits it weighs.
    """
    quota = config.quotas.max_gpus(request.project)
    if quota is not None and request.count > quota:
        return f"quota: {request.project} may hold at most {quota} GPUs"
    decision = route(request, config, remaining_usd) if routed is None else routed
    return f"refused: {decision.reason}" if isinstance(decision, Refusal) else None
