"""Many workers on one PostgreSQL database: the job queue, placement from several processes,
and a SIGKILLed worker whose threads another worker finishes from their checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.jobs import JobQueue
from fleet.ledger import Ledger
from fleet.models import GPURequest, ReleaseReason
from tests.conftest import OrchFactory, add_token, fleet_toml, run_cli, small_config
from tests.pgserver import bindir
from tests.test_monitors import ledger_route

REQUIRE_PG = bool(os.environ.get("GPU_AGENT_REQUIRE_POSTGRES"))
REQUEST = GPURequest(project="p", purpose="training", count=1, duration_hours=1)


@pytest.fixture
def queue(database: str, config: FleetConfig) -> JobQueue:
    return JobQueue(Ledger(database, config))


def test_claims_leases_and_takeover(queue: JobQueue) -> None:
    for i in range(3):
        queue.submit(f"t{i}", REQUEST, now=100.0 + i)
    with pytest.raises(InvalidInput, match="already submitted"):
        queue.submit("t0", REQUEST)
    a = queue.claim("A", 10.0, now=200.0)
    b = queue.claim("B", 10.0, now=200.0)
    assert a is not None and b is not None and (a.thread_id, b.thread_id) == ("t0", "t1")
    assert queue.renew("A", 10.0, now=205.0) == 1  # A's lease now runs to 215
    c = queue.claim("C", 10.0, now=212.0)  # B's ran out at 210; A's did not
    assert c is not None and c.thread_id == "t1" and c.attempts == 2 and c.worker == "C"
    assert not queue.finish("t1", "B", "released", now=213.0)  # B lost it: C's result counts
    assert queue.finish("t1", "C", "released", now=214.0)
    assert queue.hand_back("A") == 1
    assert [j.thread_id for j in queue.jobs("pending")] == ["t0", "t2"]
    assert queue.counts() == {"pending": 2, "running": 0, "done": 1}
    assert queue.get("t1").outcome == "released" and queue.get("t1").request == REQUEST
    queue.ledger.close()


def test_a_worker_never_claims_a_job_it_runs(queue: JobQueue) -> None:
    """Its lease ran out while one of its threads runs the job (a renewal held up by a lock):
    another worker may take the job over, this one's other threads may not (two of its
    threads would run one graph thread side by side)."""
    queue.submit("t0", REQUEST, now=100.0)
    assert queue.claim("A", 10.0, now=200.0) is not None
    assert queue.claim("A", 10.0, now=300.0) is None  # its own, lapsed
    taken = queue.claim("B", 10.0, now=300.0)
    assert taken is not None and taken.worker == "B" and taken.attempts == 2
    queue.ledger.close()


def test_a_job_its_workers_keep_dying_on_is_given_up_and_what_it_placed_released(
    make_orch: OrchFactory,
) -> None:
    """A job claimed more often than max_attempts (each worker running it died: a crash it
    causes) fails at the next claim, saying why, and what its thread placed is released:
    it no longer takes down every worker that serves the queue."""
    from graph.worker import Worker

    orch = make_orch()
    job = orch.submit(REQUEST.model_copy(update={"duration_hours": 5}), thread_id="poison")
    queue = JobQueue(orch.services.ledger)
    first = queue.claim("dead-1", 1.0, now=100.0)
    assert first is not None
    placed = orch.request(
        REQUEST.model_copy(update={"duration_hours": 5, "request_id": "r2"}), wait=False
    )
    assert placed.allocation is not None
    held = orch.services.ledger.place(  # what the dead worker's thread had placed
        job.request,
        ledger_route(orch),
        "poison",
        orch.services.clock.now(),
        orch.services.inventory,
        orch.services.topology,
    ).row
    assert held is not None and held.state == "active"
    for n in (2, 3):  # two more workers die running it
        assert queue.claim(f"dead-{n}", 1.0, now=100.0 + 10 * n) is not None
    worker = Worker(orch, concurrency=1, max_attempts=3)
    last = queue.claim(worker.worker_id, 30.0, now=200.0)
    assert last is not None and last.attempts == 4
    worker._run(last)
    done = queue.get("poison")
    assert (done.state, done.outcome) == ("done", "failed")
    assert done.error == "its workers stopped 3 times running it"
    row = orch.services.ledger.get(held.id)
    assert row.state == "released" and row.release_reason is ReleaseReason.CANCELLED
    assert orch.services.ledger.get(placed.allocation.id).state == "active"  # not its


def test_a_job_whose_allocation_a_live_process_monitors_is_not_given_up(
    make_orch: OrchFactory,
) -> None:
    """Its old worker still runs it (its lease lapsed): the fourth claim is no attempt, the
    job goes back to the queue and its GPUs stay placed."""
    from graph.orchestrator import Orchestrator
    from graph.worker import Worker

    orch = make_orch()
    job = orch.submit(REQUEST.model_copy(update={"duration_hours": 5}), thread_id="slow")
    queue = JobQueue(orch.services.ledger)
    assert queue.claim("old", 1.0, now=100.0) is not None
    held = orch.services.ledger.place(
        job.request,
        ledger_route(orch),
        "slow",
        orch.services.clock.now(),
        orch.services.inventory,
        orch.services.topology,
    ).row
    assert held is not None
    old = Orchestrator(orch.services.state_dir, config_of(orch), clock=orch.services.clock)
    try:
        old.services.watch(held.id, "slow")  # the old worker's monitor beats on
        for n in (2, 3):
            assert queue.claim(f"dead-{n}", 1.0, now=100.0 + 10 * n) is not None
        worker = Worker(orch, concurrency=1, max_attempts=3, poll_seconds=0.01)
        last = queue.claim(worker.worker_id, 30.0, now=200.0)
        assert last is not None and last.attempts == 4
        worker._run(last)
        assert queue.get("slow").state == "pending" and queue.get("slow").attempts == 3
        assert orch.services.ledger.get(held.id).state == "active"
    finally:
        old.close()


def config_of(orch: Any) -> FleetConfig:
    config: FleetConfig = orch.services.config
    return config


def test_a_stopping_worker_hands_its_jobs_back_uncounted(queue: JobQueue) -> None:
    queue.submit("t0", REQUEST, now=100.0)
    assert queue.claim("A", 10.0, now=200.0) is not None
    assert queue.hand_back("A", retry=True) == 1
    again = queue.claim("B", 10.0, now=201.0)
    assert again is not None and again.attempts == 1
    queue.ledger.close()


def _fleet(tmp_path: Path) -> Path:
    """4 A100 on two nodes, one virtual hour a real second, ticks every 10 virtual minutes,
    and no council for these small requests."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            clock={"time_scale": 3600},
            monitor={"tick_seconds": 600},
            scheduler={"poll_seconds": 300},
            council={"auto_approve_max_gpus": 4, "auto_approve_max_usd": 1000},
        ).replace("gpus = 4", "gpus = 2")
    )
    return fleet


def _opts(tmp_path: Path, pg_url: str) -> list[str]:
    return [
        "--state-dir",
        str(tmp_path / "state"),
        "--fleet",
        str(_fleet(tmp_path)),
        "--database",
        pg_url,
    ]


def _worker(tmp_path: Path, opts: list[str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graph.cli",
            "worker",
            "--json",
            "--poll-seconds",
            "0.2",
            *opts,
            *extra,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _submit(tmp_path: Path, opts: list[str], n: int, hours: float) -> list[str]:
    ids = []
    for i in range(n):
        r = run_cli(
            "submit",
            "--project",
            f"team{i % 3}",
            "--purpose",
            "training",
            "--count",
            "1",
            "--hours",
            str(hours),
            "--gpu-type",
            "A100",
            "--json",
            *opts,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        ids.append(json.loads(r.stdout)["thread_id"])
    return ids


def _until(what: str, done: Callable[[], bool], seconds: float = 60) -> None:
    """Wait until `done`, polled every 20 ms; bounded, so that a hang fails saying `what`."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _until_counts(url: str, config: FleetConfig, what: str, active: int, queued: int = 0) -> None:
    """Wait until the ledger holds at least `active` running and `queued` queued allocations."""
    ledger = Ledger(url, config)
    try:
        _until(
            what,
            lambda: (c := ledger.counts_by_state())["active"] >= active and c["queued"] >= queued,
        )
    finally:
        ledger.close()


def _all_released(tmp_path: Path, opts: list[str], ids: list[str], stderr: str) -> None:
    """Every submitted job done, its thread released (the workers' log shown where not)."""
    jobs = json.loads(run_cli("jobs", "--json", *opts, cwd=tmp_path).stdout)["jobs"]
    assert {j["thread_id"] for j in jobs} == set(ids)
    assert all(j["state"] == "done" and j["outcome"] == "released" for j in jobs), (
        [(j["outcome"], j["attempts"], j["error"]) for j in jobs],
        stderr[-3000:],  # which statement met the database down
    )


def _ledger_checks(pg_url: str, config: FleetConfig, n: int) -> Counter[str]:
    """Every allocation released once, charged once, written to history once; no GPU held
    by two allocations at any moment."""
    ledger = Ledger(pg_url, config)
    try:
        rows = ledger.allocations()
        assert len(rows) == n and all(r.state == "released" for r in rows)
        charges = ledger.query("SELECT allocation_id FROM charges")
        history = ledger.query("SELECT allocation_id, gpu_ids, started_at, ended_at FROM history")
        placed = {r.id for r in rows if r.started_at is not None}
        assert sorted(c[0] for c in charges) == sorted(h[0] for h in history) == sorted(placed)
        spans: dict[str, list[tuple[float, float]]] = {}
        for _, gpus, start, end in history:
            for g in json.loads(gpus):
                spans.setdefault(g, []).append((start, end))
        for intervals in spans.values():
            intervals.sort()
            for (_, end), (start, _) in pairwise(intervals):
                assert start >= end - 1e-6  # the next holder started after the last ended
        assert ledger.holders() == {}
        return Counter(r.release_reason.value for r in rows if r.release_reason)
    finally:
        ledger.close()


def test_two_workers_serve_one_queue(tmp_path: Path, pg_url: str) -> None:
    from fleet.config import load_fleet

    opts = _opts(tmp_path, pg_url)
    ids = _submit(tmp_path, opts, 8, hours=0.5)
    workers = [_worker(tmp_path, opts, "--concurrency", "3", "--exit-when-idle") for _ in range(2)]
    outs = []
    for w in workers:
        stdout, stderr = w.communicate(timeout=240)
        assert w.returncode == 0, stderr
        outs.append(json.loads(stdout))
    done = sum(sum(o["finished"].values()) for o in outs)
    assert done == 8 and all(o["finished"] for o in outs)  # both took a share
    jobs = json.loads(run_cli("jobs", "--json", *opts, cwd=tmp_path).stdout)
    assert jobs["counts"] == {"pending": 0, "running": 0, "done": 8}
    assert {j["thread_id"] for j in jobs["jobs"]} == set(ids)
    assert {j["outcome"] for j in jobs["jobs"]} == {"released"}
    _ledger_checks(pg_url, load_fleet(str(_fleet(tmp_path))), 8)


def test_a_killed_workers_threads_are_finished_by_another(tmp_path: Path, pg_url: str) -> None:
    from fleet.config import load_fleet

    opts = _opts(tmp_path, pg_url)
    ids = _submit(tmp_path, opts, 6, hours=4)  # 4 virtual hours: 4 s each; 4 GPUs, 6 requests
    victim = _worker(tmp_path, opts, "--concurrency", "6", "--lease-seconds", "2")
    config = load_fleet(str(_fleet(tmp_path)))
    _until_counts(pg_url, config, "the victim never placed its requests", active=4, queued=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    heir = _worker(tmp_path, opts, "--concurrency", "6", "--lease-seconds", "2", "--exit-when-idle")
    stdout, stderr = heir.communicate(timeout=240)
    assert heir.returncode == 0, stderr
    assert sum(json.loads(stdout)["finished"].values()) == 6
    jobs = json.loads(run_cli("jobs", "--json", *opts, cwd=tmp_path).stdout)["jobs"]
    assert {j["thread_id"] for j in jobs} == set(ids)
    assert all(
        j["state"] == "done" and j["outcome"] == "released" and j["attempts"] == 2 for j in jobs
    ), [(j["outcome"], j["attempts"], j["error"]) for j in jobs]
    reasons = _ledger_checks(pg_url, config, 6)
    assert sum(reasons.values()) == 6


def test_bad_databases_are_one_line_errors(tmp_path: Path) -> None:
    r = run_cli("jobs", "--database", "mysql://db/x", "--state-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--database must be a postgresql:// URL" in r.stderr
    r = run_cli(
        "submit",
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--database",
        "postgresql://u:pw@127.0.0.1:9/x",
        "--state-dir",
        str(tmp_path / "s"),
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot reach the database postgresql://u:***@127.0.0.1:9/x" in r.stderr
    assert "pw" not in r.stderr


def test_a_worker_refuses_bad_settings(tmp_path: Path, pg_url: str) -> None:
    r = run_cli("worker", "--concurrency", "0", *_opts(tmp_path, pg_url), cwd=tmp_path)
    assert r.returncode == 2 and "--concurrency must be at least 1" in r.stderr
    for flag, value, needle in [
        ("--lease-seconds", "inf", "--lease-seconds must be from 0.2 to 86400"),
        ("--lease-seconds", "nan", "--lease-seconds must be from 0.2"),
        ("--lease-seconds", "0.001", "--lease-seconds must be from 0.2"),
        ("--poll-seconds", "inf", "--poll-seconds must be from 0.01"),
        ("--poll-seconds", "1e-300", "--poll-seconds must be from 0.01"),
        ("--max-waiting", "-1", "--max-waiting must be at least 0"),
    ]:  # Event.wait(inf) raised OverflowError once the worker ran
        r = run_cli("worker", flag, value, *_opts(tmp_path, pg_url), cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_a_worker_rides_out_dropped_database_connections(tmp_path: Path, pg_url: str) -> None:
    """Every connection of a running worker is cut (a database restart, a proxy's idle
    timeout) three times while it runs its jobs: the worker reconnects and goes on, and every
    job ends as it would have, each GPU freed and each cost charged once."""
    import psycopg

    from fleet.config import load_fleet

    opts = _opts(tmp_path, pg_url)
    ids = _submit(tmp_path, opts, 4, hours=3)  # 3 virtual hours: 3 s each; 4 GPUs
    worker = _worker(
        tmp_path, opts, "--concurrency", "4", "--lease-seconds", "2", "--exit-when-idle"
    )
    config = load_fleet(str(_fleet(tmp_path)))
    _until_counts(pg_url, config, "the worker never placed its requests", active=4)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        for _ in range(3):
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            time.sleep(0.5)
    stdout, stderr = worker.communicate(timeout=240)
    assert worker.returncode == 0, stderr[-3000:]
    assert sum(json.loads(stdout)["finished"].values()) == 4
    _all_released(tmp_path, opts, ids, stderr)
    assert sum(_ledger_checks(pg_url, config, 4).values()) == 4


def test_a_worker_whose_renewal_fails_goes_on(
    make_orch: OrchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal that raises (the database went away for a moment) is tried again at the
    next beat while the jobs run on; it ended the worker, leaving its jobs' leases to lapse."""
    import threading

    from graph.worker import Worker

    orch = make_orch()
    job = orch.submit({"project": "p", "count": 1, "duration_hours": 1, "gpu_type": "A100"})
    worker = Worker(orch, concurrency=1, lease_seconds=0.2, poll_seconds=0.01, exit_when_idle=True)
    renew, start_job = worker.queue.renew, orch.start_job
    failed = threading.Event()

    def flaky(*args: Any, **kwargs: Any) -> int:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("the database went away for a moment")
        return renew(*args, **kwargs)

    def after_a_failed_renewal(claimed: Any, **kwargs: Any) -> Any:
        assert failed.wait(30)  # the job runs while its worker's renewal fails
        return start_job(claimed, **kwargs)

    monkeypatch.setattr(worker.queue, "renew", flaky)
    monkeypatch.setattr(orch, "start_job", after_a_failed_renewal)
    assert worker.serve() == Counter({"released": 1})
    assert orch.job(job.thread_id).outcome == "released"


@pytest.mark.parametrize("max_waiting", [64, 0])
def test_a_job_waiting_for_gpus_lets_the_next_job_start(
    make_orch: OrchFactory, max_waiting: int
) -> None:
    """Every A100 is held (a request monitored here); a worker with one turn claims a job
    that waits for an A100 in the fair queue, and it lets its turn go, so the T4 job behind
    it starts at once, not when the A100s come free (it waited behind the waiting job, as
    it still does with --max-waiting 0)."""
    import threading

    from fleet.clock import ScaledClock
    from graph.worker import Worker

    config = small_config(
        council={"auto_approve_max_gpus": 8, "auto_approve_max_usd": 100000},
        monitor={"tick_seconds": 600},
    )
    now = time.time()
    orch = make_orch(config, clock=ScaledClock(3600, now, now))  # a virtual hour a second
    # five hours (seconds) held: the T4 job has four to start in, however busy the machine
    big = {"project": "a", "count": 8, "duration_hours": 5, "gpu_type": "A100"}
    holder = threading.Thread(target=orch.request, args=(big,), kwargs={"thread_id": "big"})
    holder.start()
    _until(
        "the A100s were never placed",
        lambda: orch.services.ledger.counts_by_state()["active"] >= 1,
    )
    behind = orch.submit({"project": "b", "count": 1, "duration_hours": 1, "gpu_type": "A100"})
    other = orch.submit(
        {"project": "c", "purpose": "inference", "count": 1, "duration_hours": 1, "gpu_type": "T4"}
    )
    worker = Worker(
        orch, concurrency=1, poll_seconds=0.05, exit_when_idle=True, max_waiting=max_waiting
    )
    assert worker.serve() == Counter({"released": 2})
    holder.join(30)
    rows = {r.thread_id: r for r in orch.services.ledger.allocations()}
    big_row, behind_row, other_row = rows["big"], rows[behind.thread_id], rows[other.thread_id]
    assert big_row.released_at is not None and other_row.started_at is not None
    assert behind_row.started_at is not None and behind_row.started_at >= big_row.released_at
    if max_waiting:
        assert other_row.started_at < big_row.released_at - 3600  # hours before, not after
    else:
        assert other_row.started_at >= big_row.released_at


def test_a_job_that_waited_and_was_placed_waits_no_more(make_orch: OrchFactory) -> None:
    """With --max-waiting 1: a job that waited for A100s and was then placed no longer counts
    as waiting, so the next job that waits lets its turn go too, and the T4 job behind it
    starts at once (it waited for the A100 job to end, seven virtual hours)."""
    import threading

    from fleet.clock import ScaledClock
    from graph.worker import Worker

    config = small_config(
        council={"auto_approve_max_gpus": 8, "auto_approve_max_usd": 100000},
        monitor={"tick_seconds": 600},
    )
    now = time.time()
    orch = make_orch(config, clock=ScaledClock(3600, now, now))  # a virtual hour a second
    big = {"project": "a", "count": 8, "duration_hours": 1, "gpu_type": "A100"}
    holder = threading.Thread(target=orch.request, args=(big,), kwargs={"thread_id": "big"})
    holder.start()
    ledger = orch.services.ledger
    _until("the A100s were never placed", lambda: ledger.counts_by_state()["active"] == 1)
    # six hours (seconds) placed: the T4 job has five to start in, however busy the machine
    first = orch.submit({"project": "b", "count": 4, "duration_hours": 6, "gpu_type": "A100"})
    worker = Worker(orch, concurrency=1, poll_seconds=0.05, exit_when_idle=True, max_waiting=1)
    serving = threading.Thread(target=worker.serve)
    serving.start()

    def state(thread_id: str) -> str | None:
        rows = [r for r in ledger.allocations() if r.thread_id == thread_id]
        return rows[0].state if rows else None

    _until("the waiting job was never placed", lambda: state(first.thread_id) == "active")
    orch.submit({"project": "c", "count": 8, "duration_hours": 1, "gpu_type": "A100"})  # waits
    other = orch.submit(
        {"project": "d", "purpose": "inference", "count": 1, "duration_hours": 1, "gpu_type": "T4"}
    )
    serving.join(60)
    holder.join(30)
    assert not serving.is_alive() and worker.finished == Counter({"released": 3})
    rows = {r.thread_id: r for r in ledger.allocations()}
    first_row, other_row = rows[first.thread_id], rows[other.thread_id]
    assert first_row.released_at is not None and other_row.started_at is not None
    assert other_row.started_at < first_row.released_at - 3600  # hours before it ended
    assert worker._waiting == 0


@pytest.mark.skipif(bindir() is None and not REQUIRE_PG, reason="PostgreSQL is not installed")
def test_a_database_restart_costs_no_job_its_run(tmp_path: Path) -> None:
    """The PostgreSQL server restarts (down 3 s) while a worker runs 4 jobs: each job that
    met the database down is handed back uncounted and carried on from its checkpoint (it
    ended `invalid`, reading 'cannot reach the database' as the request's fault)."""
    import shutil
    import tempfile

    from fleet.config import load_fleet
    from tests.pgserver import PgServer, create_database

    # its own server, which it restarts; outside pytest's folders, which its user cannot read
    server = PgServer(Path(tempfile.mkdtemp(prefix="gpu-agent-pg-restart-")))
    try:
        url = create_database(server.start())
        opts = _opts(tmp_path, url)
        ids = _submit(tmp_path, opts, 4, hours=6)  # 6 virtual hours: 6 s each
        worker = _worker(
            tmp_path, opts, "--concurrency", "4", "--lease-seconds", "2", "--exit-when-idle"
        )
        config = load_fleet(str(_fleet(tmp_path)))
        _until_counts(url, config, "the worker never placed its requests", active=4)
        server.restart(down_seconds=3)
        stdout, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stderr[-3000:]
        _all_released(tmp_path, opts, ids, stderr)
        assert json.loads(stdout)["finished"] == {"released": 4}
        assert sum(_ledger_checks(url, config, 4).values()) == 4
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def test_a_worker_needs_an_admin_and_a_member_sees_its_projects_queue(tmp_path: Path) -> None:
    """A worker runs every project's requests: started with a member's token it is refused
    (exit 5, one line) and another project's job stays pending, where it once claimed it,
    failed three times with tracebacks and ended it `failed`. A member's `jobs` counts its
    project's jobs, not the whole queue's; `resume` of a job no worker has started says so
    to whom may see it."""
    state = tmp_path / "s"
    root = add_token(tmp_path, state, "root", "admin", None, None)
    alice = add_token(tmp_path, state, "alice", "member", "p1", root)
    bob = add_token(tmp_path, state, "bob", "member", "p2", root)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml())
    opts = ["--state-dir", str(state), "--fleet", str(fleet)]
    ask = ["--purpose", "training", "--count", "1", "--hours", "1", "--thread-id", "a1"]
    assert (
        run_cli("submit", *ask, *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": alice}).returncode == 0
    )

    def jobs(token: str) -> dict[str, Any]:
        r = run_cli("jobs", "--json", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": token})
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    assert jobs(bob) == {"counts": {"pending": 0, "running": 0, "done": 0}, "jobs": []}
    assert jobs(root)["counts"] == jobs(alice)["counts"] == {"pending": 1, "running": 0, "done": 0}
    r = run_cli(
        "worker", "--exit-when-idle", "--json", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": bob}
    )
    assert r.returncode == 5 and r.stderr.count("\n") == 1, r.stderr
    assert "bob (member) may not run a worker" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout)["type"] == "Forbidden"
    assert [j["state"] for j in jobs(alice)["jobs"]] == ["pending"]
    r = run_cli("resume", "a1", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": alice})
    assert r.returncode == 2 and "a submitted request no worker has started yet" in r.stderr
    r = run_cli("resume", "a1", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": bob})
    assert r.returncode == 2 and r.stderr == "gpu-agent: no thread 'a1'\n"  # not bob's to see
