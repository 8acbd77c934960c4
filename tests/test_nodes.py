"""Each node on its own: a state in, a partial update out, side effects in the ledger."""

from __future__ import annotations

from typing import Any, cast

import pytest
from langgraph.runtime import ExecutionInfo, Runtime

from fleet.clock import VirtualClock
from fleet.errors import InvalidInput
from fleet.ledger.rows import allocation_id
from fleet.models import (
    CouncilOutcome,
    EventKind,
    GPURequest,
    HumanDecision,
    MonitorState,
    ReleaseReason,
    Status,
)
from fleet.routing import route as choose_route
from nodes.allocate import allocate
from nodes.context import Context, LocalContext, Services
from nodes.council import council
from nodes.deallocate import deallocate
from nodes.monitor import monitor
from nodes.review import parse_decision
from nodes.route import route
from nodes.state import State
from nodes.validate import validate
from nodes.wait import wait
from tests.conftest import small_config


def rt(svc: Services, thread_id: str = "t1") -> Runtime[Context]:
    return Runtime(
        context=LocalContext(services=svc),
        execution_info=ExecutionInfo(
            checkpoint_id="c", checkpoint_ns="", task_id="x", thread_id=thread_id
        ),
    )


def request(**fields: Any) -> GPURequest:
    base: dict[str, Any] = {
        "project": "p",
        "purpose": "training",
        "count": 2,
        "duration_hours": 2,
        "request_id": "r1",
    }
    return GPURequest.model_validate(base | fields)


def placed_state(svc: Services, thread: str = "t1", **fields: Any) -> dict[str, Any]:
    req = request(request_id=f"r-{thread}", **fields)
    decision = choose_route(req, svc.config, None)
    state: dict[str, Any] = {"request": req, "thread_id": thread, "route": decision}
    return state | allocate(state, rt(svc, thread))  # type: ignore[arg-type]


def test_validate(services: Services) -> None:
    ok = validate(
        {"request": {"project": "p", "purpose": "train", "count": 1, "duration_hours": 1}},
        rt(services),
    )
    assert ok["status"] is Status.PENDING and isinstance(ok["request"], GPURequest)
    assert ok["thread_id"] == "t1"
    bad = validate({"request": {"project": "p", "count": -1, "duration_hours": 1}}, rt(services))
    assert bad["status"] is Status.INVALID and "count" in bad["reason"]
    unknown = validate({"request": {"gpu_type": "K80", "duration_hours": 1}}, rt(services))
    assert unknown["status"] is Status.INVALID and "K80" in unknown["reason"]
    missing = validate({}, rt(services))  # the server's input is the caller's
    assert missing["status"] is Status.INVALID and "no request" in missing["reason"]


def test_council_votes_and_auto_approves(services: Services) -> None:
    voted = council({"request": request()}, rt(services))
    assert voted["council"].outcome is CouncilOutcome.APPROVED and len(voted["council"].votes) == 6
    small = council({"request": request(count=1, duration_hours=1)}, rt(services))
    assert small["council"].outcome is CouncilOutcome.AUTO_APPROVED


def test_route_applies_the_budget(services: Services) -> None:
    assert route({"request": request()}, rt(services))["route"].gpu_type == "H100"
    services.ledger.set_budget("p", 1.0, services.clock.now())
    refused = route({"request": request()}, rt(services))
    assert refused["status"] is Status.DENIED and "remaining" in refused["reason"]
    early = validate({"request": request()}, rt(services))  # before the council sits
    assert early["status"] is Status.DENIED and "remaining" in early["reason"]


def test_the_route_node_gives_the_councils_route_while_nothing_changed(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The council prices a request on the route it would take; the route node right after
    gives that route, unless the ledger changed since, a review came between, or a
    guardrail changed the request: then it routes again."""
    import fleet.services

    routed: list[GPURequest] = []

    def counted(request: GPURequest, *args: Any) -> Any:
        routed.append(request)
        return choose_route(request, *args)

    monkeypatch.setattr(fleet.services, "route", counted)
    state: dict[str, Any] = {"request": request()}
    voted = council(state, rt(services))  # type: ignore[arg-type]
    assert voted["council"].outcome is CouncilOutcome.APPROVED and len(routed) == 1
    given = route(state | voted, rt(services))  # type: ignore[arg-type]
    assert len(routed) == 1 and given["route"].gpu_type == "H100"

    council(state, rt(services))  # type: ignore[arg-type]
    placed_state(services, "t2")  # the ledger changed between
    route(state | voted, rt(services))  # type: ignore[arg-type]
    assert len(routed) == 3

    council(state, rt(services))  # type: ignore[arg-type]
    split = voted["council"].model_copy(update={"outcome": CouncilOutcome.SPLIT})
    route(state | {"council": split}, rt(services))  # type: ignore[arg-type]
    assert len(routed) == 5  # a human decided between: time passed


def test_validate_enforces_quota(tmp_path: Any) -> None:
    from nodes.context import open_services

    svc = open_services(
        tmp_path / "q", small_config(quotas={"default_max_gpus": 1}), clock=VirtualClock()
    )
    try:
        out = validate({"request": request()}, rt(svc))
        assert out["status"] is Status.DENIED and "quota" in out["reason"]
    finally:
        svc.close()


def test_allocate_places_idempotently_then_queues(services: Services) -> None:
    state = placed_state(services, gpu_type="H100")
    assert state["status"] is Status.ALLOCATED
    alloc = state["allocation"]
    assert alloc.cuda_visible_devices == ",".join(alloc.gpu_ids) and alloc.node == "h100-0"
    again = allocate(cast(State, state), rt(services))  # a re-run after a crash
    assert again["allocation"] == alloc
    queued = placed_state(services, "t2", gpu_type="H100")
    assert queued["status"] is Status.QUEUED and "capacity" in queued["reason"]
    assert queued["events"][0].kind is EventKind.QUEUED


def test_wait_times_out_and_cancels(services: Services) -> None:
    placed_state(services, gpu_type="H100")
    queued = placed_state(services, "t2", gpu_type="H100", max_wait_minutes=3)
    out = wait(queued, rt(services, "t2"))  # type: ignore[arg-type]
    assert out == {}  # slept one poll (60 s)
    out = wait(queued, rt(services, "t2"))  # type: ignore[arg-type]
    out = wait(queued, rt(services, "t2"))  # type: ignore[arg-type]
    assert out["status"] is Status.TIMED_OUT
    assert services.ledger.get(queued["allocation_id"]).release_reason is ReleaseReason.CANCELLED


def test_wait_does_not_sleep_for_a_placement_made_before_a_crash(services: Services) -> None:
    """The thread's checkpoint says it waits, the ledger that it was placed (its process died
    between the placement and the checkpoint): wait gives allocate, idempotent, the turn at
    once, without sleeping a poll while the GPUs are held."""
    placed = placed_state(services, gpu_type="H100")
    assert placed["status"] is Status.ALLOCATED
    as_queued = placed | {"status": Status.QUEUED}
    before = services.clock.now()
    assert wait(as_queued, rt(services)) == {}  # type: ignore[arg-type]
    assert services.clock.now() == before
    again = allocate(cast(State, as_queued), rt(services))
    assert again["status"] is Status.ALLOCATED and again["allocation"] == placed["allocation"]


def test_monitor_ticks_then_releases_at_the_deadline(services: Services) -> None:
    state = placed_state(services, gpu_type="A100", duration_hours=0.1)  # a 6-minute lease
    ticks = 0
    while "release_reason" not in state:
        state = state | monitor(state, rt(services))  # type: ignore[arg-type]
        ticks += 1
    assert ticks == 6 and state["release_reason"] is ReleaseReason.LEASE_EXPIRED
    assert state["monitor"].ticks == 5 and state["monitor"].mean_util > 60
    out = deallocate(state, rt(services))  # type: ignore[arg-type]
    assert out["status"] is Status.RELEASED
    assert out["release"].cost_usd == pytest.approx(2 * 5.12 * 0.1)
    again = deallocate(state, rt(services))  # type: ignore[arg-type]
    assert again["release"] == out["release"]
    assert len(services.ledger.history()) == 1


def test_monitor_sees_an_explicit_release(services: Services) -> None:
    state = placed_state(services, gpu_type="A100")
    services.ledger.release(
        state["allocation_id"], ReleaseReason.EXPLICIT, services.clock.now() + 30
    )
    out = monitor(state, rt(services))  # type: ignore[arg-type]
    assert out["release_reason"] is ReleaseReason.EXPLICIT


def test_parse_decision() -> None:
    assert parse_decision(True).approve
    assert not parse_decision("deny").approve
    assert parse_decision({"approve": True, "by": "ana", "comment": "ok"}) == HumanDecision(
        approve=True, by="ana", comment="ok"
    )
    for bad in [None, 1, "maybe", {"approve": "yes"}, {"ok": True}]:
        with pytest.raises(InvalidInput):
            parse_decision(bad)


def test_monitor_state_is_small(services: Services) -> None:
    state = placed_state(services, gpu_type="A100", duration_hours=4)
    for _ in range(100):
        state = state | monitor(state, rt(services))  # type: ignore[arg-type]
    mon: MonitorState = state["monitor"]
    assert len(mon.window) <= 11 and len(state["samples"]) == 2
    assert allocation_id("t1", "r-t1") == state["allocation"].id
