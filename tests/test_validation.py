"""Requests: field checks, purpose aliases, and checks against the fleet."""

from __future__ import annotations

import math

import pytest

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.models import GPURequest, Purpose
from fleet.validation import check_against_fleet, check_budget, parse_request


def req(**fields: object) -> dict[str, object]:
    return {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1} | fields


@pytest.mark.parametrize(
    "alias,purpose",
    [
        ("model_training", Purpose.TRAINING),
        ("Fine-Tuning", Purpose.TRAINING),
        ("serving", Purpose.INFERENCE),
        ("model_inference", Purpose.INFERENCE),
        ("experiment", Purpose.RESEARCH),
        ("research", Purpose.RESEARCH),
    ],
)
def test_purpose_aliases(alias: str, purpose: Purpose) -> None:
    assert parse_request(req(purpose=alias)).purpose is purpose


def test_type_alias_and_api_shape() -> None:
    r = GPURequest.model_validate(  # JSON's name for the type, and a purpose's alias
        {
            "type": "a100",
            "count": 2,
            "duration_hours": 4,
            "purpose": "model_training",
            "budget_limit": 50.0,
        }
    )
    assert (r.gpu_type, r.count, r.purpose, r.project) == ("A100", 2, Purpose.TRAINING, "default")


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"count": 0}, "count"),
        ({"count": -3}, "count"),
        ({"count": True}, "count"),
        ({"count": 1.5}, "count"),
        ({"duration_hours": 0}, "duration_hours"),
        ({"duration_hours": -1}, "duration_hours"),
        ({"duration_hours": math.nan}, "finite"),
        ({"duration_hours": math.inf}, "finite"),
        ({"budget_limit": math.nan}, "finite"),
        ({"duration_hours": "inf"}, "finite"),  # a string that parses to infinity
        ({"notice_seconds": "1e400"}, "finite"),
        ({"notice_seconds": 1e6}, "less than or equal to 3600"),  # a guarded term for good
        ({"max_wait_minutes": "Infinity"}, "finite"),
        ({"budget_limit": -5}, "budget_limit"),
        ({"budget_limit": 0}, "budget_limit"),
        ({"min_memory_gb": -1}, "min_memory_gb"),
        ({"purpose": "mining"}, "unknown purpose"),
        ({"priority": "urgent"}, "priority"),
        ({"project": ""}, "project"),
        ({"project": "a b"}, "project"),
        ({"project": "x" * 65}, "project"),
        ({"surprise": 1}, "surprise"),
        ({"mode": "cheap"}, "mode"),
    ],
)
def test_bad_fields_give_one_line(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_request(req(**fields))
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_a_request_changed_after_it_was_made_is_checked_as_it_changes() -> None:
    """An attribute set on a GPURequest is validated: it reaches the ledger as it is."""
    request = parse_request(req())
    for field, value in (("project", "vision\n"), ("count", -3), ("count", True)):
        with pytest.raises(ValueError, match=field):
            setattr(request, field, value)
    assert (request.project, request.count) == ("p", 1)


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidInput, match="must be an object"):
        parse_request(["count", 1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"gpu_type": "B200"}, "unknown GPU type"),
        ({"count": 9}, "more than the fleet has"),  # 8 A100 is the largest training type
        ({"count": 3, "gpu_type": "H100"}, "more than the fleet has"),
        ({"duration_hours": 10_000}, "over the limit"),
        ({"duration_hours": 0.001}, "under the minimum"),
        ({"min_memory_gb": 200}, "no GPU"),
        ({"purpose": "inference", "min_memory_gb": 40}, "no GPU"),
    ],
)
def test_fleet_checks(config: FleetConfig, fields: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        check_against_fleet(parse_request(req(**fields)), config)


def test_fleet_checks_accept_what_fits(config: FleetConfig) -> None:
    check_against_fleet(parse_request(req(count=8, min_memory_gb=80)), config)


@pytest.mark.parametrize(
    "project,usd", [("ok", math.nan), ("ok", -1), ("ok", math.inf), ("bad name", 10), ("ok", True)]
)
def test_bad_budgets(project: str, usd: float) -> None:
    with pytest.raises(InvalidInput):
        check_budget(project, usd)
