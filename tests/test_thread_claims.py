"""Two requests that name one thread (`--thread-id`) never both run it (fleet.thread_claims,
fleet.ledger.threads): the first claims the name before anything runs; a second is refused
while the first may still be starting it, and only the claimed request is ever placed on the
thread. Real processes stalled with SIGSTOP (fleet.faults' `stop`) and killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.faults import ENV, InjectedFault
from fleet.jobs import JobQueue
from fleet.ledger import Ledger
from fleet.ledger.threads import JOB
from fleet.models import GPURequest, Status
from fleet.monitors import new_owner
from fleet.thread_claims import UNSEEN_SECONDS
from graph.orchestrator import Orchestrator
from graph.worker import Worker
from tests.conftest import fleet_toml, run_cli, small_config, stopped
from tests.test_faults import exactly_once
from tests.test_ledger import T0, Fixture

ONE = {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1, "gpu_type": "A100"}


def test_a_second_request_is_refused_while_the_first_decides(
    make_orch: Callable[..., Orchestrator],
) -> None:
    """Two Orchestrators on one state directory: while the first request on "dup" decides
    (its council's progress line: before its first checkpoint), a request or a submission on
    the name is refused, naming who holds it; afterwards the thread exists. One allocation,
    the first's."""
    first, second = make_orch(), make_orch()
    refusals: list[str] = []

    def meanwhile(_: dict[str, Any]) -> None:
        if refusals:
            return
        for attempt in (second.request, second.submit):
            with pytest.raises(InvalidInput) as refused:
                attempt(ONE, thread_id="dup")
            refusals.append(str(refused.value))

    out = first.request(ONE, thread_id="dup", wait=False, on_progress=meanwhile)
    assert out.status is Status.ALLOCATED
    assert len(refusals) == 2
    assert all(f"is being started by python pid {os.getpid()}" in r for r in refusals)
    with pytest.raises(InvalidInput, match="already exists; resume it instead"):
        second.request(ONE, thread_id="dup")
    rows = first.services.ledger.allocations()
    assert out.allocation is not None and [r.id for r in rows] == [out.allocation.id]
    assert JobQueue(first.services.ledger).counts()["pending"] == 0


def test_a_request_that_fails_in_its_decision_keeps_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in the decision still writes the thread's checkpoint: the name is the thread's,
    which a resume carries on."""
    monkeypatch.setenv(ENV, "before:council,raise")
    with Orchestrator(tmp_path / "s", small_config()) as orch:
        with pytest.raises(InjectedFault):
            orch.request(ONE, thread_id="t", wait=False)
        monkeypatch.setenv(ENV, "nowhere,raise")
        with pytest.raises(InvalidInput, match="already exists; resume it instead"):
            orch.request(ONE, thread_id="t", wait=False)
        assert orch.resume("t", wait=False).status is Status.ALLOCATED


def test_only_the_claimed_request_is_placed_on_a_thread(database: str, config: FleetConfig) -> None:
    """The placement's own transaction checks the claim: a request on a thread claimed for
    another (checkpoints two processes interleaved) places nothing."""
    fx = Fixture(database, config)
    fx.ledger.claim_thread("t", new_owner("cli"), "r-t", T0)
    before = fx.ledger.dump()
    with pytest.raises(InvalidInput, match="was started for request r-t, not r-other"):
        fx.place("t", request_id="r-other")
    assert fx.ledger.dump() == before
    placed = fx.place("t").row
    assert placed is not None and placed.state == "active"
    assert fx.place("u", request_id="anything").row is not None  # unclaimed: as before
    fx.ledger.claim_thread("v", new_owner("run"), "r-v", T0)
    fx.ledger.revoke_thread("v")  # a `run` interrupted while placing gave it up
    with pytest.raises(InvalidInput, match="'v' was given up by its caller"):
        fx.place("v")
    fx.ledger.close()


def test_a_claimant_on_another_host_is_waited_for_unless_it_is_the_same_request(
    make_orch: Callable[..., Orchestrator],
) -> None:
    """Whether a process on another host lives cannot be seen: its claim holds the name
    against any other request for UNSEEN_SECONDS, but not against the same request (a
    requeue's fixed id, run again by `gpu-agent run --resume` there), which alone can be
    placed on the thread; an older claim with still no checkpoint is taken over."""
    orch = make_orch()
    ledger = orch.services.ledger
    elsewhere = "another-host@4026531836:4242:0123abcd:run"
    req = GPURequest.model_validate(ONE | {"request_id": "fixed"})
    now = time.time()
    for thread in ("other", "same"):
        ledger.claim_thread(thread, elsewhere, "fixed", now)
    ledger.claim_thread("old", elsewhere, "fixed", now - UNSEEN_SECONDS - 1)
    assert orch.request(ONE, thread_id="old", wait=False).status is Status.ALLOCATED
    with pytest.raises(InvalidInput) as refused:
        orch.request(ONE, thread_id="other")
    assert "being started by run pid 4242 on another-host" in str(refused.value)
    assert "or after 600 s if that process is gone" in str(refused.value)
    assert orch.request(req, thread_id="same", wait=False).status is Status.ALLOCATED
    claim = ledger.thread_claim("same")
    assert claim is not None and claim.owner != elsewhere


def test_a_submitted_thread_is_its_jobs(
    make_orch: Callable[..., Orchestrator], config: FleetConfig
) -> None:
    """`submit` hands its claim to the job in the job's transaction: a `request` on the name
    is refused, and the worker that holds the job's lease runs it."""
    orch = make_orch()
    job = orch.submit(ONE, thread_id="j")
    claim = orch.services.ledger.thread_claim("j")
    assert claim is not None and (claim.owner, claim.request_id) == (JOB, job.request.request_id)
    with pytest.raises(InvalidInput, match="'j' was already submitted"):
        orch.request(ONE, thread_id="j")
    with pytest.raises(InvalidInput, match="'j' was already submitted"):
        orch.submit(ONE, thread_id="j")
    generated = orch.submit(ONE)  # claimed too: its id is shown before anything runs it
    with pytest.raises(InvalidInput, match="was already submitted"):
        orch.request(ONE, thread_id=generated.thread_id)
    worker = Worker(orch, concurrency=1)
    claimed = worker.queue.claim(worker.worker_id, 60)
    assert claimed is not None
    worker._run(claimed)
    assert worker.queue.get("j").outcome == Status.RELEASED.value
    claimed = worker.queue.claim(worker.worker_id, 60)
    assert claimed is not None and claimed.thread_id == generated.thread_id
    worker._run(claimed)
    assert worker.queue.get(generated.thread_id).outcome == Status.RELEASED.value
    exactly_once(orch.services.ledger)


def test_a_submission_that_fails_gives_its_name_back(
    make_orch: Callable[..., Orchestrator],
) -> None:
    """A start that fails before anything of it is kept (here the queue refuses: a job on the
    name already, queued by a version before claims) frees the name at once, so a retry in
    the same live process is not refused by a call that is over."""
    orch = make_orch()
    JobQueue(orch.services.ledger).submit("s", GPURequest.model_validate(ONE))  # unclaimed
    with pytest.raises(InvalidInput, match="'s' was already submitted"):
        orch.submit(ONE, thread_id="s")
    assert orch.services.ledger.thread_claim("s") is None
    with pytest.raises(InvalidInput, match="'s' was already submitted"):
        orch.submit(ONE, thread_id="s")  # the queue's answer again, not "being started by"


def test_jobs_submitted_before_claims_existed_are_claimed_by_their_jobs(
    database: str, config: FleetConfig
) -> None:
    """A version-7 ledger's queued jobs: the migration claims their threads for them, reading
    only the request's id (a request today's model refuses, here a field it no longer knows,
    is still its job's); a job that is done needs no claim (its thread exists)."""
    ledger = Ledger(database, config)
    request = GPURequest.model_validate(ONE)
    JobQueue(ledger).submit("old", request)
    JobQueue(ledger).submit("done", GPURequest.model_validate(ONE))
    with ledger.transaction() as db:
        db.execute("DROP TABLE threads")
        db.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
        db.execute("UPDATE jobs SET state='done' WHERE thread_id='done'")
        db.execute(
            "INSERT INTO jobs (thread_id, request, state, submitted_at) VALUES (?, ?, ?, ?)",
            ("odd", json.dumps({"request_id": "r-odd", "retired_field": 1}), "pending", T0),
        )
    ledger.close()
    ledger = Ledger(database, config)
    try:
        claim = ledger.thread_claim("old")
        assert claim is not None and (claim.owner, claim.request_id) == (JOB, request.request_id)
        odd = ledger.thread_claim("odd")
        assert odd is not None and (odd.owner, odd.request_id) == (JOB, "r-odd")
        assert ledger.thread_claim("done") is None
    finally:
        ledger.close()


# ---- real processes ----------------------------------------------------------------------


def _wait_stopped(proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not stopped(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the request never reached its armed point"
        time.sleep(0.05)


def test_a_stalled_request_keeps_its_name_and_a_dead_one_gives_it_up(tmp_path: Path) -> None:
    """`gpu-agent request --thread-id dup` stopped in its decision (before route, no
    checkpoint yet): a second `request` and a `submit` on "dup" are refused, naming the first;
    continued, the first runs to its end and the name is its thread's. A first request killed
    there (SIGKILL) leaves a claim of a dead process on this host: the next request takes the
    name over. Each thread has exactly one allocation, charged once."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 3600}, monitor={"tick_seconds": 900}))
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet), "--json"]
    ask = ["--project", "p", "--purpose", "training", "--count", "1", "--hours", "1"]

    def start(thread: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "graph.cli", "request", *ask, "--thread-id", thread, *opts],
            cwd=tmp_path,
            env={**os.environ, ENV: "before:route,stop"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_stopped(proc)
        return proc

    stalled = start("dup")
    for command in ("request", "submit"):
        refused = run_cli(command, *ask, "--thread-id", "dup", *opts, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        error = json.loads(refused.stdout)["error"]
        assert f"'dup' is being started by cli pid {stalled.pid} on " in error
    stalled.send_signal(signal.SIGCONT)
    out, err = stalled.communicate(timeout=120)
    assert stalled.returncode == 0, err[-2000:]
    assert json.loads(out)["status"] == "released"
    again = run_cli("request", *ask, "--thread-id", "dup", *opts, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in json.loads(again.stdout)["error"]

    killed = start("gone")
    killed.kill()
    killed.wait()
    taken = run_cli("request", *ask, "--thread-id", "gone", *opts, cwd=tmp_path)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert json.loads(taken.stdout)["status"] == "released"

    ledger = Ledger(tmp_path / "state" / "ledger.sqlite", small_config())
    try:
        exactly_once(ledger)
        assert sorted(r.thread_id for r in ledger.allocations()) == ["dup", "gone"]
    finally:
        ledger.close()
