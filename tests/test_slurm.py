"""The Slurm backend on a real Slurm 22.05 cluster the fixtures start (tests/slurmserver.py):
node gn1 with 4 A100 and 4 H100 GRES, node gn2 with 2 H100, one partition `gpu`.

Allocations through the graph become holder jobs that `srun --jobid` runs in; release cancels
them; a budget cut shortens their time limit; a job Slurm ends (its time limit, an
administrator's scancel) ends the allocation, charged once; jobs outside gpu-agent and drained
nodes are never placed on; a crash around the submission leaves no duplicate and no leak; bad
input changes nothing. The real clock throughout (Slurm's), with 1 s monitor ticks."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fleet.config import FleetConfig, parse_fleet
from fleet.errors import ConfigError, InvalidInput
from fleet.faults import ENV
from fleet.models import ReleaseReason, Status
from fleet.monitoring import OUTSIDE
from fleet.slurm.backend import PREFIX, SlurmFleet
from fleet.slurm.cluster import LIVE, Slurm
from graph.orchestrator import Orchestrator
from graph.records import Records
from graph.run_command import run_on
from tests.conftest import run_cli
from tests.slurmserver import SlurmServer

FLEET = """
catalog = ["T4", "V100", "A100", "H100", "H200", "RTX4090"]

[pools]
training = ["A100", "H100", "H200"]
inference = ["T4", "V100"]
research = ["RTX4090"]

[monitor]
tick_seconds = 1
idle_util_pct = 1

[scheduler]
poll_seconds = 1

[council]
auto_approve_max_gpus = 8
auto_approve_max_usd = 1000

[slurm]
start_timeout_seconds = 20
"""
T = TypeVar("T")


def fleet(extra: str = "") -> FleetConfig:
    return parse_fleet(FLEET + extra)


def ask(gpu_type: str, count: int, hours: float = 1.0, **more: Any) -> dict[str, Any]:
    return {
        "project": "vision",
        "purpose": "training",
        "gpu_type": gpu_type,
        "count": count,
        "duration_hours": hours,
        **more,
    }


@pytest.fixture
def orch(slurm: SlurmServer, tmp_path: Path) -> Iterator[Orchestrator]:
    with Orchestrator(tmp_path / "state", fleet(), backend="slurm") as o:
        yield o


def jobs(name: str | None = None) -> list[dict[str, Any]]:
    """Every job Slurm lists (finished ones for MinJobAge), or those of one allocation."""
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, check=True)
    found: list[dict[str, Any]] = json.loads(out.stdout)["jobs"]
    return [j for j in found if name is None or j["name"] == PREFIX + name]


def live(name: str | None = None) -> list[dict[str, Any]]:
    return [j for j in jobs(name) if j["job_state"] in LIVE]


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll until `check` gives something (Slurm acts on its own schedule)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def charged_once(orch: Orchestrator, aid: str) -> float:
    """The allocation's one charge (and one history row): its amount."""
    ledger = orch.services.ledger
    charges = ledger.query("SELECT amount_usd FROM charges WHERE allocation_id=?", (aid,))
    history = ledger.query("SELECT cost_usd FROM history WHERE allocation_id=?", (aid,))
    assert len(charges) == len(history) == 1
    assert charges[0][0] == history[0][0]
    return float(charges[0][0])


def sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--output=/dev/null", *args, "--wrap=exec sleep infinity"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# ---- the fixture itself ----------------------------------------------------------------------


def test_a_cluster_starts_well_under_a_minute_and_stops_clean(slurm: SlurmServer) -> None:
    from tests.slurmserver import scratch_root

    other = SlurmServer(scratch_root(), {"x1": [("h100", 1)]})
    began = time.monotonic()
    try:
        env = other.start()
        took = time.monotonic() - began
        held = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--output=/dev/null",
                "--gres=gpu:h100:1",
                "--wrap=exec sleep 60",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert held.stdout.strip().isdigit()
        assert len(other.pids()) == 3  # munged, slurmctld, one slurmd
    finally:
        other.stop()
        shutil.rmtree(other.root, ignore_errors=True)
    assert took < 20, took
    assert other.pids() == [] and other.leftovers() == []


# ---- inventory and status --------------------------------------------------------------------


def test_the_inventory_is_the_clusters_gpu_gres_by_type(slurm: SlurmServer) -> None:
    inv = SlurmFleet(fleet()).inventory()
    counts: dict[tuple[str, str], int] = {}
    for g in inv:
        counts[(g.node, g.gpu_type)] = counts.get((g.node, g.gpu_type), 0) + 1
    assert counts == {("gn1/A100", "A100"): 4, ("gn1/H100", "H100"): 4, ("gn2", "H100"): 2}
    assert {g.uuid for g in inv if g.node == "gn2"} == {"slurm:gn2:h100:0", "slurm:gn2:h100:1"}


def test_status_says_what_the_monitor_can_enforce(orch: Orchestrator) -> None:
    status = orch.status()
    assert status["backend"] == "slurm" and status["problem"] is None
    assert "leases and budgets only" in status["monitoring"]
    assert all(g["placeable"] and g["condition"] == "free" for g in status["gpus"])


# ---- a request, run in, released -------------------------------------------------------------


def test_a_request_is_a_job_srun_runs_in_until_it_is_released(
    orch: Orchestrator, slurm: SlurmServer
) -> None:
    placed = orch.request(ask("H100", 2), wait=False)
    assert placed.status is Status.ALLOCATED and placed.allocation is not None
    aid = placed.allocation.id
    job = orch.services.ledger.scheduler_job(aid)
    assert job is not None
    (held,) = live(aid)
    assert str(held["job_id"]) == job.job_id and held["job_state"] == "RUNNING"
    assert held["nodes"] == job.node == placed.allocation.nodes[0].split("/")[0]
    assert held["partition"] == "gpu" and held["time_limit"] == 60  # the 1-hour lease
    assert held["tres_per_node"] == "gres:gpu:h100:2"
    assert held["gres_detail"] == [f"gpu:h100:2(IDX:{job.gpus})"]
    seen = subprocess.run(
        ["srun", f"--jobid={job.job_id}", "sh", "-c", "echo $SLURM_JOB_ID $SLURM_GPUS_ON_NODE"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert seen.stdout.split() == [job.job_id, "2"]
    devices = subprocess.run(
        ["srun", f"--jobid={job.job_id}", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    if slurm.char_devices:  # gres.conf names device nodes: Slurm sets CUDA_VISIBLE_DEVICES
        lo, _, hi = job.gpus.partition("-")
        assert devices == ",".join(str(i) for i in range(int(lo), int(hi or lo) + 1))
    status = orch.status()
    (row,) = [a for a in status["allocations"] if a["id"] == aid]
    assert row["job"] == {
        "job_id": job.job_id,
        "node": job.node,
        "gpus": job.gpus,
        "started_at": job.started_at,
    }
    release = orch.release(aid)
    assert release.reason is ReleaseReason.EXPLICIT
    wait_for(lambda: not live(aid), 20, "the holder job ends on release")
    assert charged_once(orch, aid) == pytest.approx(release.cost_usd)
    assert len(jobs(aid)) == 1  # one job, never a second


def test_the_command_line_names_the_job_to_run_in(slurm: SlurmServer, tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET)
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(tmp_path / "fleet.toml")]
    args = ["--project", "vision", "--purpose", "training", "--count", "1", "--hours", "1"]
    done = run_cli("request", *args, "--backend", "slurm", "--no-wait", *opts, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (held,) = [j for j in live() if j["name"].startswith(PREFIX)]
    assert f"srun --jobid={held['job_id']}" in done.stdout
    shown = run_cli("status", "--backend", "slurm", "--json", *opts, cwd=tmp_path)
    (row,) = json.loads(shown.stdout)["allocations"]
    assert row["job"]["job_id"] == str(held["job_id"])
    assert "Slurm's time limit still ends it" in json.loads(shown.stdout)["problems"][0]
    assert row["enforced"].startswith("lease and budget only: no idle release")
    text = run_cli("status", "--backend", "slurm", *opts, cwd=tmp_path).stdout
    assert "enforced: lease and budget only: no idle release (its work does not run" in text


def test_status_says_an_allocation_whose_work_gpu_agent_runs_also_ends_with_it(
    orch: Orchestrator,
) -> None:
    placed = orch.request(ask("H100", 1), wait=False)
    assert placed.allocation is not None
    aid = placed.allocation.id

    def enforced() -> str:
        (row,) = [a for a in orch.status()["allocations"] if a["id"] == aid]
        return str(row["enforced"])

    assert enforced().startswith("lease and budget only")
    seen: list[str] = []

    def watch() -> None:  # while the command runs: what status says, then the release
        seen.append(str(wait_for(lambda: "command ends" in enforced() and enforced(), 30, "run")))
        orch.release(aid)

    watching = threading.Thread(target=watch)
    watching.start()
    try:  # in the main thread: `run` handles SIGINT and SIGTERM
        report = run_on(orch, aid, ["sleep", "60"], grace_s=1, say=lambda _: None)
    finally:
        watching.join(60)
    assert seen == ["lease and budget; released when its `gpu-agent run` command ends"]
    assert report.exit_code != 0  # the release's scancel ended the step
    assert orch.services.ledger.get(aid).release_reason is ReleaseReason.EXPLICIT


def test_gpu_agent_run_runs_the_command_as_a_step_of_the_job(
    slurm: SlurmServer, tmp_path: Path
) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET)
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(tmp_path / "fleet.toml")]
    args = ["--project", "vision", "--count", "2", "--hours", "1", "--gpu-type", "H100"]
    show = "echo job=$SLURM_JOB_ID gpus=$SLURM_GPUS_ON_NODE"
    done = run_cli("run", *args, "--backend", "slurm", *opts, "--", "sh", "-c", show, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Records(tmp_path / "s", fleet(), backend="slurm") as records:
        (row,) = records.services.ledger.allocations()
        assert row.release_reason is ReleaseReason.COMMAND_EXIT
    (job,) = jobs(row.id)
    assert f"job={job['job_id']} gpus=2" in done.stdout
    wait_for(lambda: not live(row.id), 20, "the job ends with the command")


# ---- the checkpoint notice as Slurm's --signal ----------------------------------------------

CATCH = "trap 'date +%s > {out}; exit 0' USR1; while :; do sleep 1; done"


def test_the_notice_is_the_jobs_signal_slurm_sends_to_the_work_before_the_deadline(
    orch: Orchestrator, tmp_path: Path
) -> None:
    """A two-minute lease with a 30 s notice: --signal=USR1@90 (the notice, and a minute for
    the time limit's rounding); Slurm signals the step that srun runs in the job, itself, at
    least 30 s before the ledger's deadline."""
    placed = orch.request(ask("H100", 1, hours=2 / 60, notice_seconds=30), wait=False)
    assert placed.allocation is not None
    aid = placed.allocation.id
    (held,) = live(aid)
    assert held["time_limit"] == 2
    out = tmp_path / "noticed"
    step = subprocess.Popen(
        ["srun", f"--jobid={held['job_id']}", "sh", "-c", CATCH.format(out=out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert step.wait(timeout=100) == 0  # the work caught the signal and exited
    finally:
        step.kill()
    row = orch.services.ledger.get(aid)
    assert row.state == "active" and row.deadline is not None  # nobody but Slurm signalled
    assert int(out.read_text()) <= row.deadline - 30
    orch.release(aid)


def test_gpu_agent_run_leaves_the_notice_to_slurm_and_the_command_gets_it_once(
    slurm: SlurmServer, tmp_path: Path
) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET)
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(tmp_path / "fleet.toml")]
    args = ["--project", "vision", "--count", "1", "--hours", str(2 / 60), "--notice", "30"]
    count = "trap 'echo noticed; exit 0' USR1; while :; do sleep 1; done"
    done = run_cli(
        "run", *args, "--backend", "slurm", "--json", *opts, "--", "sh", "-c", count, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "Slurm sends SIGUSR1 to the command" in done.stderr
    assert done.stdout.splitlines().count("noticed") == 1
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert report["ended_by"] == "command" and report["noticed"] is False  # Slurm's, not run's


def test_a_notice_signal_that_cannot_checkpoint_is_one_line(orch: Orchestrator) -> None:
    with pytest.raises(InvalidInput, match="notice_signal must be one of USR1"):
        orch.request(ask("H100", 1, notice_seconds=30, notice_signal="KILL"), wait=False)
    assert orch.services.ledger.allocations() == [] and not live()


# ---- a job Slurm keeps pending past the request's max wait ---------------------------------


@contextmanager
def reserved_for_someone_else() -> Iterator[None]:
    """A reservation of every node for another user: sinfo shows the nodes idle (gpu-agent
    places on them), and Slurm keeps our jobs pending (ReqNodeNotAvail) while it lasts."""
    name = f"maint-{os.getpid()}"
    subprocess.run(
        [
            *("scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now"),
            *("Duration=30", "Nodes=ALL", "Users=nobody", "Flags=IGNORE_JOBS"),
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        subprocess.run(["scontrol", "delete", f"ReservationName={name}"], capture_output=True)


def test_a_job_that_never_starts_within_the_max_wait_is_cancelled_and_charged_nothing(
    orch: Orchestrator,
) -> None:
    with reserved_for_someone_else():
        done = orch.request(ask("H100", 1, max_wait_minutes=0.1), wait=False)
        assert done.status is Status.TIMED_OUT
        assert done.reason is not None and done.reason.startswith("not started within 0.1 min: ")
        assert "within the request's max wait (PENDING: ReqNodeNotAvail" in done.reason
        (row,) = orch.services.ledger.allocations()
        assert row.state == "released" and row.release_reason is ReleaseReason.CANCELLED
        (job,) = jobs(row.id)  # one job, cancelled, none left
        assert job["job_state"] == "CANCELLED" and not live(row.id)
        assert charged_once(orch, row.id) == 0.0
        assert orch.services.reconcile_jobs() == [] and charged_once(orch, row.id) == 0.0


def test_a_job_slurm_starts_late_within_the_max_wait_runs_and_is_charged_from_its_start(
    orch: Orchestrator,
) -> None:
    with reserved_for_someone_else():
        placed: list[Any] = []
        asking = threading.Thread(
            target=lambda: placed.append(
                orch.request(ask("H100", 1, max_wait_minutes=1), wait=False)
            )
        )
        asking.start()
        wait_for(lambda: [j for j in live() if j["job_state"] == "PENDING"], 20, "pending")
        time.sleep(2)  # pending over a whole second: Slurm's start times are whole seconds
    # the reservation ended: Slurm starts the job
    asking.join(60)
    (done,) = placed
    assert done.status is Status.ALLOCATED and done.allocation is not None
    aid = done.allocation.id
    row = orch.services.ledger.get(aid)
    (held,) = live(aid)
    assert row.started_at is not None
    assert row.started_at == held["start_time"] == done.allocation.started_at.timestamp()
    assert row.enqueued_at < row.started_at  # placed, then pending, then started
    assert row.lease_end == row.deadline == pytest.approx(row.started_at + 3600)  # a whole hour
    release = orch.release(aid)
    ended = orch.services.ledger.get(aid).released_at
    assert ended is not None
    assert charged_once(orch, aid) == pytest.approx(release.cost_usd)
    # the ledger charges to 1e-9 USD: a charge of seconds is within that, not 1e-6 of itself
    held_h = (ended - row.started_at) / 3600
    assert release.cost_usd == pytest.approx(row.price_per_hour * held_h, abs=1e-9)


# ---- the lease and the budget ----------------------------------------------------------------


def test_a_budget_cut_shortens_the_jobs_time_limit(orch: Orchestrator) -> None:
    placed = orch.request(ask("A100", 1), wait=False)
    assert placed.allocation is not None
    aid = placed.allocation.id
    (held,) = live(aid)
    assert held["time_limit"] == 60
    price = placed.allocation.price_per_hour
    accrued = orch.costs()[0].accrued_usd
    moved = orch.set_budget("vision", accrued + price * 10 / 60)  # ten more minutes
    assert [m.id for m in moved] == [aid]
    row = orch.services.ledger.get(aid)
    assert row.deadline is not None and row.deadline_reason is ReleaseReason.BUDGET
    wanted = math.ceil((row.deadline - float(held["start_time"])) / 60)
    (after,) = live(aid)
    assert after["time_limit"] == wanted and 10 <= wanted <= 11


def test_a_renewed_term_raises_the_jobs_time_limit(slurm: SlurmServer, tmp_path: Path) -> None:
    """An approval with guardrails holds its GPUs a quarter hour at a time: the job is
    submitted for the term, and the term renewed (what the monitor does while the GPUs
    work) raises its time limit to the next term's end."""
    guarded = FLEET.replace(
        "[council]\nauto_approve_max_gpus = 8",
        '[council]\npolicy = "reference"\ndeny_threshold = 0.01\nguard_share = 0.01\n'
        "approve_threshold = 0.999\nguard_lease_hours = 0.25\nauto_approve_max_gpus = 0",
    )
    with Orchestrator(tmp_path / "state", parse_fleet(guarded), backend="slurm") as o:
        placed = o.request(ask("A100", 1), wait=False)
        assert placed.council is not None and placed.council.guardrails is not None
        assert placed.allocation is not None
        aid = placed.allocation.id
        (held,) = live(aid)
        assert held["time_limit"] == 15
        svc = o.services
        lease = svc.ledger.lease(aid)
        assert lease.lease_end is not None and lease.renew_hours == 0.25
        renewed = svc.ledger.renew(aid, lease.lease_end, svc.clock.now(), "its GPUs work")
        assert renewed is not None and svc.follow(aid, renewed.deadline) is None
        (after,) = live(aid)
        assert after["time_limit"] == math.ceil((renewed.deadline - held["start_time"]) / 60)
        assert 29 <= after["time_limit"] <= 31
        o.release(aid)


def test_under_max_min_the_more_served_jobs_time_limit_moves_to_its_yield(
    slurm: SlurmServer, tmp_path: Path
) -> None:
    """Max-min on Slurm (no minimum run): four A100s run one job with a 30 s notice; a
    request queued for one A100 has the served job yield at the end of its notice, audited,
    and Slurm's time limit for that job follows (one minute, Slurm's unit)."""
    config = fleet("\n[preemption]\nmin_run_minutes = 0\n")
    levelled = config.scheduler.model_copy(update={"policy": "max-min"})
    config = config.model_copy(update={"scheduler": levelled})
    with Orchestrator(tmp_path / "state", config, backend="slurm") as orch:
        held = orch.request(ask("A100", 4, notice_seconds=30), wait=False)
        assert held.allocation is not None
        aid = held.allocation.id
        assert live(aid)[0]["time_limit"] == 60
        waiting = orch.request(ask("A100", 1, notice_seconds=30), wait=False)
        assert waiting.status is Status.QUEUED
        row = orch.services.ledger.get(aid)
        assert row.deadline_reason is ReleaseReason.PREEMPTED and row.deadline is not None
        assert row.deadline - time.time() <= 31
        (entry,) = [e for e in orch.services.ledger.audit_log() if e.action == "preempt"]
        assert entry.target == aid and "max-min" in entry.detail
        wait_for(lambda: live(aid)[0]["time_limit"] == 1, 10, "the time limit moved")


def test_a_lease_slurm_ends_is_released_once_with_its_reason(
    slurm: SlurmServer, tmp_path: Path
) -> None:
    """Nothing monitors it: Slurm's own time limit ends the one-minute lease (Slurm checks time
    limits every 30 s, so 60-90 s after the start), and the next start-up learns it."""
    with Orchestrator(tmp_path / "state", fleet(), backend="slurm") as orch:
        placed = orch.request(ask("A100", 1, hours=1 / 60), wait=False)
        assert placed.allocation is not None
        aid = placed.allocation.id
        (held,) = live(aid)
        assert held["time_limit"] == 1
    ended = wait_for(
        lambda: [j for j in jobs(aid) if j["job_state"] == "TIMEOUT"], 150, "Slurm's time limit"
    )
    assert ended
    with Orchestrator(tmp_path / "state", fleet(), backend="slurm") as orch:
        row = orch.services.ledger.get(aid)
        assert row.state == "released" and row.release_reason is ReleaseReason.LEASE_EXPIRED
        assert row.deadline is not None and row.released_at == pytest.approx(row.deadline)
        cost = charged_once(orch, aid)
        assert cost == pytest.approx(row.price_per_hour / 60)  # the minute it held
        (entry,) = [e for e in orch.audit() if e.target == aid and e.action == "release"]
        assert entry.who.startswith("slurm: Slurm job") and "TIMEOUT" in entry.who
    with Orchestrator(tmp_path / "state", fleet(), backend="slurm") as orch:
        assert charged_once(orch, aid) == cost  # a second start-up charges nothing more


def test_an_administrators_scancel_ends_the_allocation_charged_once(
    orch: Orchestrator,
) -> None:
    placed = orch.request(ask("H100", 1), wait=False)
    assert placed.allocation is not None
    aid = placed.allocation.id
    (held,) = live(aid)
    subprocess.run(["scancel", str(held["job_id"])], check=True)
    done = orch.resume(placed.thread_id)  # the monitor's next tick sees it
    assert done.status is Status.RELEASED and done.release is not None
    assert done.release.reason is ReleaseReason.CANCELLED_OUTSIDE
    messages = [e.message for e in orch.outcome(placed.thread_id).events]
    assert any(f"Slurm job {held['job_id']} ended CANCELLED" in m for m in messages)
    cost = charged_once(orch, aid)
    (gone,) = jobs(aid)  # charged until Slurm's end of the job (whole seconds)
    held_s = max(0.0, gone["end_time"] - placed.allocation.started_at.timestamp())
    assert cost == pytest.approx(done.release.cost_usd)
    assert cost == pytest.approx(placed.allocation.price_per_hour * held_s / 3600, abs=1e-8)
    assert orch.services.reconcile_jobs() == []  # nothing left to end
    assert charged_once(orch, aid) == cost


# ---- what gpu-agent does not place on --------------------------------------------------------


def test_gpus_held_by_jobs_outside_gpu_agent_are_never_placed(orch: Orchestrator) -> None:
    outside = sbatch("--job-name=someone-else", "--nodelist=gn1", "--gres=gpu:h100:4")
    wait_for(lambda: [j for j in live() if j["job_state"] == "RUNNING"], 20, "the outside job")
    status = orch.status()
    gn1 = [g for g in status["gpus"] if g["node"] == "gn1/H100"]
    assert len(gn1) == 4 and all(g["condition"] == OUTSIDE for g in gn1)
    assert not any(g["placeable"] for g in gn1)
    placed = orch.request(ask("H100", 2), wait=False)
    assert placed.allocation is not None and placed.allocation.nodes == ["gn2"]
    queued = orch.request(ask("H100", 1), wait=False)  # gn1's are someone else's, gn2's ours
    assert queued.status is Status.QUEUED
    assert len(live()) == 2  # the outside job and ours: nothing submitted for the queued one
    orch.release(placed.allocation.id)
    subprocess.run(["scancel", outside], check=True)


def test_a_drained_node_leaves_placement_until_it_is_resumed(
    orch: Orchestrator, slurm: SlurmServer
) -> None:
    subprocess.run(
        ["scontrol", "update", "NodeName=gn2", "State=DRAIN", "Reason=repairs"], check=True
    )
    gn2 = [g for g in orch.status()["gpus"] if g["node"] == "gn2"]
    assert all(not g["placeable"] and "drain" in g["condition"] for g in gn2)
    assert "repairs" in gn2[0]["condition"]
    placed = orch.request(ask("H100", 2), wait=False)
    assert placed.allocation is not None and placed.allocation.nodes == ["gn1/H100"]
    subprocess.run(["scontrol", "update", "NodeName=gn2", "State=RESUME"], check=True)
    slurm_nodes = wait_for(
        lambda: all(g["placeable"] for g in orch.status()["gpus"] if g["node"] == "gn2"),
        20,
        "gn2 back in placement",
    )
    assert slurm_nodes
    orch.release(placed.allocation.id)


# ---- crash safety ----------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["allocate:placed", "allocate:submitted"])
def test_a_sigkill_around_the_submission_then_resume_makes_one_job(
    slurm: SlurmServer, tmp_path: Path, point: str
) -> None:
    """Killed after the ledger placed it (before sbatch), or after sbatch (before the ledger
    recorded the job and the checkpoint): the resume finds the job by its name or submits it,
    once; the release leaves none."""
    (tmp_path / "fleet.toml").write_text(FLEET)
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(tmp_path / "fleet.toml")]
    died = run_cli(
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "1",
        "--gpu-type",
        "H100",
        "--thread-id",
        "t",
        "--backend",
        "slurm",
        *opts,
        cwd=tmp_path,
        env={ENV: point},
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    ours = [j for j in live() if j["name"].startswith(PREFIX)]
    assert len(ours) == (1 if point == "allocate:submitted" else 0)
    with Orchestrator(tmp_path / "state", fleet(), backend="slurm") as orch:
        (row,) = orch.services.ledger.allocations("active")
        resumed = orch.resume("t", wait=False)
        assert resumed.status is Status.ALLOCATED
        (held,) = live(row.id)
        job = orch.services.ledger.scheduler_job(row.id)
        assert job is not None and job.job_id == str(held["job_id"])
        assert len(jobs(row.id)) == 1  # no duplicate
        orch.release(row.id)
        wait_for(lambda: not live(row.id), 20, "the job ends on release")
        assert not [j for j in live() if j["name"].startswith(PREFIX)]  # no leak
        charged_once(orch, row.id)


def test_a_restart_cancels_the_job_of_an_allocation_that_ended_meanwhile(
    orch: Orchestrator, tmp_path: Path
) -> None:
    placed = orch.request(ask("A100", 1), wait=False)
    assert placed.allocation is not None
    aid = placed.allocation.id
    # a crash between the ledger's release and the scancel: the job outlives its allocation
    orch.services.ledger.release(aid, ReleaseReason.EXPLICIT, orch.services.clock.now())
    assert live(aid)
    with Records(tmp_path / "state", fleet(), backend="slurm"):
        wait_for(lambda: not live(aid), 20, "the start-up cancels the job")


# ---- bad input -------------------------------------------------------------------------------


def test_an_unknown_partition_is_one_line_and_changes_nothing(
    slurm: SlurmServer, tmp_path: Path
) -> None:
    bad = fleet('partitions = { training = "nope" }\n')
    with pytest.raises(ConfigError) as caught:
        Orchestrator(tmp_path / "state", bad, backend="slurm")
    assert str(caught.value) == (
        "[slurm] partitions.training: the Slurm cluster has no partition 'nope' (it has gpu)"
    )
    (tmp_path / "fleet.toml").write_text(FLEET + 'partitions = { training = "nope" }\n')
    done = run_cli(
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--backend",
        "slurm",
        "--state-dir",
        str(tmp_path / "cli"),
        "--fleet",
        str(tmp_path / "fleet.toml"),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no partition 'nope'" in done.stderr
    assert not live()


def test_a_gres_type_the_catalog_does_not_price_is_shown_never_placed(
    slurm: SlurmServer, tmp_path: Path
) -> None:
    no_a100 = parse_fleet(
        FLEET.replace('"A100", ', "").replace('["A100", "H100", "H200"]', '["H100", "H200"]')
    )
    with Orchestrator(tmp_path / "state", no_a100, backend="slurm") as orch:
        status = orch.status()
        assert status["unpriced_types"] == ["A100"]
        a100 = [g for g in status["gpus"] if g["type"] == "A100"]
        assert len(a100) == 4 and not any(g["placeable"] for g in a100)
        with pytest.raises(InvalidInput, match="A100"):
            orch.request(ask("A100", 1), wait=False)
        assert orch.services.ledger.allocations() == [] and not live()


def test_a_slurm_that_is_down_is_one_line_and_changes_nothing(
    slurm: SlurmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = tmp_path / "down.conf"
    text = slurm.conf.read_text()
    port = next(ln for ln in text.splitlines() if ln.startswith("SlurmctldPort="))
    down.write_text(text.replace(port, "SlurmctldPort=1"))  # nobody answers there
    monkeypatch.setenv("SLURM_CONF", str(down))
    assert Slurm(5).run("sinfo", "--version")  # the commands themselves are there
    (tmp_path / "fleet.toml").write_text(FLEET)
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(tmp_path / "fleet.toml")]
    done = run_cli(
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--backend",
        "slurm",
        *opts,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("gpu-agent: no GPUs to place on: sinfo: ")
    assert "Unable to contact slurm controller" in done.stderr
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    with Records(tmp_path / "s", fleet(), backend="slurm") as records:
        assert records.services.ledger.allocations() == []
    assert not live()
