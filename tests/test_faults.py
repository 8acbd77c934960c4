"""Faults at every node boundary and inside allocate, monitor and deallocate (fleet.faults).

Each case runs a request until the armed point raises (in process) or kills the process
(SIGKILL, through the CLI), then finishes it the way a user would: `resume` (or, if the
request died before its first checkpoint, the same request again). Afterwards the ledger must
show every GPU free, every placed allocation released once, charged once, in history once,
and the spend equal to the charges.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.clock import VirtualClock
from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.faults import ENV, INSIDE, InjectedFault
from fleet.ledger import Ledger
from fleet.models import Status
from graph.orchestrator import Orchestrator
from graph.outcome import RequestOutcome
from tests.conftest import fleet_toml, run_cli, small_config

ONE = {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1, "gpu_type": "A100"}
TWO = ONE | {"count": 2, "gpu_type": "H100"}  # $16: past auto-approval, to the council
MAIN = [
    f"{when}:{node}"
    for node in ("validate", "council", "route", "allocate", "monitor", "deallocate")
    for when in ("before", "after")
]


def config() -> FleetConfig:
    """The small fleet; a council that always splits, so two-GPU requests reach review."""
    return small_config(
        council={
            "policy": "reference",
            "approve_threshold": 0.99,
            "deny_threshold": 0.01,
            "auto_approve_max_gpus": 1,
        }
    )


# Each scenario: (unarmed set-up, the armed run, the request the thread was made from)
def _placed(orch: Orchestrator) -> RequestOutcome:
    return orch.request(ONE, thread_id="t")


def _review_setup(orch: Orchestrator) -> None:
    assert orch.request(TWO, thread_id="t").status is Status.PENDING_REVIEW


def _queued_setup(orch: Orchestrator) -> None:
    held = orch.request(TWO | {"project": "q"}, thread_id="h", wait=False)
    assert orch.resume("h", {"approve": True}, wait=False).status is Status.ALLOCATED
    assert orch.request(TWO, thread_id="t", wait=False).status is Status.PENDING_REVIEW
    assert orch.resume("t", {"approve": True}, wait=False).status is Status.QUEUED
    allocation = orch.outcome("h").allocation
    assert held and allocation is not None
    orch.release(allocation.id)


Scenario = tuple[
    Callable[[Orchestrator], object] | None, Callable[[Orchestrator], object], dict[str, object]
]
SCENARIOS: dict[str, Scenario] = {
    "placed": (None, _placed, ONE),
    "review": (_review_setup, lambda o: o.resume("t", {"approve": True}), TWO),
    "queued": (_queued_setup, lambda o: o.resume("t"), TWO),
}
CASES = (
    [("placed", p) for p in MAIN + list(INSIDE)]
    + [("review", p) for p in ("before:review", "after:review")]
    + [("queued", p) for p in ("before:wait", "after:wait")]
)


def finish(orch: Orchestrator, request: dict[str, object]) -> None:
    """Carry every thread to its end as a user would, then check the ledger."""
    try:
        out = orch.outcome("t")
    except InvalidInput:  # it died before its first checkpoint: nothing was placed
        assert orch.services.ledger.allocations() == []
        out = orch.request(request, thread_id="t")
    out = orch.resume("t")  # a decision claimed before the fault is applied here
    if out.status is Status.PENDING_REVIEW:  # none was: decide now
        out = orch.resume("t", {"approve": True})
    assert out.status is Status.RELEASED, (out.status, out.reason)
    for thread in {r.thread_id for r in orch.services.ledger.allocations()} - {"t"}:
        orch.resume(thread)
    exactly_once(orch.services.ledger)


def exactly_once(ledger: Ledger) -> None:
    rows = ledger.allocations()
    assert rows and all(r.state == "released" for r in rows)
    assert ledger.holders() == {}
    placed = sorted(r.id for r in rows if r.started_at is not None)
    charges = ledger.query("SELECT allocation_id, amount_usd FROM charges")
    history = ledger.query("SELECT allocation_id, cost_usd FROM history")
    assert sorted(c[0] for c in charges) == sorted(h[0] for h in history) == placed
    assert sorted(c[1] for c in charges) == sorted(h[1] for h in history)
    spent = sum(c.spent_usd for c in ledger.costs(0.0))
    assert spent == pytest.approx(sum(float(c[1]) for c in charges))
    assert sum(r.cost_usd or 0.0 for r in rows) == pytest.approx(spent)


@pytest.mark.parametrize(("scenario", "point"), CASES)
def test_a_raise_at_every_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str, scenario: str, point: str
) -> None:
    """In process, on SQLite and on PostgreSQL."""
    setup, run, request = SCENARIOS[scenario]
    db = None if database.endswith(".sqlite") else database
    monkeypatch.setenv(ENV, "nowhere,raise")  # nodes wrapped, nothing armed yet
    orch = Orchestrator(tmp_path / "s", config(), clock=VirtualClock(), database=db)
    try:
        if setup is not None:
            setup(orch)
        monkeypatch.setenv(ENV, f"{point},raise")
        with pytest.raises(InjectedFault):
            run(orch)
    finally:
        orch.close()
    monkeypatch.delenv(ENV)
    then = Orchestrator(tmp_path / "s", config(), clock=VirtualClock(), database=db)
    try:
        finish(then, request)
    finally:
        then.close()


@pytest.mark.parametrize("point", MAIN + list(INSIDE))
def test_a_sigkill_at_every_point(tmp_path: Path, point: str) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 3600}, monitor={"tick_seconds": 900}))
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet), "--json"]
    args = [
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--gpu-type",
        "A100",
        "--thread-id",
        "t",
        *opts,
    ]
    died = run_cli("request", *args, cwd=tmp_path, env={ENV: point})
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    again = run_cli("resume", "t", *opts, cwd=tmp_path)
    if again.returncode == 2 and "no thread" in again.stderr:  # died before its checkpoint
        again = run_cli("request", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["status"] == "released"
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite", small_config())
    try:
        exactly_once(ledger)
        assert len(ledger.allocations()) == 1
    finally:
        ledger.close()


def test_a_damaged_state_directory_is_reported_with_a_way_out(tmp_path: Path) -> None:
    """Checkpoints lost, or a fleet that no longer has the GPUs a live allocation holds:
    `status` names each allocation and how to end it; nothing is dropped or changed."""
    state = tmp_path / "s"
    with Orchestrator(state, small_config(), clock=VirtualClock()) as o:
        held = o.request(ONE, thread_id="t", wait=False).allocation
        assert held is not None
        [unmonitored] = o.problems()  # wait=False: nobody carries it on until adopted
        assert f"allocation {held.id} (p) is not monitored" in unmonitored
    (state / "checkpoints.sqlite").unlink()
    renamed = small_config(
        nodes=[n.model_copy(update={"name": n.name + "-new"}) for n in small_config().nodes]
    )
    with Orchestrator(state, renamed, clock=VirtualClock()) as o:
        before = o.services.ledger.dump()
        problems = o.status()["problems"]
        assert o.services.ledger.dump() == before
        assert len(problems) == 2
        assert "which this fleet does not have" in problems[0]
        assert "has no checkpoint" in problems[1]
        assert all(f"gpu-agent release {held.id}" in p for p in problems)
        o.release(held.id)
        assert o.problems() == []
        exactly_once(o.services.ledger)


@pytest.mark.parametrize("point", ["before:review", "after:review", "before:wait", "after:wait"])
def test_a_sigkill_in_review_and_wait(tmp_path: Path, point: str) -> None:
    """The two nodes a plain request never reaches: a review (a split council, answered with
    `resume --approve`) and a wait in the queue (resumed once the holder is released)."""
    review = point.endswith("review")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            clock={"time_scale": 3600},
            monitor={"tick_seconds": 900},
            council={
                "policy": "reference",
                "approve_threshold": 0.99,
                "deny_threshold": 0.01,
                "auto_approve_max_gpus": 1 if review else 2,
                "auto_approve_max_usd": 25 if review else 10**6,
            },
        )
    )
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet), "--json"]
    two = [
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "1",
        "--gpu-type",
        "H100",
        "--no-wait",
        *opts,
    ]

    def cli(*args: str, fault: str | None = None) -> dict[str, Any]:
        r = run_cli(*args, cwd=tmp_path, env={ENV: fault} if fault else None)
        if fault:
            assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
            return {}
        assert r.returncode == 0, r.stderr[-2000:]
        return dict(json.loads(r.stdout))

    if review:
        first = cli("request", "--project", "p", "--thread-id", "t", *two)
        assert first["status"] == "pending_review"
        cli("resume", "t", "--approve", *opts, fault=point)
        done = cli("resume", "t", *opts)
        if done["status"] == "pending_review":  # it died before the decision was saved
            done = cli("resume", "t", "--approve", *opts)
    else:
        held = cli("request", "--project", "q", "--thread-id", "h", *two, "--hours", "20")
        assert held["status"] == "allocated"
        assert cli("request", "--project", "p", "--thread-id", "t", *two)["status"] == "queued"
        cli("release", held["allocation"]["id"], *opts)
        cli("resume", "t", *opts, fault=point)
        done = cli("resume", "t", *opts)
        cli("resume", "h", *opts)
    assert done["status"] == "released"
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite", small_config())
    try:
        exactly_once(ledger)
    finally:
        ledger.close()


def test_a_release_re_run_after_a_crash_leaves_the_next_holder_s_gpus_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's monitor throttles its hot GPUs; A dies after its release committed. B, placed on
    the same two H100s, gets them unthrottled (A reset them before it let them go); B's
    monitor throttles them; A's thread, carried on, releases nothing twice and resets
    nothing of B's (a reset would undo B's throttle, which B's monitor does once)."""
    monkeypatch.setenv(ENV, "deallocate:released,raise")
    hot = small_config(monitor={"throttle_temp_c": 30})
    orch = Orchestrator(tmp_path / "s", hot, clock=VirtualClock())
    try:
        a = ONE | {"gpu_type": "H100", "count": 2}
        with pytest.raises(InjectedFault):
            orch.request(a, thread_id="a")
        monkeypatch.delenv(ENV)
        throttled = orch.outcome("a").events
        assert any(e.kind.value == "throttle" for e in throttled)  # A's monitor did
        b = orch.request(a | {"project": "q"}, thread_id="b", wait=False)
        assert b.allocation is not None and b.status is Status.ALLOCATED
        backend, now = orch.services.backend, orch.services.clock.now()
        assert not any(s.throttled for s in backend.sample(b.allocation.gpu_ids, now, {}))
        for gpu in b.allocation.gpu_ids:
            backend.throttle(gpu)
        assert orch.resume("a").status is Status.RELEASED
        assert all(s.throttled for s in backend.sample(b.allocation.gpu_ids, now, {}))
    finally:
        orch.close()
