"""Preemption that loses no work (fleet.preemption): a running allocation with a checkpoint
notice is asked to yield, yields after its notice and its minimum run, ends `preempted`,
charged once for what it held, and `gpu-agent run --requeue` resumes its work on another GPU.
On SQLite and PostgreSQL; the last test with real subprocesses."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.ledger.rows import LedgerRow
from fleet.models import ReleaseReason
from tests.conftest import fleet_toml, run_cli, small_config
from tests.test_budget_admission import HOUR, T0, Fleet

MIN_RUN_S = 30 * 60.0  # PreemptionSettings' default


@pytest.fixture
def fleet(database: str) -> Iterator[Fleet]:
    f = Fleet(database, small_config())
    yield f
    f.ledger.close()


def running(
    fleet: Fleet, project: str = "p", notice: float | None = 120.0, hours: float = 4.0
) -> LedgerRow:
    """A 1 x A100 allocation of `hours` started at T0, with a checkpoint notice of `notice` s."""
    request = fleet.request(project, "A100", 1, hours)
    request = request.model_copy(update={"notice_seconds": notice})
    row = fleet.place(request, T0).row
    assert row is not None and row.state == "active"
    return row


def audit(fleet: Fleet) -> list[tuple[str, str]]:
    """The preemptions in the audit log: (allocation, detail)."""
    return [(e.target, e.detail) for e in fleet.ledger.audit_log() if e.action == "preempt"]


def test_an_allocation_yields_after_its_notice_and_its_minimum_run(fleet: Fleet) -> None:
    """Asked an hour in, it yields its 120 s notice later; asked a minute in, at 30 min run.
    Its lease and deadline end there, reason preempted; the audit log says who and why."""
    row = running(fleet)
    moved = fleet.ledger.preempt(row.id, T0 + HOUR, "admin", "the inference pool reclaims it")
    assert (moved.before, moved.after) == (T0 + 4 * HOUR, T0 + HOUR + 120.0)
    lease = fleet.ledger.lease(row.id)
    assert lease.deadline == T0 + HOUR + 120.0
    assert lease.deadline_reason is ReleaseReason.PREEMPTED
    [(target, detail)] = audit(fleet)
    assert target == row.id and "120 s checkpoint notice: the inference pool reclaims it" in detail
    early = running(fleet, "q")
    assert fleet.ledger.preempt(early.id, T0 + 60.0, "admin", "x").after == T0 + MIN_RUN_S


def test_a_preempted_allocation_is_released_once_charged_for_what_it_held(fleet: Fleet) -> None:
    row = running(fleet)
    at = fleet.ledger.preempt(row.id, T0 + HOUR, "admin", "why").after
    lease = fleet.ledger.lease(row.id)  # what its monitor reads, and ends it by
    assert lease.deadline == at and lease.deadline_reason is not None
    release = fleet.ledger.release(row.id, lease.deadline_reason, at)
    assert release.reason is ReleaseReason.PREEMPTED
    assert release.hours == pytest.approx((at - T0) / HOUR)
    price = fleet.config.catalog["A100"].price_per_hour
    assert release.cost_usd == pytest.approx(price * (at - T0) / HOUR)
    again = fleet.ledger.release(row.id, ReleaseReason.EXPLICIT, at + 5.0)
    assert again.reason is ReleaseReason.PREEMPTED and again.cost_usd == release.cost_usd
    assert fleet.ledger.costs(at + 10.0)[0].spent_usd == pytest.approx(release.cost_usd)


def test_a_budget_change_keeps_the_yield_and_its_reason(fleet: Fleet) -> None:
    """A budget that cuts before the yield cuts it (budget); raised again, the deadline goes
    back to the yield, still preempted, never to the old lease end."""
    row = running(fleet)
    at = fleet.ledger.preempt(row.id, T0 + HOUR, "admin", "why").after
    price = fleet.config.catalog["A100"].price_per_hour
    fleet.ledger.set_budget("p", price * 0.5, T0 + 60.0)  # runs out at 30 min
    cut = fleet.ledger.lease(row.id)
    assert cut.deadline_reason is ReleaseReason.BUDGET and cut.deadline is not None
    assert cut.deadline < at
    fleet.ledger.set_budget("p", 1000.0, T0 + 120.0)
    back = fleet.ledger.lease(row.id)
    assert (back.deadline, back.deadline_reason) == (at, ReleaseReason.PREEMPTED)


def test_without_a_notice_or_past_the_daily_limit_it_is_refused_changing_nothing(
    fleet: Fleet,
) -> None:
    bare = running(fleet, notice=None)
    with pytest.raises(InvalidInput, match=r"no checkpoint notice .* would lose its work"):
        fleet.ledger.preempt(bare.id, T0 + HOUR, "admin", "why")
    assert fleet.ledger.lease(bare.id).deadline == T0 + 4 * HOUR and not audit(fleet)
    limit = fleet.config.preemption.max_per_project_per_day
    rows = [running(fleet, hours=48.0) for _ in range(limit + 1)]
    for r in rows[:limit]:
        fleet.ledger.preempt(r.id, T0 + HOUR, "admin", "why")
    with pytest.raises(InvalidInput, match=f"asked to yield {limit} time"):
        fleet.ledger.preempt(rows[-1].id, T0 + HOUR, "admin", "why")
    assert fleet.ledger.lease(rows[-1].id).deadline_reason is ReleaseReason.LEASE_EXPIRED
    # a day later the project may be asked again
    assert fleet.ledger.preempt(rows[-1].id, T0 + 25 * HOUR + 1.0, "admin", "why").after


def test_what_is_not_running_or_ends_first_cannot_be_asked(fleet: Fleet) -> None:
    row = running(fleet)
    with pytest.raises(InvalidInput, match="no allocation 'nope'"):
        fleet.ledger.preempt("nope", T0, "admin", "why")
    with pytest.raises(InvalidInput, match="no later than it could yield"):
        fleet.ledger.preempt(row.id, T0 + 4 * HOUR - 60.0, "admin", "why")
    fleet.ledger.release(row.id, ReleaseReason.EXPLICIT, T0 + HOUR)
    with pytest.raises(InvalidInput, match="is released, not running"):
        fleet.ledger.preempt(row.id, T0 + 2 * HOUR, "admin", "why")
    assert not audit(fleet)


def test_the_preemption_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_run_minutes"):
        FleetConfig.model_validate(
            small_config().model_dump() | {"preemption": {"min_run_minutes": -1}}
        )


# ---- real subprocesses: notice, checkpoint, resume on another GPU ------------------------------

# On its notice it checkpoints (the file); on SIGTERM it stops; started again with a
# checkpoint it says where it resumed and finishes.
PREEMPTIBLE = """
import os, signal, sys, time
log, ckpt = sys.argv[1], sys.argv[2]
def say(what):
    where = os.environ["GPU_AGENT_ALLOCATION"], os.environ["CUDA_VISIBLE_DEVICES"]
    with open(log, "a") as f:
        f.write(" ".join((what, *where)) + "\\n")
def checkpoint(*_):
    open(ckpt, "w").write("step 41")
    say("checkpoint")
def term(*_):
    say("term")
    sys.exit(0)
signal.signal(signal.SIGUSR1, checkpoint)
signal.signal(signal.SIGTERM, term)
if os.path.exists(ckpt):
    say("resume-from-" + open(ckpt).read().replace(" ", "-"))
    sys.exit(0)
say("start")
while True:
    time.sleep(0.05)
"""


def wait_for(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_preempted_run_checkpoints_and_resumes_on_another_gpu(tmp_path: Path) -> None:
    """Two T4s: `other` holds one; `vision` runs a checkpointing command on the other with
    --notice and --requeue; a critical request of `urgent` queues. `gpu-agent preempt`: the
    command gets USR1 and checkpoints, its allocation ends preempted at the notice and the
    urgent request takes its GPU; run asks again (resuming it), and when `other` lets go the
    command resumes from its checkpoint on the other T4. Charged once each, nothing lost."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            monitor={"tick_seconds": 0.5},
            scheduler={"poll_seconds": 0.5},  # a queued request looks again this often
            simulation={"default_workload": "train"},
            preemption={"min_run_minutes": 0},
        )
    )
    state, log, ckpt = str(tmp_path / "s"), tmp_path / "log", tmp_path / "ckpt"
    common = ("--state-dir", state, "--fleet", str(fleet))
    ask = ("--purpose", "inference", "--count", "1", "--hours", "1")
    held = run_cli(
        "request", *common, "--project", "other", *ask, "--no-wait", "--json", cwd=tmp_path
    )
    assert held.returncode == 0, held.stderr
    other = json.loads(held.stdout)["allocation"]["id"]

    def cli(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "graph.cli", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def lines() -> list[list[str]]:
        return [x.split() for x in log.read_text().splitlines()] if log.exists() else []

    def queued(project: str) -> bool:
        with sqlite3.connect(Path(state) / "ledger.sqlite") as db:
            return bool(
                db.execute(
                    "SELECT 1 FROM allocations WHERE project=? AND state='queued'", (project,)
                ).fetchall()
            )

    runner = cli(
        "run", *common, "--project", "vision", *ask, "--notice", "3", "--grace", "10",
        "--requeue", "1", "--json", "--", sys.executable, "-c", PREEMPTIBLE, str(log), str(ckpt),
    )  # fmt: skip
    urgent = None
    try:
        wait_for(lambda: lines() and lines()[0][0] == "start", "the command to start")
        [[_, first, first_gpu]] = lines()
        urgent = cli("request", *common, "--project", "urgent", "--priority", "critical", *ask)
        wait_for(lambda: queued("urgent"), "the urgent request to queue")
        done = run_cli("preempt", *common, first, "--why", "urgent work", "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["allocation_id"] == first
        wait_for(lambda: queued("vision"), "the preempted work to queue again")
        assert run_cli("release", *common, other, cwd=tmp_path).returncode == 0
        out, err = runner.communicate(timeout=60)
    finally:
        runner.kill()
        if urgent is not None:
            urgent.kill()
    assert runner.returncode == 0, err
    report = json.loads(out)
    second = report["allocation_id"]
    assert report["requeued_from"] == [first] and report["ended_by"] == "command"
    events = lines()
    assert [e[0] for e in events] == ["start", "checkpoint", "term", "resume-from-step-41"]
    assert [e[1] for e in events] == [first, first, first, second]
    assert events[-1][2] != first_gpu  # on the other T4
    with sqlite3.connect(Path(state) / "ledger.sqlite") as db:
        reasons = dict(db.execute("SELECT id, release_reason FROM allocations").fetchall())
        resumes = db.execute("SELECT resumes FROM allocations WHERE id=?", (second,)).fetchone()
        charged = db.execute(
            "SELECT allocation_id, count(*) FROM charges GROUP BY allocation_id"
        ).fetchall()
        preempts = db.execute("SELECT target FROM audit WHERE action='preempt'").fetchall()
    assert reasons[first] == "preempted" and reasons[second] == "command-exit"
    assert resumes == (first,) and preempts == [(first,)]
    assert all(n == 1 for _, n in charged) and {first, second} <= {a for a, _ in charged}


def refuses_in_one_line(
    tmp_path: Path, command: str, cases: Callable[[str], dict[tuple[str, ...], str]]
) -> tuple[tuple[str, ...], str]:
    """`gpu-agent COMMAND` with each case's arguments (given a running allocation's id):
    exit 2, one line, the case's error in the JSON; the allocation still active after.
    Returns the common arguments and the allocation's id."""
    common = ("--state-dir", str(tmp_path / "s"))
    held = run_cli(
        "request", *common, "--project", "p", "--purpose", "inference", "--count", "1",
        "--hours", "1", "--no-wait", "--json", cwd=tmp_path,
    )  # fmt: skip
    aid = json.loads(held.stdout)["allocation"]["id"]
    for args, line in cases(aid).items():
        done = run_cli(command, *common, "--json", *args, cwd=tmp_path)  # before any `--`
        assert done.returncode == 2 and line in json.loads(done.stdout)["error"], done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    status = json.loads(run_cli("status", *common, "--json", cwd=tmp_path).stdout)
    [mine] = [a for a in status["allocations"] if a["id"] == aid]
    assert mine["state"] == "active"
    return common, aid


def test_the_command_refuses_in_one_line_and_changes_nothing(tmp_path: Path) -> None:
    """Without a checkpoint notice, with no reason given, for an unknown allocation: exit 2,
    one line (a JSON error with --json), the allocation as it was."""
    common, _ = refuses_in_one_line(
        tmp_path,
        "preempt",
        lambda aid: {
            (aid, "--why", "make room"): "has no checkpoint notice",
            (aid, "--why", "  "): "--why must be one line",
            ("a-nope", "--why", "x"): "'a-' and 12 hex digits",
            ("a-000000000000", "--why", "x"): "no allocation 'a-000000000000'",
        },
    )
    assert "preempt" not in run_cli("audit", *common, cwd=tmp_path).stdout
