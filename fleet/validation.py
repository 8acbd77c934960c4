"""Turn raw input into a GPURequest the fleet can serve, or one clear line saying why not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fleet import names
from fleet.config import FleetConfig
from fleet.errors import InvalidInput, one_line
from fleet.models import GPURequest, RouteDecision, budget_problem
from fleet.routing import Refusal, route


def parse_request(raw: GPURequest | Mapping[str, Any]) -> GPURequest:
    """The request, validated whatever it came as: a GPURequest is checked again, since
    pydantic's model_copy(update=...) and model_construct skip its checks and a subclass may
    carry fields of its own (else they reach the council, the ledger and the checkpoints)."""
    if isinstance(raw, GPURequest):
        return _checked_again(raw)
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"request must be an object, not {type(raw).__name__}")
    return _validated(dict(raw))


def _checked_again(request: GPURequest) -> GPURequest:
    """`request` validated anew, with the fields its caller set still the ones set
    (Orchestrator.check gives a request the caller's project only where it named none)."""
    # every field, a subclass's own too (refused as unknown); a value of the wrong type is
    # dumped as it is, for validation to refuse, not warned about
    checked = _validated(request.model_dump(warnings=False))
    fields = checked.model_dump()
    return GPURequest.model_construct(_fields_set=set(request.model_fields_set), **fields)


def _validated(fields: dict[str, Any]) -> GPURequest:
    try:
        return GPURequest.model_validate(fields)
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
    """A project's budget, as `budget set` and Services.set_budget take it (budget_problem)."""
    names.check("project", project)
    why = budget_problem(budget_usd)
    if why is not None:
        raise InvalidInput(why)


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
