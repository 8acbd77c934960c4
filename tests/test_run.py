"""`gpu-agent run` with real child processes on the simulated fleet (wall-clock time).

The fleet's GPUs read idle (the simulated `idle` workload), and the monitor's idle timeout is
3 s, so the graph releases the allocation for idling a few seconds after the command starts;
`run` must then stop the command's whole process group and nothing of it may be left.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fleet.clock import VirtualClock, sleep_until
from fleet.config import load_fleet
from graph.orchestrator import Orchestrator
from graph.run_command import RunReport, run_on
from graph.ui import SERVER, create_app
from tests.conftest import OrchFactory, fleet_toml, run_cli, small_config, stopped
from tests.test_guardrails import GUARDED_FLEET

# A command that ignores SIGTERM and leaves a grandchild in its process group.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(0.1)"])
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child.pid} {os.environ['CUDA_VISIBLE_DEVICES']}")
while True:
    time.sleep(0.1)
"""


LEASE = "0.002"  # hours: 7.2 s; a command's idle GPUs are a pause, so the lease ends it


def idle_fleet(tmp_path: Path, workload: str = "idle", **monitor: float) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(
        fleet_toml(
            monitor={
                "tick_seconds": 0.5,
                "idle_timeout_minutes": 0.05,
                "low_util_window_minutes": 0.05,
                **monitor,
            },
            simulation={"default_workload": workload},
            limits={"min_duration_minutes": 0.05},
        )
    )
    return path


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_lease_end_stops_the_command_and_it_really_goes(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        done = run_cli(
            "run",
            "--state-dir",
            str(tmp_path / "s"),
            "--fleet",
            str(idle_fleet(tmp_path)),
            "--project",
            "vision",
            "--count",
            "1",
            "--hours",
            LEASE,
            "--grace",
            "1",
            "--json",
            "--",
            sys.executable,
            "-c",
            STUBBORN,
            str(pids),
            cwd=tmp_path,
            timeout=60,
        )
        assert done.returncode == 128 + signal.SIGKILL, done.stderr
        report = json.loads(done.stdout)
        assert report["ended_by"] == "lease-expired"  # idling under `run` is a pause
        assert report["terminated"] and report["killed"] and report["leftover"] == []
        assert report["on_gpus"] is None  # the simulated fleet lists no GPU processes
        leader, grandchild, visible = pids.read_text().split()
        assert not alive(int(leader)) and not alive(int(grandchild))
        assert bystander.poll() is None  # only what run started was signalled
        assert visible.startswith("GPU-")  # a UUID, not an index
        assert "ended (lease-expired): stopping the command" in done.stderr
        history = run_cli("history", "--state-dir", str(tmp_path / "s"), "--json", cwd=tmp_path)
        (record,) = json.loads(history.stdout)["records"]
        assert record["reason"] == "lease-expired" and record["gpu_ids"] == [visible]
    finally:
        bystander.kill()
        bystander.wait()


def test_a_command_that_obeys_sigterm_needs_no_sigkill(tmp_path: Path) -> None:
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path / "s"),
        "--fleet",
        str(idle_fleet(tmp_path)),
        "--project",
        "vision",
        "--count",
        "1",
        "--hours",
        LEASE,
        "--grace",
        "20",
        "--json",
        "--",
        sys.executable,
        "-c",
        "import time\nwhile True: time.sleep(0.1)",
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    report = json.loads(done.stdout)
    assert report["terminated"] and not report["killed"]
    assert report["ended_by"] == "lease-expired"


def test_a_command_that_ends_releases_what_run_requested(tmp_path: Path) -> None:
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path / "s"),
        "--fleet",
        str(idle_fleet(tmp_path, "train")),
        "--project",
        "vision",
        "--count",
        "2",
        "--hours",
        "1",
        "--json",
        "--",
        sys.executable,
        "-c",
        "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(3)",
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    visible = done.stdout.splitlines()[0].split(",")
    assert len(visible) == 2 and all(v.startswith("GPU-") for v in visible)
    assert json.loads(done.stdout.splitlines()[1])["ended_by"] == "command"
    history = run_cli("history", "--state-dir", str(tmp_path / "s"), "--json", cwd=tmp_path)
    (record,) = json.loads(history.stdout)["records"]
    assert record["reason"] == "command-exit" and sorted(record["gpu_ids"]) == sorted(visible)


def test_run_on_an_allocation_stops_when_someone_releases_it(tmp_path: Path) -> None:
    state, fleet = str(tmp_path / "s"), str(idle_fleet(tmp_path, "train"))
    placed = run_cli(
        "request",
        "--state-dir",
        state,
        "--fleet",
        fleet,
        "--project",
        "nlp",
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
    aid = json.loads(placed.stdout)["allocation"]["id"]
    env = {**os.environ}
    runner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graph.cli",
            "run",
            "--state-dir",
            state,
            "--fleet",
            fleet,
            "--allocation",
            aid,
            "--grace",
            "5",
            "--json",
            "--",
            sys.executable,
            "-c",
            "import time\nwhile True: time.sleep(0.1)",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        lines = [""]
        while "started pid" not in lines[-1]:
            assert runner.stderr is not None and time.monotonic() < deadline
            lines.append(runner.stderr.readline())
        # placed with --no-wait, so no monitor runs: run says who must run it
        assert any("nobody monitors allocation" in line for line in lines)
        released = run_cli("release", "--state-dir", state, "--fleet", fleet, aid, cwd=tmp_path)
        assert released.returncode == 0, released.stderr
        out, _ = runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM
    report = json.loads(out)
    assert report["ended_by"] == "explicit" and not report["killed"]


def test_run_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path),
        "--project",
        "p",
        "--count",
        "1",
        "--hours",
        "1",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "no command to run" in done.stderr
    done = run_cli("run", "--state-dir", str(tmp_path), "--", "true", cwd=tmp_path)
    assert done.returncode == 2 and "either --allocation" in done.stderr
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path),
        "--project",
        "p",
        "--count",
        "0",
        "--hours",
        "1",
        "--",
        "true",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "count" in done.stderr
    for flag, value, needle in [
        ("--requeue", "99999999999999999999", "--requeue must be from 0 to 100"),
        ("--grace", "inf", "--grace and --notice must be finite"),
        ("--notice", "nan", "--grace and --notice must be finite"),
        ("--notice", "1e6", "--notice must be at most 3600 seconds, not 1e+06"),
    ]:  # refused before anything is placed (a --requeue too large once crashed after)
        done = run_cli(
            "run", "--state-dir", str(tmp_path), "--project", "p", "--count", "1",
            "--hours", "1", flag, value, "--", "true", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 2 and needle in done.stderr, done.stderr
    assert not (tmp_path / "ledger.sqlite").exists()


def test_nvml_confirmation_names_a_process_of_the_command_still_on_the_gpu(tmp_path: Path) -> None:
    """Through the NVML code path (our H200 recording, replayed): a PID of the command that the
    GPU still lists is reported; one that is not the command's is not."""
    from fleet.clock import VirtualClock
    from fleet.config import load_fleet
    from fleet.nvml.backend import NvmlBackend
    from fleet.nvml.reader import NvmlSession
    from fleet.nvml.replay import FakeNvml, Recording
    from graph.orchestrator import Orchestrator
    from graph.run_command import _left_on_gpus

    rec = Recording.load(Path(__file__).with_name("data") / "h200-recorded.json")
    clock = VirtualClock(start=rec.end)  # the training phase: one process on the GPU
    backend = NvmlBackend(
        load_fleet(hardware=True),
        NvmlSession(FakeNvml(rec, clock.now, origin=rec.start, loop=False)),
    )
    pid = rec.samples[0][-1]["procs"][0]["pid"]
    with Orchestrator(tmp_path, None, backend=backend, clock=clock) as orch:
        gpu = [orch.services.gpus[0].uuid]
        assert _left_on_gpus(orch, gpu, {pid}) == [pid]
        assert _left_on_gpus(orch, gpu, {pid + 1}) == []


NOTICED = """
import signal, sys, time
log = open(sys.argv[1], "a")
def note(name):
    def handler(signum, frame):
        log.write(f"{name} {time.monotonic()}\\n")
        log.flush()
        if name == "term":
            sys.exit(0)
    return handler
signal.signal(signal.SIGUSR1, note("checkpoint"))
signal.signal(signal.SIGTERM, note("term"))
while True:
    time.sleep(0.05)
"""


def test_the_command_gets_notice_before_its_lease_ends(tmp_path: Path) -> None:
    """`--notice 4`: USR1 about 4 s before the 14.4 s lease ends (the command checkpoints),
    then at the end SIGTERM; the command exits within its grace, nothing is killed. (A
    command that has not yet set its handler would end by the notice: it is opt-in.)"""
    log = tmp_path / "log"
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path / "s"),
        "--fleet",
        str(idle_fleet(tmp_path)),
        "--project",
        "vision",
        "--count",
        "1",
        "--hours",
        "0.004",
        "--notice",
        "4",
        "--grace",
        "10",
        "--json",
        "--",
        sys.executable,
        "-c",
        NOTICED,
        str(log),
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["noticed"] and report["ended_by"] == "lease-expired"
    assert report["terminated"] and not report["killed"]
    events = [line.split() for line in log.read_text().splitlines()]
    assert [name for name, _ in events] == ["checkpoint", "term"]  # the notice came first
    assert "USR1 sent to the command to checkpoint" in done.stderr


def test_a_bad_notice_signal_is_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path / "s"),
        "--project",
        "vision",
        "--count",
        "1",
        "--hours",
        "1",
        "--notice",
        "5",
        "--notice-signal",
        "KILL",
        "--",
        "true",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--notice-signal must be one of USR1, USR2, HUP, INT, TERM" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# Checkpoints nothing itself: starting again on the same log is its resume from a checkpoint.
RESUMABLE = """
import os, signal, sys, time
log = sys.argv[1]
resumed = os.path.exists(log)
def term(*_):
    with open(log, "a") as f:
        f.write("term\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
with open(log, "a") as f:
    f.write(("resume" if resumed else "start") + " " + os.environ["GPU_AGENT_ALLOCATION"] + "\\n")
while not resumed:
    time.sleep(0.1)
"""


def test_requeue_resumes_the_command_on_a_new_allocation_after_its_lease_ends(
    tmp_path: Path,
) -> None:
    """`--requeue 2`: the lease ends the command (SIGTERM, it exits within its grace); run
    asks again with the old allocation as the one it resumes (so it queues ahead of new
    work) and starts the command again, which goes on and finishes: one requeue, not two."""
    import sqlite3

    log = tmp_path / "log"
    done = run_cli(
        "run",
        "--state-dir",
        str(tmp_path / "s"),
        "--fleet",
        str(idle_fleet(tmp_path)),
        "--project",
        "vision",
        "--count",
        "1",
        "--hours",
        LEASE,
        "--grace",
        "10",
        "--requeue",
        "2",
        "--json",
        "--",
        sys.executable,
        "-c",
        RESUMABLE,
        str(log),
        cwd=tmp_path,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [first] = report["requeued_from"]
    second = report["allocation_id"]
    assert report["ended_by"] == "command" and first != second
    assert log.read_text().split() == ["start", first, "term", "resume", second]
    assert "requeued to resume it ahead of new work (1 requeue(s) left)" in done.stderr
    with sqlite3.connect(tmp_path / "s" / "ledger.sqlite") as db:
        rows = dict(db.execute("SELECT id, resumes FROM allocations").fetchall())
        reasons = dict(db.execute("SELECT id, release_reason FROM allocations").fetchall())
    assert rows == {first: None, second: first}
    assert reasons == {first: "lease-expired", second: "command-exit"}


def test_requeue_is_for_what_run_requested(tmp_path: Path) -> None:
    cases = {
        ("--allocation", "a1", "--requeue", "1"): "--requeue needs --project",
        (
            "--project",
            "vision",
            "--count",
            "1",
            "--hours",
            "1",
            "--requeue",
            "-1",
        ): "--requeue must be from 0 to 100, not -1",
    }
    for args, message in cases.items():
        done = run_cli("run", "--state-dir", str(tmp_path / "s"), *args, "--", "true", cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_failure_after_placing_and_before_the_command_releases_the_gpus(tmp_path: Path) -> None:
    """`run` placed, then failed before recording or starting its command (an injected raise
    there): the allocation is released and charged once, not left held with no command."""
    failed = run_cli(
        "run", "--state-dir", str(tmp_path / "s"), "--fleet", str(idle_fleet(tmp_path, "train")),
        "--project", "vision", "--count", "1", "--hours", "1", "--requeue", "1", "--json",
        "--", sys.executable, "-c", "pass",
        cwd=tmp_path, env={"GPU_AGENT_FAULT": "run:placed,raise"}, timeout=60,
    )  # fmt: skip
    assert failed.returncode != 0 and "fault injected at run:placed" in failed.stderr
    state = ["--state-dir", str(tmp_path / "s"), "--json"]
    (record,) = json.loads(run_cli("history", *state, cwd=tmp_path).stdout)["records"]
    assert record["reason"] == "cancelled"
    status = json.loads(run_cli("status", *state, cwd=tmp_path).stdout)
    assert status["problems"] == [] and not any(
        a["state"] == "active" for a in status["allocations"]
    )


@pytest.mark.parametrize("point", ["before:allocate", "after:allocate"])
def test_ctrl_c_while_run_places_leaves_nothing_placed(tmp_path: Path, point: str) -> None:
    """`gpu-agent run` interrupted (SIGINT) while its GPUs are being placed, just before the
    placement or just after it (the process stopped there with SIGSTOP, interrupted, then
    continued): exit 130, no command ran, and no allocation is left active or queued."""
    marker = tmp_path / "ran"
    state = ["--state-dir", str(tmp_path / "s")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "run", *state, "--fleet",
         str(idle_fleet(tmp_path, "train")), "--project", "vision", "--count", "1",
         "--hours", "1", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        cwd=tmp_path, env={**os.environ, "GPU_AGENT_FAULT": f"{point},stop"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not stopped(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "run never reached its armed point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not marker.exists()
    status = json.loads(run_cli("status", *state, "--json", cwd=tmp_path).stdout)
    assert status["problems"] == []
    assert not any(a["state"] in ("active", "queued") for a in status["allocations"])


READY = NOTICED.replace("while True:", 'log.write("ready 0\\n")\nlog.flush()\nwhile True:')
# READY, but run again after it was stopped (a requeue) it says so and exits: its work done
RESUMES = READY.replace(
    'log = open(sys.argv[1], "a")',
    "import os\n"
    'if os.path.exists(sys.argv[1]) and "term" in open(sys.argv[1]).read():\n'
    '    open(sys.argv[1], "a").write("resumed 0\\n")\n'
    "    sys.exit(0)\n"
    'log = open(sys.argv[1], "a")',
)


def logged(log: Path, what: str, n: int = 1) -> None:
    """Wait (60 s at most) until the command has logged `what` `n` times."""
    deadline = time.monotonic() + 60
    while not log.exists() or log.read_text().count(what) < n:
        assert time.monotonic() < deadline, f"no {what} within 60 s"
        time.sleep(0.05)


def placed_in_terms(make_orch: OrchFactory, clock: VirtualClock) -> tuple[Orchestrator, str, float]:
    """A guarded 3-hour lease held an hour at a time: (its orchestrator, id, first term's end)."""
    council = GUARDED_FLEET | {"guard_lease_hours": 1.0}
    orch = make_orch(small_config(council=council), clock=clock)
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 6}
    placed = orch.request(request, wait=False)
    assert placed.allocation is not None and placed.allocation.term_hours == 1.0
    return orch, placed.allocation.id, placed.allocation.lease_end.timestamp()


def run_driven(
    orch: Orchestrator, aid: str, log: Path, drive: Callable[[], None], say: Callable[[str], None]
) -> RunReport:
    """`run --notice 30` of a command that logs to `log`, on allocation `aid`, while `drive`
    moves the virtual clock in another thread (it waits on the command's log lines)."""
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    report = run_on(
        orch,
        aid,
        [sys.executable, "-c", READY, str(log)],
        grace_s=10,
        say=say,
        notice_s=30,
    )
    driver.join(timeout=60)
    return report


def test_a_renewed_term_gets_a_notice_of_its_own(make_orch: OrchFactory, tmp_path: Path) -> None:
    """A guarded lease held an hour at a time, `run --notice 30` on it: USR1 before the term
    ends; the term renewed, the deadline moved, so USR1 again before the new end; at that
    end, SIGTERM (the report says it was noticed)."""
    clock = VirtualClock()
    orch, aid, first_end = placed_in_terms(make_orch, clock)
    log = tmp_path / "log"

    def drive() -> None:
        logged(log, "ready")  # its handlers are set
        sleep_until(clock, first_end - 20)
        logged(log, "checkpoint")
        renewed = orch.services.ledger.renew(aid, first_end, clock.now(), "its GPUs work")
        assert renewed is not None
        sleep_until(clock, renewed.deadline - 20)
        logged(log, "checkpoint", 2)
        sleep_until(clock, renewed.deadline + 1)

    said: list[str] = []
    report = run_driven(orch, aid, log, drive, said.append)
    assert report.noticed and report.ended_by == "lease-expired" and report.terminated
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        "ready",
        "checkpoint",
        "checkpoint",
        "term",
    ]
    assert sum("USR1 sent to the command to checkpoint" in s for s in said) == 2


def test_a_run_that_takes_over_after_a_renewal_notices_the_new_end(
    make_orch: OrchFactory, tmp_path: Path
) -> None:
    """The `run` before this one told the command of the first term's end, then died; the
    term was renewed meanwhile. The notice it recorded was for an end that has moved: this
    `run` tells the command again before the renewed end."""
    clock = VirtualClock()
    orch, aid, first_end = placed_in_terms(make_orch, clock)
    ledger = orch.services.ledger
    command = {"argv": ["x"], "cwd": "/", "grace_s": 10, "notice_s": 30}
    ledger.record_run(aid, "run-old", command | {"notice_signal": "SIGUSR1"}, 1)
    sleep_until(clock, first_end - 20)
    ledger.noticed(aid, "run-old", clock.now())
    renewed = ledger.renew(aid, first_end, clock.now(), "its GPUs work")
    assert renewed is not None
    log = tmp_path / "log"

    def drive() -> None:
        logged(log, "ready")
        sleep_until(clock, renewed.deadline - 20)
        logged(log, "checkpoint")
        sleep_until(clock, renewed.deadline + 1)

    report = run_driven(orch, aid, log, drive, lambda _: None)
    assert report.noticed and report.ended_by == "lease-expired"
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        "ready",
        "checkpoint",
        "term",
    ]


def test_a_dead_runs_command_gets_its_notice_and_its_end_from_whoever_adopts_it(
    tmp_path: Path,
) -> None:
    """`run --requeue 1 --notice 4` is SIGKILLed while its command runs; `resume --orphans`
    adopts the allocation. Its monitor sends the command the notice before the lease ends
    (it checkpoints) and, at the end, SIGTERM: no GPU the ledger shows free still runs it,
    where the command once ran on, un-noticed. `run --resume` then carries the work on."""
    import sqlite3

    log = tmp_path / "log"
    fleet = idle_fleet(tmp_path, "train")  # busy GPUs: no idle release, the lease ends it
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(fleet)]
    # a 28.8-s lease: the adopter, a new process on a busy machine, starts well before the
    # notice is due (4 s before its end)
    ask = ["--project", "vision", "--count", "1", "--hours", "0.008", "--notice", "4"]
    ask += ["--grace", "10"]
    command = [sys.executable, "-c", RESUMES, str(log)]
    run = subprocess.Popen(  # no pipes: the command would hold them open past the run's death
        [sys.executable, "-m", "graph.cli", "run", *opts, *ask, "--requeue", "1", "--", *command],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logged(log, "ready")

    def pgid() -> int | None:
        with sqlite3.connect(tmp_path / "s" / "ledger.sqlite") as db:
            return db.execute("SELECT pgid FROM runs").fetchone()[0]  # type: ignore[no-any-return]

    deadline = time.monotonic() + 30
    while pgid() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    group = int(pgid() or 0)
    run.kill()
    run.wait()
    adopted = run_cli("resume", "--orphans", "--json", *opts, cwd=tmp_path, timeout=60)
    assert adopted.returncode == 0, adopted.stderr
    [ended] = json.loads(adopted.stdout)["adopted"]
    assert ended["reason"] == "released: lease-expired"
    said = [e["message"] for e in ended["events"] if e["kind"] == "command"]
    assert said[0].startswith("checkpoint notice sent to the command")
    assert said[1].startswith("the command a `gpu-agent run` that died left running was stopped")
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        "ready",
        "checkpoint",
        "term",
    ]
    assert not alive(group)
    aid = ended["allocation"]["id"]
    # its requeue runs the command again, which finds its work stopped and finishes it
    again = run_cli("run", "--resume", aid, "--json", *opts, cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["requeued_from"] == [aid] and report["ended_by"] == "command"
    assert log.read_text().splitlines()[-1] == "resumed 0"


def _ledger_one(state: Path, sql: str) -> tuple[object, ...]:
    import sqlite3

    with sqlite3.connect(state / "ledger.sqlite") as db:
        return tuple(db.execute(sql).fetchone() or ())


def test_a_plain_runs_command_ends_with_a_lease_that_ran_out_unwatched(tmp_path: Path) -> None:
    """A `run` without --requeue is SIGKILLed while its command runs, and nothing adopts its
    allocation. Its lease runs out; the next process to open the state dir (`status`)
    releases it as expired-while-down, and stops the command first, where the command once
    ran on, on GPUs the ledger showed free (plain runs recorded no process group, and that
    release stopped no command)."""
    log = tmp_path / "log"
    fleet = tmp_path / "fleet.toml"  # busy GPUs; a monitor counts as gone 1.5 s after its beat
    fleet.write_text(
        fleet_toml(
            monitor={"tick_seconds": 0.5},
            scheduler={"poll_seconds": 0.5},
            simulation={"default_workload": "train"},
            limits={"min_duration_minutes": 0.05},
        )
    )
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(fleet)]
    ask = ["--project", "vision", "--count", "1", "--hours", "0.003", "--grace", "10"]
    command = [sys.executable, "-c", READY, str(log)]
    run = subprocess.Popen(  # no pipes: the command would hold them open past the run's death
        [sys.executable, "-m", "graph.cli", "run", *opts, *ask, "--", *command],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logged(log, "ready")

    def one(sql: str) -> tuple[object, ...]:
        return _ledger_one(tmp_path / "s", sql)

    deadline = time.monotonic() + 30
    while not one("SELECT pgid FROM runs WHERE pgid IS NOT NULL"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (group,) = one("SELECT pgid FROM runs")
    assert isinstance(group, int)
    run.kill()
    run.wait()
    try:
        (ends,) = one("SELECT deadline FROM allocations")
        assert isinstance(ends, float)
        time.sleep(max(0.0, ends + 2.0 - time.time()))  # the lease ran out, its beat is stale
        assert alive(group)  # nobody has stopped it yet
        status = run_cli("status", *opts, cwd=tmp_path, timeout=60)
        assert status.returncode == 0, status.stderr
        assert one("SELECT state, release_reason FROM allocations") == (
            "released",
            "expired-while-down",
        )
        assert [line.split()[0] for line in log.read_text().splitlines()] == ["ready", "term"]
        assert not alive(group)
    finally:
        if alive(group):  # not left running if the test fails
            os.killpg(group, signal.SIGKILL)


def test_sigterm_to_a_queued_run_leaves_nothing_placed(tmp_path: Path) -> None:
    """SIGTERM (`timeout`, systemd, `kill`) reaches `run` while it waits in the queue: it
    stops as Ctrl-C does (exit 130, the request cancelled), where it once died outright and
    left the queued request to be placed and charged by whoever adopted it, for a command
    that never ran."""
    fleet = idle_fleet(tmp_path, "train")
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(fleet)]
    ask = ["--purpose", "training", "--count", "8", "--hours", "1", "--gpu-type", "A100"]
    full = run_cli("request", *opts, "--project", "busy", *ask, "--no-wait", cwd=tmp_path)
    assert full.returncode == 0, full.stderr  # the small fleet's 8 A100, held unmonitored
    run = subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "run", *opts, "--project", "p", *ask, "--", "true"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    query = "SELECT state FROM allocations WHERE project='p'"
    while _ledger_one(tmp_path / "s", query) != ("queued",):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "nothing is left placed for it" in err
    assert _ledger_one(tmp_path / "s", "SELECT state, release_reason FROM allocations "
                       "WHERE project='p'") == ("released", "cancelled")  # fmt: skip


def test_a_ctrl_c_as_the_command_starts_stops_the_command(tmp_path: Path) -> None:
    """Ctrl-C lands just after the command started, before `run` watched it (the process
    stalled there, GPU_AGENT_FAULT=run:started,stop, and is sent SIGINT): the command is
    stopped with the allocation, where it once ran on, on GPUs the ledger had freed, and
    nothing could ever stop it (no process group recorded yet)."""
    pidfile = tmp_path / "pid"
    command = ["bash", "-c", f'echo $$ > "{pidfile}"; sleep 60']
    fleet = idle_fleet(tmp_path, "train")
    run = subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "run", "--state-dir", str(tmp_path / "s"),
         "--fleet", str(fleet), "--project", "p", "--count", "1", "--hours", "1",
         "--grace", "5", "--", *command],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "GPU_AGENT_FAULT": "run:started,stop"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text().strip() or not stalled(run.pid):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGCONT)
        _, err = run.communicate(timeout=60)
        assert "ended (signal): stopping the command" in err, err
        assert not alive(pid)
        assert _ledger_one(tmp_path / "s", "SELECT state FROM allocations") == ("released",)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def stalled(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


# The command reads its allocation's row in the ledger on SIGTERM, after a second of its grace
READS_ON_TERM = """
import signal, sqlite3, sys, time
def on_term(signum, frame):
    time.sleep(1.0)
    with sqlite3.connect(sys.argv[2]) as db:
        state = db.execute("SELECT state FROM allocations").fetchone()[0]
    open(sys.argv[1], "a").write(f"state on term: {state}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "a").write("ready\\n")
while True:
    time.sleep(0.05)
"""


def test_a_lease_end_frees_the_gpus_only_once_the_command_has_stopped(tmp_path: Path) -> None:
    """At the lease's end `run` released the allocation, then stopped its command: during
    the command's grace its GPUs were free in the ledger, and a queued request's command ran
    beside it. Now the GPUs go back once it has stopped: in its SIGTERM handler the ledger
    still shows the allocation active (one SIGTERM, though the monitor and `run` both end
    it)."""
    log = tmp_path / "log"
    ledger = tmp_path / "s" / "ledger.sqlite"
    done = run_cli(
        "run", "--state-dir", str(tmp_path / "s"), "--fleet", str(idle_fleet(tmp_path, "train")),
        "--project", "p", "--count", "1", "--hours", "0.002", "--grace", "20", "--",
        sys.executable, "-c", READS_ON_TERM, str(log), str(ledger),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == ["ready", "state on term: active"]
    assert _ledger_one(tmp_path / "s", "SELECT state, release_reason FROM allocations") == (
        "released",
        "lease-expired",
    )


# `run` in a PID namespace of its own: to gpu-agent another host (fleet.monitors.this_host),
# whose processes it cannot see, only read the beats of; its SIGKILL kills what runs in it
ANOTHER_HOST = ["unshare", "--pid", "--fork", "--kill-child"]


@functools.cache
def can_unshare() -> bool:
    """A PID namespace can be made here (root, as CI runs the tests)."""
    return subprocess.run([*ANOTHER_HOST, "true"], capture_output=True).returncode == 0


def reading_run(
    tmp_path: Path, grace: str, elsewhere: bool = False, **monitor: float
) -> tuple[subprocess.Popen[str], str, Path, str, Path]:
    """`gpu-agent run` of READS_ON_TERM with `--grace` and `--notice 60` (its SIGUSR1 would
    end the command: no notice is due before a release or the lease's end from afar), on
    ANOTHER_HOST where `elsewhere` (`monitor`: the fleet's settings), once its command is
    ready: the process, its allocation's id, the state directory, the fleet file and the
    command's log."""
    if elsewhere and not can_unshare():
        pytest.skip("another host is a PID namespace of its own: unshare --pid needs root")
    log, state = tmp_path / "log", tmp_path / "s"
    fleet = str(idle_fleet(tmp_path, "train", **monitor))
    runner = subprocess.Popen(
        [
            *(ANOTHER_HOST if elsewhere else []), sys.executable, "-m", "graph.cli", "run",
            "--state-dir", str(state), "--fleet", fleet, "--project", "p", "--count", "1",
            "--hours", "1", "--grace", grace, "--notice", "60", "--",
            sys.executable, "-c", READS_ON_TERM, str(log), str(state / "ledger.sqlite"),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        logged(log, "ready")
    except BaseException:
        runner.kill()
        raise
    (aid,) = _ledger_one(state, "SELECT id FROM allocations WHERE state='active'")
    return runner, str(aid), state, fleet, log


def test_a_lease_end_another_process_monitors_waits_for_the_run_on_it(tmp_path: Path) -> None:
    """`run --allocation` on an allocation whose thread `resume` monitors in another
    process: at the lease's end that monitor released it at once and the command ran on for
    its grace on GPUs the ledger showed free. Now the monitor waits for the run, which stops
    the command and then releases it (lease-expired, at the deadline); charged once."""
    log, state = tmp_path / "log", tmp_path / "s"
    opts = ["--state-dir", str(state), "--fleet", str(idle_fleet(tmp_path, "train"))]
    # an 18-s lease: `resume` and `run` start (seconds each on a busy machine) well within it
    ask = ["--project", "p", "--purpose", "training", "--count", "1", "--hours", "0.005"]
    ask += ["--no-wait", "--json"]
    placed = json.loads(run_cli("request", *opts, *ask, cwd=tmp_path).stdout)
    aid, thread = placed["allocation"]["id"], placed["thread_id"]
    cli = [sys.executable, "-m", "graph.cli"]
    monitor = subprocess.Popen(
        [*cli, "resume", *opts, thread, "--json"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    command = [sys.executable, "-c", READS_ON_TERM, str(log), str(state / "ledger.sqlite")]
    try:
        done = run_cli("run", *opts, "--allocation", aid, "--grace", "20", "--json", "--",
                       *command, cwd=tmp_path)  # fmt: skip
        outcome, _ = monitor.communicate(timeout=120)
    finally:
        monitor.kill()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ended_by"] == "lease-expired"
    assert log.read_text().splitlines() == ["ready", "state on term: active"]
    assert json.loads(outcome)["status"] == "released", outcome
    (deadline, released_at) = _ledger_one(state, "SELECT deadline, released_at FROM allocations")
    assert released_at == deadline
    assert _ledger_one(state, "SELECT count(*) FROM charges") == (1,)


SLEEPS = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)"


@pytest.mark.parametrize("named", [True, False])
def test_a_release_after_a_killed_run_allocation_stops_the_command_it_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], named: bool
) -> None:
    """`run --allocation` is SIGKILLed; its command (in a session of its own) runs on. It
    recorded no process group, so a release freed the GPUs with the command still on them
    (later: said it might still run). Now it is recorded as a given run's (after an earlier
    `run --allocation` on the same allocation whose command exited): the release stops the
    command first and says nothing of it, and `run --resume` leaves a given allocation be.
    One command at a time: a second `run` beside it, or beside what it left, is refused. A
    command that hides which allocation it runs on (its environment no longer names it) is
    left alone, and the release says it may still run."""
    from graph.cli import main

    pid, state = tmp_path / "pid", tmp_path / "s"
    opts = ["--state-dir", str(state), "--fleet", str(idle_fleet(tmp_path, "train"))]
    ask = ["--project", "p", "--purpose", "training", "--count", "1", "--hours", "1"]
    placed = run_cli("request", *opts, *ask, "--no-wait", "--json", cwd=tmp_path)
    aid = json.loads(placed.stdout)["allocation"]["id"]
    first = run_cli(
        "run", *opts, "--allocation", aid, "--", sys.executable, "-c", "pass", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr

    def command() -> str:  # what `status` says of it
        assert main(["status", *opts, "--json"]) == 0
        (live,) = json.loads(capsys.readouterr()[0])["allocations"]
        return str(live["command"])

    assert command().startswith("exited under gpu-agent run pid")
    hide = [] if named else ["env", "-u", "GPU_AGENT_ALLOCATION"]
    run = subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "run", *opts, "--allocation", aid, "--", *hide,
         sys.executable, "-c", SLEEPS, str(pid)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    beside = ["run", *opts, "--allocation", aid, "--json", "--", "true"]
    try:
        deadline = time.monotonic() + 60
        while not (pid.exists() and pid.read_text()):
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        assert main(beside) == 2
        assert (
            "already runs a command under gpu-agent" in json.loads(capsys.readouterr()[0])["error"]
        )
        assert command() == f"running under gpu-agent run pid {run.pid} on {socket.gethostname()}"
        run.kill()
        run.wait(timeout=30)
        assert alive(int(pid.read_text()))  # the run's death left it running
        said = command()
        if named:
            assert said.startswith(f"left running by gpu-agent run pid {run.pid} on ")
            assert said.endswith(f"which died (process group {pid.read_text()}): its end stops it")
        else:
            assert said.endswith("the command may still run, and nothing here stops it")
        assert main(["run", *opts, "--resume", aid, "--json"]) == 2
        assert (
            "given to `gpu-agent run --allocation`" in json.loads(capsys.readouterr()[0])["error"]
        )
        if named:
            assert main(beside) == 2
            assert "left when it died" in json.loads(capsys.readouterr()[0])["error"]
        assert main(["release", *opts, aid, "--json"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["command_may_still_run"] is not named
        assert (err == "") is named
        assert alive(int(pid.read_text())) is not named
    finally:
        run.kill()
        if pid.exists() and pid.read_text() and alive(int(pid.read_text())):
            os.kill(int(pid.read_text()), signal.SIGKILL)


TOOL_RELEASE = """
import json, sys
from graph.admin import release_graph
print(json.dumps(release_graph.invoke({"allocation_id": sys.argv[1]})))
"""


@pytest.mark.parametrize("by", ["cli", "tool", "two clis", "another host"])
def test_a_release_from_another_shell_frees_the_gpus_only_once_the_command_has_stopped(
    tmp_path: Path, by: str
) -> None:
    """`gpu-agent release` (or the gpu-release tool) from another shell, while `run`'s
    command runs: the release used to free the GPUs at once and `run` then stopped the
    command, so for its grace the next holder's command could run beside it. Now the lease
    ends at the release instead, `run` stops the command and then releases: in its SIGTERM
    handler the ledger still shows the allocation active; the release is explicit, charged
    to when it was first asked, and the audit log says who asked. Of two releases at once,
    one released it and the other says it was already released. From another host, where
    `run`'s process cannot be seen, its beats say it lives (before, that release freed the
    GPUs at once)."""
    runner, aid, state, fleet, log = reading_run(tmp_path, "20", by == "another host")
    release = [sys.executable, "-m", "graph.cli", "release", "--state-dir", str(state)]
    try:
        if by == "tool":
            env = {**os.environ, "GPU_AGENT_HOME": str(state), "GPU_AGENT_FLEET": fleet}
            calls = [[sys.executable, "-c", TOOL_RELEASE, str(aid)]]
        else:
            env = {**os.environ}
            calls = [[*release, "--fleet", fleet, str(aid), "--json"]] * (
                2 if by == "two clis" else 1
            )
        callers = [
            subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
            for c in calls
        ]
        outs = [json.loads(c.communicate(timeout=60)[0]) for c in callers]
        assert all(c.returncode == 0 for c in callers), outs
        _, err = runner.communicate(timeout=60)
    finally:
        runner.kill()
    assert log.read_text().splitlines() == ["ready", "state on term: active"]
    if by == "tool":
        assert outs[0]["release"]["reason"] == "explicit" and "warning" not in outs[0], outs
    else:
        assert all(o["reason"] == "explicit" and not o["command_may_still_run"] for o in outs)
        assert sorted(o["already_released"] for o in outs) == [False, True][: len(outs)], outs
    (asked_at,) = _ledger_one(state, "SELECT at FROM audit WHERE action='release-asked'")
    assert _ledger_one(state, "SELECT count(*) FROM audit WHERE action='release-asked'") == (1,)
    assert _ledger_one(state, "SELECT state, release_reason, released_at FROM allocations") == (
        "released",
        "explicit",
        pytest.approx(asked_at, abs=1e-3),  # charged to when it was asked, not to the stop
    )
    assert "ended (explicit): stopping the command" in err, err


@pytest.mark.parametrize("by", ["cli", "page", "another host"])
def test_a_release_that_gives_up_waiting_for_a_stalled_run_says_the_command_may_still_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    by: str,
) -> None:
    """The `run` that runs the command is stopped (SIGSTOP) and never acts on the release:
    after the command's grace (and RELEASE_WAIT_S, shortened here) the release goes ahead
    and says, on stderr and in its JSON or on the page, that the command may still be
    running, rather than look like a clean release. On another host its beats stop: that
    release used to take the silence for the run's death and report a clean release, while
    nothing had stopped the command (the wait is not shortened there: the silence ends it)."""
    from graph.cli import main

    elsewhere = by == "another host"
    beats = {"heartbeat_seconds": 0.5, "heartbeat_stale_seconds": 1.5} if elsewhere else {}
    runner, aid, state, fleet, log = reading_run(tmp_path, "0.5", elsewhere, **beats)
    stalled = namespaced(runner.pid) if elsewhere else runner.pid
    try:
        os.kill(stalled, signal.SIGSTOP)
        if not elsewhere:
            monkeypatch.setattr("fleet.services.RELEASE_WAIT_S", 0.5)
        if by == "page":
            text = released_on_page(state, fleet, aid)
            assert f"Released allocation {aid}" in text, text[-500:]
            assert f"Warning: the gpu-agent run on {aid} did not stop its command" in text
        else:
            args = ["release", "--state-dir", str(state), "--fleet", fleet, str(aid), "--json"]
            assert main(args) == 0
            out, err = capsys.readouterr()
            assert json.loads(out)["command_may_still_run"] is True
            assert err.startswith(f"warning: the gpu-agent run on {aid} did not stop its command")
            assert err.count("\n") == 1
        assert log.read_text().splitlines() == ["ready"]  # never told to stop
    finally:
        os.kill(stalled, signal.SIGCONT)
        runner.communicate(timeout=60)
    assert _ledger_one(state, "SELECT state, release_reason FROM allocations") == (
        "released",
        "explicit",
    )


def namespaced(unshare: int) -> int:
    """The process ANOTHER_HOST's `unshare` (PID `unshare`) runs: its only child."""
    deadline = time.monotonic() + 30
    while not (children := Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()):
        assert time.monotonic() < deadline, "unshare started nothing"
        time.sleep(0.05)
    (child,) = children
    return int(child)


def released_on_page(state: Path, fleet: str, aid: str) -> str:
    """The page (single-user: no access file) over `state` releases `aid`: its text."""
    orch = Orchestrator(state, load_fleet(fleet), identity=SERVER)
    try:
        client = TestClient(create_app(orch), base_url="http://127.0.0.1")
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/fleet").text)
        assert token is not None
        r = client.post(f"/allocations/{aid}/release", data={"csrf": token.group(1)})
        assert r.status_code == 200, r.text[-500:]
        return re.sub(r"<[^>]+>", "", r.text)
    finally:
        orch.close()
