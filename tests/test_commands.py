"""What gpu-agent knows of an allocation's work: what `gpu-agent run` tells the monitor
(fleet.commands: a command runs, it exited, or its supervisor died), what the record counts as
hoarding, and a request that resumes released work; on SQLite and PostgreSQL, and through a
real `run` subprocess."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.commands import Commands, work
from fleet.config import FleetConfig, load_fleet
from fleet.ledger import Ledger
from fleet.ledger.rows import Resumed
from fleet.left_running import Ended
from fleet.models import GPURequest, ReleaseReason, RouteDecision
from fleet.monitors import new_owner
from fleet.routing import route
from fleet.simulated import SimulatedFleet
from fleet.supervise import Stopped
from fleet.topology import Topology
from graph.run_command import requeues
from tests.conftest import run_cli
from tests.test_monitors import T0, place
from tests.test_run import idle_fleet

STALE = 30.0  # heartbeat_stale_seconds


@pytest.fixture
def ledger(database: str, config: FleetConfig) -> Iterator[Ledger]:
    led = Ledger(database, config)
    yield led
    led.close()


def dead_owner() -> str:
    """A `run` process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host, _pid, *rest = new_owner("run").split(":")
    return ":".join([host, str(proc.pid), *rest])


def test_a_command_runs_then_its_exit_says_the_work_is_done(ledger: Ledger) -> None:
    commands, aid = Commands(ledger), place(ledger, "t1")
    assert work(ledger.lease(aid), STALE) == "unknown"  # nothing known: idleness decides
    owner = new_owner("run")
    commands.started(aid, owner, T0)
    assert work(ledger.lease(aid), STALE) == "running"
    commands.ended(aid, "h:1:earlier:run", T0 + 30, 0)  # another run's exit says nothing
    assert work(ledger.lease(aid), STALE) == "running"
    commands.ended(aid, owner, T0 + 60, 0)
    lease = ledger.lease(aid)
    assert work(lease, STALE) == "done" and lease.command_ended_at == T0 + 60
    commands.ended(aid, owner, T0 + 90, 1)  # once: the first exit stands
    assert ledger.lease(aid).command_ended_at == T0 + 60
    commands.started(aid, new_owner("run"), T0 + 120)  # a second command on it
    assert work(ledger.lease(aid), STALE) == "running"


def test_a_dead_supervisor_shields_nothing(ledger: Ledger) -> None:
    commands, aid = Commands(ledger), place(ledger, "t2")
    commands.started(aid, dead_owner(), T0)
    assert work(ledger.lease(aid), STALE) == "unknown"


def another_hosts_run() -> str:
    """A `run` process of another host (or PID namespace): only its beats say it lives."""
    _, *rest = new_owner("run").split(":")
    return ":".join(["elsewhere@1", *rest])


def test_a_run_on_another_host_shields_only_while_it_beats(ledger: Ledger) -> None:
    """Before its beats, a command whose `run` ran on another host counted as running for
    good, even after that run died: the allocation was never released for idling. Now it
    counts while the run beat within heartbeat_stale_seconds (wall clock)."""
    commands, aid = Commands(ledger), place(ledger, "t3")
    owner = another_hosts_run()
    commands.started(aid, owner, T0)  # beats now, as it starts
    lease = ledger.lease(aid)
    assert lease.command_beat_at == pytest.approx(time.time(), abs=5)
    assert work(lease, STALE) == "running"
    ledger.db.liveness("UPDATE commands SET beat_at=? WHERE allocation_id=?", (1.0, aid))
    assert work(ledger.lease(aid), STALE) == "unknown"  # went quiet: it died
    with commands.beating(aid, owner, period=0.01):
        deadline = time.monotonic() + 30
        while work(ledger.lease(aid), STALE) != "running":  # its beats bring it back
            assert time.monotonic() < deadline
            time.sleep(0.01)
    ledger.db.liveness("UPDATE commands SET beat_at=NULL WHERE allocation_id=?", (aid,))
    assert work(ledger.lease(aid), STALE) == "unknown"  # a run from before the beats


def test_one_command_at_a_time_and_a_claim_whose_command_never_started_is_undone(
    ledger: Ledger,
) -> None:
    """A second `run` on an allocation whose command a living run supervises is refused (the
    second's exit would tell the monitor the first's work was done); once that run died or
    its command exited, another may claim it. A claim whose command then fails to start puts
    back what the allocation's command was."""
    commands, aid, fresh = Commands(ledger), place(ledger, "t4"), place(ledger, "t5")
    first, second = new_owner("run"), new_owner("run")
    assert commands.claim(aid, first, T0, STALE).holder is None
    assert commands.claim(aid, second, T0 + 1, STALE).holder == first
    assert ledger.lease(aid).command_owner == first
    commands.ended(aid, first, T0 + 60, 0)
    claim = commands.claim(aid, second, T0 + 61, STALE)
    assert claim.holder is None and ledger.lease(aid).command_owner == second
    commands.unclaim(aid, second, claim)  # its command never started
    lease = ledger.lease(aid)
    assert (lease.command_owner, lease.command_ended_at) == (first, T0 + 60)
    assert work(lease, STALE) == "done"
    dead = dead_owner()
    commands.started(fresh, dead, T0)
    claim = commands.claim(fresh, second, T0 + 1, STALE)  # its run died
    assert claim.holder is None and ledger.lease(fresh).command_owner == second
    commands.unclaim(fresh, second, claim)
    assert ledger.lease(fresh).command_owner == dead
    none = place(ledger, "t6")
    commands.unclaim(none, second, commands.claim(none, second, T0, STALE))
    assert ledger.lease(none).command_owner is None


def test_a_stopped_leftover_points_to_resume_only_where_there_is_a_run_to_resume() -> None:
    stopped = Stopped(terminated=True, killed=False, leftover=[])
    assert (
        Ended(stopped, given=False)
        .said("a-1")
        .endswith("`gpu-agent run --resume a-1` carries its work on")
    )
    assert "resume" not in Ended(stopped, given=True).said("a-1")


def test_run_on_a_given_allocation_records_its_command(tmp_path: Path) -> None:
    """`run --allocation`: the command's start and exit reach the ledger; the allocation
    stays its owner's, and its monitor now knows the work is done."""
    state, fleet = str(tmp_path / "s"), str(idle_fleet(tmp_path))
    placed = run_cli(
        "request",
        "--state-dir",
        state,
        "--fleet",
        fleet,
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--no-wait",
        "--json",
        cwd=tmp_path,
    )
    assert placed.returncode == 0, placed.stderr
    aid = json.loads(placed.stdout)["allocation"]["id"]
    done = run_cli(
        "run",
        "--state-dir",
        state,
        "--fleet",
        fleet,
        "--allocation",
        aid,
        "--json",
        "--",
        sys.executable,
        "-c",
        "pass",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ended_by"] == "command"
    ledger = Ledger(str(Path(state) / "ledger.sqlite"), load_fleet(fleet))
    try:
        assert work(ledger.lease(aid), STALE) == "done"
    finally:
        ledger.close()


def hoarded(ledger: Ledger, aid: str) -> float:
    (record,) = [r for r in ledger.history() if r.allocation_id == aid]
    return record.hoarded_hours


def test_the_record_counts_only_what_was_held_with_no_work_left(ledger: Ledger) -> None:
    """Hoarding is the time after the command exited or since every GPU went idle, the
    longer; not the allocation, and nothing when neither is known."""
    commands = Commands(ledger)
    exited, idle, both, neither = (place(ledger, f"h{i}") for i in range(4))
    owner = new_owner("run")
    commands.started(exited, owner, T0)
    commands.ended(exited, owner, T0 + 1800, 0)
    ledger.heartbeat(idle, T0 + 2400, 40, 800.0, 40, 0.0, idle_since=T0 + 2700)
    commands.started(both, owner, T0)
    commands.ended(both, owner, T0 + 2700, 0)
    ledger.heartbeat(both, T0 + 2400, 40, 800.0, 40, 0.0, idle_since=T0 + 1800)
    for aid in (exited, idle, both, neither):
        ledger.release(aid, ReleaseReason.IDLE, T0 + 3600)
    assert hoarded(ledger, exited) == 0.5 and hoarded(ledger, idle) == 0.25
    assert hoarded(ledger, both) == 0.5 and hoarded(ledger, neither) == 0.0
    older = ledger.project_stats("p", T0 + 3600, recent=1).older
    assert older is not None and older.hoarded_gpu_hours == pytest.approx(0.75, rel=1e-6)


def test_a_request_that_resumes_work_turns_the_pause_back_from_hoarding(ledger: Ledger) -> None:
    """Released for idling after 30 idle minutes, then resumed by its own project 15 minutes
    later: the idle half hour was a pause (the record no longer counts it), the pause lasted
    45 minutes, and asking again changes nothing. Another project may not claim it."""
    aid = place(ledger, "r1")
    ledger.heartbeat(aid, T0 + 1800, 30, 900.0, 30, 0.0, idle_since=T0 + 1800)
    ledger.release(aid, ReleaseReason.IDLE, T0 + 3600)
    assert hoarded(ledger, aid) == 0.5
    assert ledger.resumable("p", aid) is None
    assert ledger.resumable("q", aid) == f"q has no released allocation {aid} to resume"
    assert ledger.resumable("p", "a-000000000000") is not None
    again = ledger.resume(aid, "a-111111111111", T0 + 4500, T0 + 4500)
    assert again == Resumed(2700.0, False, idle_released=True)
    assert ledger.resume(aid, "a-111111111111", T0 + 9999, T0 + 9999).pause_s == 2700.0  # once
    # work goes on once: a second request that says it resumes the same work is refused,
    # and one that got past the check meanwhile (queued) gets nothing from it
    assert ledger.resumable("p", aid) == (
        f"allocation {aid}'s work was resumed already, by a-111111111111"
    )
    assert ledger.resume(aid, "a-222222222222", T0 + 9999, T0 + 9999) == Resumed(0.0, False)
    assert hoarded(ledger, aid) == 0.0
    with ledger.reading() as db:
        assert db.execute("SELECT idle_gpu_hours FROM records WHERE project='p'").fetchone()[
            0
        ] == pytest.approx(0.0, abs=1e-9)


def test_work_a_live_request_resumes_is_not_offered_to_another(ledger: Ledger) -> None:
    """Two requests that both say they resume one released allocation would both go ahead
    of new work: while one is queued or running, the other is refused (not the request
    itself, asked again: validate re-runs on a resume)."""
    aid = place(ledger, "r1")
    ledger.release(aid, ReleaseReason.IDLE, T0 + 3600)
    request = GPURequest(
        project="p",
        count=1,
        duration_hours=1,
        gpu_type="A100",
        request_id="r-again",
        resumes=aid,
    )
    decision = route(request, ledger.config, None)
    assert isinstance(decision, RouteDecision)
    inventory = SimulatedFleet(ledger.config).inventory()
    placed = ledger.place(
        request, decision, "again", T0 + 3700, inventory, Topology(ledger.config, inventory)
    )
    assert placed.row is not None and placed.row.state == "active"
    assert ledger.resumable("p", aid) == (
        f"allocation {aid}'s work is being resumed already, by {placed.row.id} (active)"
    )
    assert ledger.resumable("p", aid, mine=placed.row.id) is None
    ledger.release(placed.row.id, ReleaseReason.EXPLICIT, T0 + 3800)  # gave up before it ran
    assert ledger.resumable("p", aid) is None


def test_work_resumed_at_once_after_an_idle_release_went_on_while_it_looked_idle(
    ledger: Ledger,
) -> None:
    """Asked for again within a tick of its idle release: the job was not paused, it worked
    at a utilisation the monitor reads as idle; its next allocation is not judged by idling."""
    aid = place(ledger, "w1")
    ledger.heartbeat(aid, T0 + 600, 10, 20.0, 10, 2.0, idle_since=T0 + 600)
    ledger.release(aid, ReleaseReason.IDLE, T0 + 2400)
    assert ledger.resume(aid, "a-222222222222", T0 + 2400, T0 + 2400) == Resumed(1800.0, True, True)


def test_an_idle_release_anywhere_back_along_the_resumes_spares_the_work(
    ledger: Ledger,
) -> None:
    """Killed in a pause by an idle release, resumed, then ended by its lease and resumed
    again: the third allocation still carries the first's lesson (the council's and the
    stream's stricter releases spare it). A chain with no idle release carries none."""
    first, second, third = (place(ledger, f"c{i}") for i in range(3))
    ledger.release(first, ReleaseReason.IDLE, T0 + 3600)
    assert ledger.resume(first, second, T0 + 4000, T0 + 4000).idle_released
    ledger.release(second, ReleaseReason.LEASE_EXPIRED, T0 + 7200)
    assert ledger.resume(second, third, T0 + 7300, T0 + 7300).idle_released
    plain, after = place(ledger, "d0"), place(ledger, "d1")
    ledger.release(plain, ReleaseReason.LEASE_EXPIRED, T0 + 3600)
    assert not ledger.resume(plain, after, T0 + 3700, T0 + 3700).idle_released


def test_resumes_names_an_allocation() -> None:
    with pytest.raises(ValueError, match="allocation id"):
        GPURequest(project="p", duration_hours=1, resumes="../a-1")


def test_resuming_an_allocation_that_is_not_the_projects_is_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "request",
        "--state-dir",
        str(tmp_path / "s"),
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--resumes",
        "a-000000000000",
        "--no-wait",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr  # refused before anything is written
    assert "vision has no released allocation a-000000000000 to resume" in done.stderr
    assert done.stderr.count("\n") == 1
    checkpoints = tmp_path / "s" / "checkpoints.sqlite"
    if checkpoints.exists():  # no thread was started
        with sqlite3.connect(checkpoints) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "checkpoints" in tables:
                assert db.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 0


def test_a_term_not_renewed_spares_the_work_that_resumes_it(ledger: Ledger) -> None:
    """A lease held a quarter hour at a time whose monitor let its term end (its GPUs looked
    idle all of it) taught what an idle release teaches: the allocation that resumes its
    work has its terms renewed whatever its GPUs do. A term that ran out unwatched (no
    monitor decided) and a lease that ran out whole did not."""
    term, after = place(ledger, "e0", renew_hours=0.25), place(ledger, "e1")
    ledger.decline(term, T0 + 900, T0 + 840, "every GPU idle")
    ledger.decline(term, T0 + 900, T0 + 841, "again")  # once
    assert [e.action for e in ledger.audit_log("p")].count("not-renewed") == 1
    ledger.release(term, ReleaseReason.LEASE_EXPIRED, T0 + 900)
    assert ledger.resume(term, after, T0 + 1000, T0 + 1000).idle_released
    unwatched, then = place(ledger, "g0", renew_hours=0.25), place(ledger, "g1")
    ledger.release(unwatched, ReleaseReason.LEASE_EXPIRED, T0 + 900)
    assert not ledger.resume(unwatched, then, T0 + 1000, T0 + 1000).idle_released
    whole, next_ = place(ledger, "f0", renew_hours=1.0), place(ledger, "f1")  # no term: 1 h
    ledger.release(whole, ReleaseReason.LEASE_EXPIRED, T0 + 3600)
    assert not ledger.resume(whole, next_, T0 + 3700, T0 + 3700).idle_released
    down, later = place(ledger, "h0", renew_hours=0.25), place(ledger, "h1")  # declined,
    end = ledger.lease(down).lease_end  # (placed once the GPUs above are back)
    assert end is not None
    assert ledger.decline(down, end, end - 60, "every GPU idle")  # then ended while none
    ledger.release(down, ReleaseReason.EXPIRED_WHILE_DOWN, end)  # watched
    assert ledger.resume(down, later, end + 100, end + 100).idle_released


def test_run_requeues_a_lease_that_ran_out_but_not_a_term_its_monitor_declined(
    ledger: Ledger,
) -> None:
    """`run --requeue` carries work on past an accident; a term let end because its GPUs sat
    idle all of it is an idle release in effect (a hung command would hold GPUs a term after
    a term, each requeue spared the guardrail that caught it)."""
    declined, ran_out = place(ledger, "d0", renew_hours=0.25), place(ledger, "d1")
    ledger.decline(declined, T0 + 900, T0 + 840, "every GPU idle")
    assert ledger.declined(declined) and not ledger.declined(ran_out)
    lease = ReleaseReason.LEASE_EXPIRED.value
    assert not requeues(ledger, declined, lease)
    assert requeues(ledger, ran_out, lease)
    assert not requeues(ledger, ran_out, ReleaseReason.IDLE.value)
