"""End to end through the compiled graph, one test per branch, on virtual time."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from langgraph.types import Command

from fleet.clock import VirtualClock
from fleet.config import CheckpointSettings
from fleet.errors import Denied, InvalidInput, NotPlaced
from fleet.models import (
    Allocation,
    CouncilDecision,
    CouncilOutcome,
    Event,
    EventKind,
    GPURequest,
    Purpose,
    ReleaseReason,
    Status,
)
from graph.orchestrator import Orchestrator
from graph.outcome import PendingReview, lease_note
from graph.scenario import SetBudget, Submit, run_scenario
from tests.conftest import OrchFactory, small_config


def req(**fields: Any) -> dict[str, Any]:
    return {"project": "p", "purpose": "training", "count": 2, "duration_hours": 2} | fields


def kinds(outcome: Any) -> list[EventKind]:
    return [e.kind for e in outcome.events]


def test_invalid_input_ends_with_a_reason(make_orch: OrchFactory) -> None:
    orch = make_orch()
    before = orch.services.ledger.dump()
    out = orch.graph.invoke({"request": req(count=-2)}, orch._config("t-bad"), context=orch.context)
    assert out["status"] is Status.INVALID and "count" in out["reason"]
    with pytest.raises(InvalidInput, match="K80"):
        orch.request(req(gpu_type="K80"))
    assert orch.services.ledger.dump() == before


def test_approved_allocated_monitored_released(make_orch: OrchFactory) -> None:
    orch = make_orch()
    out = orch.request(req(gpu_type="A100", budget_limit=50), thread_id="t1")
    assert out.status is Status.RELEASED and out.release is not None
    assert out.release.reason is ReleaseReason.LEASE_EXPIRED
    assert out.cost_usd == pytest.approx(2 * 5.12 * 2)
    assert out.council is not None and out.council.outcome is CouncilOutcome.APPROVED
    assert out.route is not None and out.route.alternatives
    assert kinds(out) == [EventKind.PLACED, EventKind.RELEASED]
    [record] = orch.history()
    assert record.thread_id == "t1" and record.cost_usd == pytest.approx(out.cost_usd)
    assert record.request is not None and record.request.budget_limit == 50


def test_council_denies_a_hoarder_with_votes(make_orch: OrchFactory) -> None:
    orch = make_orch(small_config(simulation={"workloads": {"lazy": "hoard"}}))
    first = orch.request(req(project="lazy", purpose="research", count=2, duration_hours=4))
    assert first.release is not None and first.release.reason is ReleaseReason.IDLE
    out = orch.request(req(project="lazy", count=8, duration_hours=48, priority="critical"))
    assert out.status is Status.DENIED and out.reason.startswith("council:")
    assert out.council is not None and out.council.outcome is CouncilOutcome.DENIED
    assert {v.member for v in out.council.votes} >= {"cost", "fairness", "capacity", "risk"}
    with pytest.raises(Denied):
        orch.allocate_gpu_sync(req(project="lazy", count=8, duration_hours=48))
    assert len(orch.history()) == 1


def test_budget_refuses(make_orch: OrchFactory) -> None:
    orch = make_orch()
    orch.set_budget("p", 5.0)  # $16 on H100s: not even half the lease fits
    out = orch.request(req())
    assert out.status is Status.DENIED and "remaining" in out.reason
    assert orch.services.ledger.allocations() == []


def split_config() -> Any:
    # the review mechanics on the reference rules, whose probability is never sharp
    return small_config(
        council={
            "policy": "reference",
            "approve_threshold": 0.99,
            "deny_threshold": 0.05,
            "auto_approve_max_gpus": 0,
        }
    )


def test_split_council_waits_for_a_human(make_orch: OrchFactory) -> None:
    orch = make_orch(split_config())
    out = orch.request(req(), thread_id="t-review")
    assert out.status is Status.PENDING_REVIEW and out.next == ("review",)
    assert orch.services.ledger.allocations() == []
    assert orch.resume("t-review").status is Status.PENDING_REVIEW  # no decision: still waiting
    done = orch.resume("t-review", {"approve": True, "by": "ana", "comment": "paper deadline"})
    assert done.status is Status.RELEASED
    assert EventKind.HUMAN_DECISION in kinds(done)
    orch.request(req(), thread_id="t-no")
    denied = orch.resume("t-no", False)
    assert denied.status is Status.DENIED and denied.reason.startswith("denied by")
    with pytest.raises(InvalidInput, match="already decided: deny by human"):
        orch.resume("t-no", True)
    with pytest.raises(PendingReview):
        orch.allocate_gpu_sync(req())


def test_bad_review_answer_changes_nothing(make_orch: OrchFactory) -> None:
    orch = make_orch(split_config())
    orch.request(req(), thread_id="t")
    with pytest.raises(InvalidInput):
        orch.resume("t", {"approve": "sure"})
    assert orch.resume("t").status is Status.PENDING_REVIEW


def test_queue_waits_its_fair_turn(make_orch: OrchFactory) -> None:
    clock = VirtualClock()
    orch = make_orch(clock=clock)
    h100 = {"gpu_type": "H100", "count": 2}
    result = run_scenario(
        orch,
        clock,
        [
            Submit(0.0, "heavy-1", req(project="heavy", duration_hours=3, **h100)),
            Submit(0.5, "heavy-2", req(project="heavy", duration_hours=1, **h100)),
            Submit(1.0, "light", req(project="light", duration_hours=1, **h100)),
        ],
        lambda *a: None,
    )
    heavy2, light = result.outcomes["heavy-2"], result.outcomes["light"]
    assert heavy2.status is light.status is Status.RELEASED
    assert light.allocation is not None and heavy2.allocation is not None
    # heavy-2 queued first, but light has used less: light goes as soon as heavy-1 ends
    assert light.allocation.started_at < heavy2.allocation.started_at
    first = result.outcomes["heavy-1"].allocation
    assert first is not None and light.allocation.started_at == first.lease_end
    assert EventKind.QUEUED in kinds(heavy2) and EventKind.QUEUED in kinds(light)


def test_no_wait_then_resume(make_orch: OrchFactory) -> None:
    orch = make_orch()
    held = orch.request(req(gpu_type="H100"), thread_id="a", wait=False)
    assert held.status is Status.ALLOCATED and held.next == ("monitor",)
    queued = orch.request(req(gpu_type="H100"), thread_id="b", wait=False)
    assert queued.status is Status.QUEUED and queued.next == ("wait",)
    states = {a.thread_id: a.state for a in orch.services.ledger.allocations()}
    assert states == {"a": "active", "b": "queued"}
    orch.release(held.allocation.id if held.allocation else "")
    done = orch.resume("b")
    assert done.status is Status.RELEASED
    assert orch.resume("a").release is not None
    assert orch.resume("a").release.reason is ReleaseReason.EXPLICIT  # type: ignore[union-attr]


def test_max_wait_times_out(make_orch: OrchFactory) -> None:
    orch = make_orch()
    orch.request(req(gpu_type="H100", duration_hours=5), thread_id="a", wait=False)
    out = orch.request(req(gpu_type="H100", max_wait_minutes=30), thread_id="b")
    assert out.status is Status.TIMED_OUT and "30 min" in out.reason
    with pytest.raises(NotPlaced):
        orch.allocate_gpu_sync(req(gpu_type="H100", max_wait_minutes=5))
    row = next(a for a in orch.services.ledger.allocations() if a.thread_id == "b")
    assert row.state == "released" and row.release_reason is ReleaseReason.CANCELLED


def test_a_waiting_request_writes_no_checkpoint_a_poll(make_orch: OrchFactory) -> None:
    """Ten hours in the fair queue at a 60-second poll are 600 tries of wait and allocate;
    they change nothing a resume needs (the ledger's queued row holds its place), so they
    write one checkpoint when the wait ends, not 1,200; and the thread's history still says
    it queued, once."""
    orch = make_orch()
    orch.request(req(gpu_type="H100", duration_hours=12), thread_id="a", wait=False)
    out = orch.request(req(gpu_type="H100", max_wait_minutes=600), thread_id="b")
    assert out.status is Status.TIMED_OUT and kinds(out).count(EventKind.QUEUED) == 1
    checkpoints = list(orch.checkpointer.list({"configurable": {"thread_id": "b"}}))
    assert len(checkpoints) <= 4, len(checkpoints)


def test_a_request_placed_after_waiting_is_checkpointed_from_its_first_tick(
    make_orch: OrchFactory,
) -> None:
    """Placed after its wait, its allocation is checkpointed at every step from then on, as
    any allocation is (a crash while it is held resumes from its last tick); seen where the
    fleet keeps every checkpoint, not only the latest (test_checkpoint_pruning.py)."""
    clock = VirtualClock()
    every = CheckpointSettings(keep="all")
    orch = make_orch(small_config().model_copy(update={"checkpoints": every}), clock=clock)
    result = run_scenario(
        orch,
        clock,
        [
            Submit(0.0, "first", req(gpu_type="H100", duration_hours=1)),
            Submit(0.1, "second", req(gpu_type="H100", duration_hours=1)),
        ],
        lambda *a: None,
    )
    second = result.outcomes["second"]
    assert second.status is Status.RELEASED and EventKind.QUEUED in kinds(second)
    assert second.allocation is not None
    [(ticks,)] = orch.services.ledger.query(
        "SELECT ticks FROM allocations WHERE id=?", (second.allocation.id,)
    )
    checkpoints = len(list(orch.checkpointer.list({"configurable": {"thread_id": "second"}})))
    # a checkpoint a tick (and its release), a few before; none for its 54 polls
    assert int(ticks) >= 10 and int(ticks) <= checkpoints <= int(ticks) + 8, (ticks, checkpoints)


def test_a_request_that_stops_once_placed_after_waiting_resumes_its_placement(
    make_orch: OrchFactory,
) -> None:
    """Its run stops once it is placed after waiting (here its caller stops it on hearing
    so): the thread resumes with that placement (from the checkpoint an orderly stop writes,
    or, where the process died first, from the one before the wait: wait and allocate find
    it, tests/test_nodes.py) and monitors it, charged once."""
    orch = make_orch()
    held = orch.request(req(gpu_type="H100", duration_hours=5), thread_id="a", wait=False)
    assert held.allocation is not None

    class Stopped(BaseException):  # as a process that dies: no handler runs
        pass

    def hear(event: Event) -> None:
        if event.kind is EventKind.QUEUED:  # the holder goes: the waiter is placed
            orch.release(held.allocation.id if held.allocation else "")
        if event.kind is EventKind.PLACED:
            raise Stopped

    with pytest.raises(Stopped):
        orch.request(req(gpu_type="H100"), thread_id="b", on_event=hear)
    placed_at = orch.services.clock.now()
    done = orch.resume("b")
    assert done.status is Status.RELEASED and done.allocation is not None
    assert done.allocation.started_at.timestamp() == placed_at
    rows = [r for r in orch.services.ledger.allocations() if r.thread_id == "b"]
    assert [(r.state, r.cost_usd) for r in rows] == [("released", done.cost_usd)]
    assert kinds(done).count(EventKind.PLACED) == 1


def test_budget_cut_releases_before_overrun(make_orch: OrchFactory) -> None:
    clock = VirtualClock()
    orch = make_orch(clock=clock)
    result = run_scenario(
        orch,
        clock,
        [
            Submit(0.0, "serve", req(purpose="inference", count=2, duration_hours=12)),
            SetBudget(2.0, "p", 4.0),
        ],
        lambda *a: None,
    )
    out = result.outcomes["serve"]
    assert out.release is not None and out.release.reason is ReleaseReason.BUDGET
    assert out.cost_usd == pytest.approx(4.0)
    assert sum(c.spent_usd for c in orch.costs()) <= 4.0 + 1e-6


def test_low_utilisation_warns_and_overheat_throttles(make_orch: OrchFactory) -> None:
    orch = make_orch(small_config(simulation={"workloads": {"b": "bursty", "h": "overheat"}}))
    bursty = orch.request(req(project="b", duration_hours=1))
    assert EventKind.LOW_UTILIZATION in kinds(bursty)
    assert bursty.release is not None and bursty.release.reason is ReleaseReason.LEASE_EXPIRED
    hot = orch.request(req(project="h", duration_hours=1))
    throttles = [e for e in hot.events if e.kind is EventKind.THROTTLE]
    assert len(throttles) == 2 and {e.gpu_id for e in throttles} == set(hot.allocation.gpu_ids)  # type: ignore[union-attr]


def test_with_block_releases_also_on_error(make_orch: OrchFactory) -> None:
    clock = VirtualClock()
    orch = make_orch(clock=clock)
    # time stands still while the block runs
    with clock.actor(), pytest.raises(RuntimeError):  # noqa: SIM117 (the handle must exist)
        with orch.allocate_gpu_sync(req(gpu_type="A100")) as allocation:
            assert len(allocation.gpu_ids) == 2
            raise RuntimeError("training crashed")
    [record] = orch.history()
    assert record.reason is ReleaseReason.CONTEXT_EXIT
    assert orch.outcome(allocation.thread_id).status is Status.RELEASED
    assert orch.services.ledger.holders() == {}


def test_async_with_block(make_orch: OrchFactory) -> None:
    clock = VirtualClock()
    orch = make_orch(clock=clock, project="vision")

    async def main() -> list[str]:
        allocation = await orch.allocate_gpu(
            GPURequest(
                gpu_type="A100",
                count=2,
                duration_hours=4,
                purpose="model_training",
                budget_limit=50.0,
            )
        )
        async with allocation:
            seen = list(allocation.gpu_ids)
        return seen

    with clock.actor():
        gpu_ids = asyncio.run(main())
    [record] = orch.history()
    assert record.project == "vision" and record.gpu_ids == gpu_ids
    assert record.reason is ReleaseReason.CONTEXT_EXIT


def test_handle_wait_runs_to_the_lease_end(make_orch: OrchFactory) -> None:
    orch = make_orch()
    handle = orch.allocate_gpu_sync(req(gpu_type="A100", duration_hours=1))
    out = handle.wait()
    assert out.status is Status.RELEASED and out.release is not None
    assert out.release.reason is ReleaseReason.LEASE_EXPIRED


def test_checkpoints_reload_as_models_without_warnings(
    make_orch: OrchFactory, caplog: pytest.LogCaptureFixture
) -> None:
    orch = make_orch()
    orch.request(req(gpu_type="A100", duration_hours=0.5), thread_id="t")
    again = Orchestrator(orch.services.state_dir, small_config(), clock=VirtualClock())
    try:
        with caplog.at_level(logging.WARNING):
            values = again.graph.get_state(again._config("t")).values
        assert isinstance(values["allocation"], Allocation)
        assert isinstance(values["council"], CouncilDecision)
        assert not [r for r in caplog.records if "eserializ" in r.getMessage()]
    finally:
        again.close()


def test_a_malformed_answer_that_reaches_the_graph_asks_again(make_orch: OrchFactory) -> None:
    """An answer the Orchestrator would refuse, sent to the graph itself (as a server's
    caller may): the review does not stand on it for good, it asks again saying why, and
    the next answer decides; the Orchestrator then reads the thread as any other."""
    orch = make_orch(split_config())
    orch.request(req(), thread_id="t")
    config: Any = {"configurable": {"thread_id": "t"}}
    again = orch.graph.invoke(Command(resume={"approve": "sure"}), config, context=orch.context)
    (ask,) = again["__interrupt__"]
    assert ask.value["refused"].startswith("not a decision: a review decision must be")
    assert orch.resume("t").status is Status.PENDING_REVIEW
    done = orch.resume("t", {"approve": True, "by": "ana"})  # the CLI's and page's way
    assert done.status is Status.RELEASED and done.human is not None and done.human.by == "ana"
    actions = [e.action for e in orch.services.ledger.audit_log("p")]
    assert actions.count("ask") == 1 and actions.count("approve") == 1


def test_a_slower_type_leases_the_hours_its_work_takes_there(make_orch: OrchFactory) -> None:
    """H100 is the training pool's reference here and dearer a unit of work than the A100, so
    4 H100-hours go to A100s, where the work takes 8 h: the lease is those 8 h, and the
    outcome says why it is not the 4 asked (a faster type's lease stays the hours asked)."""
    base = small_config()
    catalog = dict(base.catalog)
    catalog["H100"] = catalog["H100"].model_copy(update={"price_per_hour": 12.0})
    pools = dict(base.pools) | {Purpose.TRAINING: ["H100", "A100"]}
    orch = make_orch(small_config(catalog=catalog, pools=pools))
    out = orch.request(
        {"project": "vision", "purpose": "training", "count": 1, "duration_hours": 4},
        wait=False,
    )
    assert out.allocation is not None and out.allocation.gpu_type == "A100"
    assert out.allocation.lease_end is not None and out.allocation.started_at is not None
    assert (out.allocation.lease_end - out.allocation.started_at).total_seconds() == 8 * 3600
    assert lease_note(out) == (
        "lease 8.00 h, not the 4 h asked: --hours counts time on H100, the reference type; "
        "A100 does that work 0.50x as fast"
    )


def test_a_budget_that_shortens_a_faster_types_lease_is_named_for_it(
    make_orch: OrchFactory,
) -> None:
    """4 A100-hours go to an H100 (performance), where the work takes 2 h ($16) and the
    lease is the 4 h asked ($32): a $20 budget buys 2.5 h of it, and the note blames the
    budget, not the H100's speed."""
    orch = make_orch(small_config(budgets={"vision": 20.0}))
    out = orch.request(
        {
            "project": "vision",
            "purpose": "training",
            "count": 1,
            "duration_hours": 4,
            "mode": "performance",
        },
        wait=False,
    )
    assert out.allocation is not None and out.allocation.gpu_type == "H100", out.reason
    assert lease_note(out) == (
        "lease 2.50 h, not the 4 h asked: the project's budget buys no more "
        "(limits.min_lease_share)"
    )
