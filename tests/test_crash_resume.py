"""SIGKILL a foreground request while it monitors, then `gpu-agent resume`: nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import ormsgpack
import pytest

from fleet.errors import RunStopped
from fleet.models import CouncilOutcome, ReleaseReason, Status
from graph.checkpoint import serializer
from graph.orchestrator import Orchestrator
from tests.conftest import fleet_toml, run_cli

# 600x: one real second is ten virtual minutes; a 1-hour lease lasts 6 s.
SCALE = 600


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[str]]:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            clock={"time_scale": SCALE},
            monitor={"tick_seconds": 30},
            scheduler={"poll_seconds": 30},
        )
    )
    return tmp_path, ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]


def ledger(state: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{state / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def start_and_kill(cwd: Path, opts: list[str], thread: str, min_ticks: int) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graph.cli",
            "request",
            "--project",
            "p",
            "--purpose",
            "training",
            "--count",
            "2",
            "--hours",
            "1",
            "--gpu-type",
            "A100",
            "--thread-id",
            thread,
            *opts,
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    state = cwd / "state"
    while time.monotonic() < deadline:
        try:
            rows = ledger(state, "SELECT ticks FROM allocations WHERE state='active'")
        except sqlite3.Error:  # not created yet
            rows = []
        if rows and int(rows[0][0]) >= min_ticks:  # type: ignore[call-overload]
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the request never started monitoring")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def exactly_once(state: Path) -> tuple[float, str]:
    assert ledger(state, "SELECT count(*) FROM holds") == [(0,)]
    [(charges, spent)] = ledger(state, "SELECT count(*), sum(amount_usd) FROM charges")
    [(records, reason)] = ledger(state, "SELECT count(*), max(reason) FROM history")
    assert charges == 1 and records == 1
    return float(spent), str(reason)  # type: ignore[arg-type]


def test_killed_while_monitoring_then_resumed(setup: tuple[Path, list[str]]) -> None:
    cwd, opts = setup
    start_and_kill(cwd, opts, "crashy", min_ticks=3)
    [(state_before,)] = ledger(cwd / "state", "SELECT state FROM allocations")
    assert state_before == "active"  # the GPUs stay held while nobody watches
    r = run_cli("resume", "crashy", "--json", *opts, cwd=cwd)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "released" and out["release"]["reason"] == "lease-expired"
    spent, reason = exactly_once(cwd / "state")
    assert reason == "lease-expired"
    assert spent == pytest.approx(2 * 5.12 * 1.0) == pytest.approx(out["cost_usd"])
    again = json.loads(run_cli("resume", "crashy", "--json", *opts, cwd=cwd).stdout)
    assert again["cost_usd"] == out["cost_usd"]
    exactly_once(cwd / "state")


def test_lease_expires_while_down(setup: tuple[Path, list[str]]) -> None:
    cwd, opts = setup
    start_and_kill(cwd, opts, "gone", min_ticks=1)
    time.sleep(3600 / SCALE + 1)  # the lease ends while no process runs
    r = run_cli("status", "--json", *opts, cwd=cwd)  # any start-up reconciles
    [alloc] = json.loads(r.stdout)["allocations"]
    assert alloc["state"] == "released" and alloc["reason"] == "expired-while-down"
    spent, reason = exactly_once(cwd / "state")
    assert reason == "expired-while-down" and spent == pytest.approx(2 * 5.12)
    out = json.loads(run_cli("resume", "gone", "--json", *opts, cwd=cwd).stdout)
    assert out["status"] == "released" and out["release"]["reason"] == "expired-while-down"
    exactly_once(cwd / "state")


class Died(BaseException):
    """The process dies: raised where a checkpoint would be written."""


@pytest.mark.parametrize("step", [4, 5])  # the checkpoint after allocate; after a monitor tick
def test_death_between_a_steps_writes_and_its_checkpoint(
    tmp_path: Path, database: str, step: int
) -> None:
    """A step's writes are saved as it ends, its checkpoint just after: a process that dies
    in between leaves a checkpoint whose `next` is empty (get_state applies the writes) though
    the run is not over. Resume carries it on, on SQLite and on PostgreSQL."""
    from fleet.clock import VirtualClock
    from fleet.models import Status
    from graph.orchestrator import Orchestrator
    from tests.conftest import small_config

    db = None if database.endswith(".sqlite") else database
    request = {
        "project": "p",
        "purpose": "training",
        "count": 2,
        "duration_hours": 1,
        "gpu_type": "A100",
    }
    first = Orchestrator(tmp_path / "s", small_config(), clock=VirtualClock(), database=db)
    put = first.checkpointer.put

    def dying_put(config, checkpoint, metadata, versions):  # type: ignore[no-untyped-def]
        if metadata.get("step") == step:
            raise Died
        return put(config, checkpoint, metadata, versions)

    first.checkpointer.put = dying_put  # type: ignore[method-assign]
    with pytest.raises(Died):
        first.request(request, thread_id="t")
    first.close()
    then = Orchestrator(tmp_path / "s", small_config(), clock=VirtualClock(), database=db)
    try:
        assert then.outcome("t").next  # something is left to run
        out = then.resume("t")
        assert out.status is Status.RELEASED and out.release is not None
        assert len(then.history()) == 1 and then.costs()[0].spent_usd == out.cost_usd > 0
    finally:
        then.close()


def test_a_checkpoint_from_before_the_council_outcome_was_renamed_still_loads() -> None:
    """Checkpoints store an enum by its class's name: one written when CouncilOutcome was
    still called Outcome reads back as the same value."""
    old = ormsgpack.packb(
        {"o": ormsgpack.Ext(0, ormsgpack.packb(["fleet.models", "Outcome", "split"]))}
    )
    assert serializer().loads_typed(("msgpack", old))["o"] is CouncilOutcome.SPLIT


def _requesting(cwd: Path, opts: list[str], thread: str, count: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "request", "--project", "p", "--purpose",
         "training", "--gpu-type", "A100", "--count", count, "--hours", "10",
         "--thread-id", thread, *opts],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _said(proc: subprocess.Popen[str], what: str) -> None:
    """Read the request's lines until one says `what` (60 s at most)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while what not in (line := proc.stdout.readline()):
        assert line and time.monotonic() < deadline, f"no {what!r} before exit"


def test_ctrl_c_stops_a_request_at_once_not_at_its_next_tick(tmp_path: Path) -> None:
    """Ctrl-C on a foreground request that monitors, and on one that waits in the queue:
    each exits 130 at once, where it waited for its node's next tick or poll (a minute by
    default, an hour here, so the old behaviour fails the minute this allows), naming the
    thread to resume. Released from elsewhere, each `resume` ends its thread, one charge."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(monitor={"tick_seconds": 3600}, scheduler={"poll_seconds": 3600}))
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]
    held = _requesting(tmp_path, opts, "held", "8")
    _said(held, "placed")
    waits = _requesting(tmp_path, opts, "waits", "1")  # all 8 A100s are held
    _said(waits, "queued")
    for proc, thread in ((waits, "waits"), (held, "held")):
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert f"checkpointed: `gpu-agent resume {thread}` carries it on" in out
    allocations = json.loads(run_cli("status", *opts, "--json", cwd=tmp_path).stdout)
    live = {a["thread_id"]: a for a in allocations["allocations"]}
    assert {t: a["state"] for t, a in live.items()} == {"held": "active", "waits": "queued"}
    ended = {}
    for thread in ("held", "waits"):
        assert run_cli("release", live[thread]["id"], *opts, cwd=tmp_path).returncode == 0
        done = run_cli("resume", thread, "--json", *opts, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        ended[thread] = json.loads(done.stdout)["reason"]
    assert ended == {"held": "released: explicit", "waits": "cancelled while queued"}
    charged = ledger(tmp_path / "state", "SELECT allocation_id FROM charges")
    assert charged == [(live["held"]["id"],)]  # the queued one never ran: nothing to charge


def _interrupted_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """`owner.name` hears a Ctrl-C at its next call, where ormsgpack's decoder would turn it
    into its own error (a ValueError, "ext_hook failed"); then it is itself again."""
    real = getattr(owner, name)

    def interrupted(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(owner, name, real)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("ext_hook failed") from None
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


def test_ctrl_c_while_resume_reads_its_checkpoint_names_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands while `resume` reads its thread's checkpoint, before the run,
    stops it as one in the run does: RunStopped naming the thread (the CLI's message, exit
    130), not the decoder's ValueError and a traceback; Python's handler is back, and the
    next resume carries the thread on."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(monitor={"tick_seconds": 3600}))
    orch = Orchestrator(tmp_path / "state", fleet)
    request = {"project": "p", "purpose": "training", "gpu_type": "A100", "count": 1}
    request |= {"duration_hours": 1}
    placed = orch.request(request, thread_id="A", wait=False).allocation
    assert placed is not None
    _interrupted_once(monkeypatch, orch.checkpointer.serde, "loads_typed")
    with pytest.raises(RunStopped) as stopped:
        orch.resume("A")
    assert stopped.value.thread_id == "A"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    svc = orch.services
    svc.ledger.release(placed.id, ReleaseReason.EXPLICIT, svc.clock.now())
    assert orch.resume("A").reason == "released: explicit"  # not stopped at once again
    orch.close()


def test_ctrl_c_in_a_requests_decision_is_resumed_or_says_nothing_was_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request stopped in its decision (routing) keeps its checkpoint: RunStopped names
    the thread, whose resume places it. One stopped before anything of it was kept names
    no thread (there is none to resume), says so, and gives its name back for the retry."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml())
    orch = Orchestrator(tmp_path / "state", fleet)
    request = {"project": "p", "purpose": "training", "gpu_type": "A100", "count": 1}
    request |= {"duration_hours": 1}
    _interrupted_once(monkeypatch, orch.services, "route")
    with pytest.raises(RunStopped) as stopped:
        orch.request(request, thread_id="A", wait=False)
    assert stopped.value.thread_id == "A"
    assert orch.resume("A", wait=False).status is Status.ALLOCATED
    _interrupted_once(monkeypatch, orch, "_context_for")  # as the run starts
    with pytest.raises(RunStopped, match="nothing of the request was kept") as stopped:
        orch.request(request, thread_id="B", wait=False)
    assert stopped.value.thread_id is None
    assert orch.request(request, thread_id="B", wait=False).status is Status.ALLOCATED
    orch.close()
