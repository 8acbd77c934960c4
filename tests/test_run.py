"""`gpu-agent run` with real child processes on the simulated fleet (wall-clock time).

The fleet's GPUs read idle (the simulated `idle` workload), and the monitor's idle timeout is
3 s, so the graph releases the allocation for idling a few seconds after the command starts;
`run` must then stop the command's whole process group and nothing of it may be left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.clock import VirtualClock, sleep_until
from graph.orchestrator import Orchestrator
from graph.run_command import RunReport, run_on
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


def idle_fleet(tmp_path: Path, workload: str = "idle") -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(
        fleet_toml(
            monitor={
                "tick_seconds": 0.5,
                "idle_timeout_minutes": 0.05,
                "low_util_window_minutes": 0.05,
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
        owned=False,
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
    command = [sys.executable, "-c", READY, str(log)]
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
    # its requeue runs the command again for a whole lease: room for a busy machine
    again = run_cli("run", "--resume", aid, "--json", *opts, cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["requeued_from"] == [aid]
