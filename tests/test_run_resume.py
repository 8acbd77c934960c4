"""Crash safety in the middle of a preemption: `gpu-agent run --requeue` is SIGKILLed after
its command got its checkpoint notice and before the requeue; `gpu-agent run --resume`
carries the work on: the command resumes from its checkpoint once, each allocation is charged
once, the audit log shows one requeue, and a second `--resume` changes nothing. Below it, the
ledger's exactly-once requeue (fleet.ledger.runs) on SQLite and PostgreSQL, with two
connections racing."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.config import load_fleet
from fleet.errors import InvalidInput
from fleet.ledger import Ledger
from fleet.ledger.runs import successor_id, successor_thread
from fleet.models import ReleaseReason, RouteDecision
from fleet.monitors import this_host
from fleet.routing import route
from tests.conftest import fleet_toml, run_cli, small_config
from tests.test_budget_admission import HOUR, T0, Fleet
from tests.test_preemption import PREEMPTIBLE, refuses_in_one_line, running, wait_for

COMMAND = {"argv": ["true"], "cwd": "/", "grace_s": 1.0, "notice_s": 120.0}
DEAD = "nohost:1:dead:run"  # an owner: the `run` process that recorded the run


@pytest.fixture
def fleet(database: str) -> Iterator[Fleet]:
    """With a durable ledger: other connections (the claimants) share its database."""
    f = Fleet(database, small_config())
    f.ledger.close()
    f.ledger = Ledger(database, f.config)
    yield f
    f.ledger.close()


def yielded(fleet: Fleet, requeues: int = 1) -> str:
    """An allocation of a recorded `run --requeue`, preempted and released at its yield."""
    row = running(fleet)
    fleet.ledger.record_run(row.id, DEAD, COMMAND | {"notice_signal": "SIGUSR1"}, requeues)
    at = fleet.ledger.preempt(row.id, T0 + HOUR, "admin", "urgent work").after
    fleet.ledger.release(row.id, ReleaseReason.PREEMPTED, at)
    return row.id


def requeues(fleet: Fleet) -> list[str]:
    return [e.target for e in fleet.ledger.audit_log() if e.action == "requeue"]


def test_two_claimants_at_once_make_one_requeue(fleet: Fleet, database: str) -> None:
    """The dead run's successor and a `--resume` (two connections, released together): both
    are handed the same successor; one row for it, one audit entry, one requeue spent."""
    aid = yielded(fleet)
    others = [Ledger(database, fleet.config) for _ in range(2)]
    start = threading.Barrier(len(others))
    got: list[str] = []

    def claim(ledger: Ledger) -> None:
        start.wait()
        got.append(ledger.requeue(aid, DEAD, T0 + 2 * HOUR, "preempted before its command"))

    threads = [threading.Thread(target=claim, args=(ledger,)) for ledger in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ledger in others:
        ledger.close()
    assert got == [successor_id(aid)] * 2
    assert requeues(fleet) == [aid]
    record = fleet.ledger.run_record(aid)
    assert record is not None and record.successor == successor_id(aid)
    after = fleet.ledger.run_record(successor_id(aid))
    assert after is not None and after.requeues_left == 0 and after.successor is None
    assert [r.allocation_id for r in fleet.ledger.run_chain(successor_id(aid))] == [
        aid,
        successor_id(aid),
    ]
    again = fleet.ledger.requeue(aid, "another:2:x:run", T0 + 3 * HOUR, "again")
    assert again == successor_id(aid) and requeues(fleet) == [aid]  # attached, not requeued
    with pytest.raises(InvalidInput, match="no requeue left"):
        fleet.ledger.requeue(successor_id(aid), DEAD, T0 + 3 * HOUR, "why")


def test_the_successor_is_placed_under_its_fixed_id_once(fleet: Fleet) -> None:
    """Whoever places the successor places the same allocation: a second placement of it
    finds the first (the thread's request maps to one allocation)."""
    aid = yielded(fleet)
    fleet.ledger.requeue(aid, DEAD, T0 + 2 * HOUR, "why")
    request = fleet.ledger.successor_request(aid)
    assert request.resumes == aid and request.request_id == successor_thread(aid)
    decision = route(request, fleet.config, None)
    assert isinstance(decision, RouteDecision)
    place = (request, decision, successor_thread(aid), T0 + 2 * HOUR)
    first = fleet.ledger.place(*place, fleet.inventory, fleet.topology).row
    second = fleet.ledger.place(*place, fleet.inventory, fleet.topology).row
    assert first is not None and second is not None
    assert first.id == second.id == successor_id(aid)
    placed = fleet.ledger.query("SELECT count(*) FROM allocations WHERE resumes=?", (aid,))
    assert placed[0][0] == 1


def test_only_one_process_takes_a_dead_run_over(fleet: Fleet) -> None:
    aid = yielded(fleet)
    assert fleet.ledger.take_over(aid, DEAD, "host:10:a:run")
    assert not fleet.ledger.take_over(aid, DEAD, "host:11:b:run")
    record = fleet.ledger.run_record(aid)
    assert record is not None and record.owner == "host:10:a:run"


# ---- real subprocesses: SIGKILL between the notice and the requeue -----------------------------

# The yield is this long after the preemption: the checkpoint, a refused `--resume` (a CLI
# start, seconds on a loaded machine) and the kill all come well before it.
NOTICE_S = 30


def test_a_run_killed_mid_preemption_resumes_once_charged_once(tmp_path: Path) -> None:
    """`run --requeue 1 --notice 60`, preempted: the command checkpoints on its notice; a
    `run --resume` while the run lives is refused; the run is SIGKILLed before its
    allocation yields (so before any requeue). `run --resume` adopts the orphaned command,
    stops it at the yield, requeues once and starts it again, which resumes from its
    checkpoint. A second `--resume` changes nothing."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            monitor={"tick_seconds": 0.5},
            scheduler={"poll_seconds": 0.5},
            simulation={"default_workload": "train"},
            preemption={"min_run_minutes": 0},
        )
    )
    state, log, ckpt = tmp_path / "s", tmp_path / "log", tmp_path / "ckpt"
    common = ("--state-dir", str(state), "--fleet", str(fleet))
    ledger = state / "ledger.sqlite"

    def lines() -> list[list[str]]:
        return [x.split() for x in log.read_text().splitlines()] if log.exists() else []

    def one(sql: str, *args: object) -> list[tuple[object, ...]]:
        with sqlite3.connect(ledger) as db:
            return db.execute(sql, args).fetchall()

    runner = subprocess.Popen(
        [
            sys.executable, "-m", "graph.cli", "run", *common, "--project", "vision",
            "--purpose", "inference", "--count", "1", "--hours", "1",
            "--notice", str(NOTICE_S), "--grace", "10", "--requeue", "1", "--json",
            "--", sys.executable, "-c", PREEMPTIBLE, str(log), str(ckpt),
        ],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "run.err").open("w"),
    )  # fmt: skip  # not pipes: the command, orphaned, would hold them open
    try:
        wait_for(lambda: lines() and lines()[0][0] == "start", "the command to start")
        first = lines()[0][1]
        done = run_cli("preempt", *common, first, "--why", "urgent work", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        wait_for(
            lambda: (
                [e[0] for e in lines()] == ["start", "checkpoint"]
                and one("SELECT noticed_at FROM runs WHERE allocation_id=?", first)[0][0]
                is not None
            ),
            "the notice to reach the command and be recorded",
        )
        busy = run_cli("run", *common, "--resume", first, "--json", cwd=tmp_path)
        assert busy.returncode == 2, busy.stderr
        assert "not known to have died: nothing to resume" in json.loads(busy.stdout)["error"]
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == -signal.SIGKILL
    # killed between the notice and the requeue: the yield has not come, nothing requeued
    assert one("SELECT state FROM allocations WHERE id=?", first) == [("active",)]
    assert one("SELECT successor FROM runs") == [(None,)]

    resumed = run_cli("run", *common, "--resume", first, "--json", cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    second = report["allocation_id"]
    assert second == successor_id(first) and report["requeued_from"] == [first]
    assert report["ended_by"] == "command" and report["exit_code"] == 0
    events = lines()
    assert [e[0] for e in events] == ["start", "checkpoint", "term", "resume-from-step-41"]
    assert [e[1] for e in events] == [first, first, first, second]

    reasons = {r[0]: r[1] for r in one("SELECT id, release_reason FROM allocations")}
    # preempted where the adopted thread or the resumed run saw the yield come; expired-
    # while-down where it came before `--resume` started (reconciled at its start)
    assert set(reasons) == {first, second} and reasons[second] == "command-exit"
    assert reasons[first] in {"preempted", "expired-while-down"}
    [(yield_at, released_at, started_at, cost)] = one(
        "SELECT deadline, released_at, started_at, cost_usd FROM allocations WHERE id=?", first
    )
    assert released_at == pytest.approx(yield_at, abs=1e-3)  # charged to its yield, no later
    charged = one("SELECT allocation_id, count(*) FROM charges GROUP BY allocation_id")
    charges = {r[0]: r[1] for r in charged}
    assert charges == {first: 1, second: 1}
    assert one("SELECT amount_usd FROM charges WHERE allocation_id=?", first) == [(cost,)]
    assert one("SELECT resumes FROM allocations WHERE id=?", second) == [(first,)]
    assert one("SELECT target FROM audit WHERE action='requeue'") == [(first,)]
    assert one("SELECT target FROM audit WHERE action='preempt'") == [(first,)]
    assert isinstance(started_at, float) and isinstance(yield_at, float)

    again = run_cli("run", *common, "--resume", first, "--json", cwd=tmp_path)
    assert again.returncode == 2
    assert "nothing to resume" in json.loads(again.stdout)["error"], again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert len(one("SELECT id FROM allocations")) == 2
    assert one("SELECT target FROM audit WHERE action='requeue'") == [(first,)]
    assert len(lines()) == 4


def test_resume_refuses_in_one_line_and_changes_nothing(tmp_path: Path) -> None:
    """Not an allocation of a `run`, a command given with --resume, a bad id."""
    refuses_in_one_line(
        tmp_path,
        "run",
        lambda aid: {
            ("--resume", aid): "was not requested by `gpu-agent run`: nothing to resume",
            ("--resume", aid, "--", "true"): "--resume carries on the recorded command",
            ("--resume", "nope"): "'a-' and 12 hex digits",
        },
    )


def test_a_requeue_asked_for_but_not_placed_is_placed_once_by_resume(tmp_path: Path) -> None:
    """The `run` died after its requeue was written and before the successor was placed:
    `run --resume` places it under its fixed id (not a second requeue) and runs the recorded
    command there, in the recorded directory."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml())
    common = ("--state-dir", str(tmp_path / "s"), "--fleet", str(fleet))
    held = run_cli(
        "request", *common, "--project", "p", "--purpose", "inference", "--count", "1",
        "--hours", "1", "--no-wait", "--json", cwd=tmp_path,
    )  # fmt: skip
    aid = json.loads(held.stdout)["allocation"]["id"]
    exited = subprocess.Popen(["true"])  # an exited process of this host: the dead `run`
    exited.wait()
    dead = f"{this_host()}:{exited.pid}:x:run"
    out = tmp_path / "where"
    argv = [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.getcwd())"]
    command = {"argv": argv, "cwd": str(tmp_path), "grace_s": 5.0, "notice_s": 0.0}
    ledger = Ledger(tmp_path / "s" / "ledger.sqlite", load_fleet(fleet))
    try:
        ledger.record_run(aid, dead, command | {"notice_signal": "SIGUSR1"}, 2)
        ledger.release(aid, ReleaseReason.PREEMPTED, time.time())
        successor = ledger.requeue(aid, dead, time.time(), "preempted before its command")
    finally:
        ledger.close()
    resumed = run_cli("run", *common, "--resume", aid, "--json", cwd=tmp_path / "s")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["allocation_id"] == successor and report["requeued_from"] == [aid]
    assert out.read_text() == str(tmp_path)  # the recorded directory, not the caller's
    with sqlite3.connect(tmp_path / "s" / "ledger.sqlite") as db:
        rows = dict(db.execute("SELECT id, resumes FROM allocations").fetchall())
        requeued = db.execute("SELECT target FROM audit WHERE action='requeue'").fetchall()
    assert rows == {aid: None, successor: aid} and requeued == [(aid,)]
