"""Every live allocation has a monitor with a heartbeat (fleet.monitors). Each kind of process
that monitors (the CLI after `request`, the CLI after `resume --approve`, the web page after an
approval, a worker) is killed with SIGKILL while it monitors: `status`, the page and the
metrics then show the allocation unmonitored, and `gpu-agent resume`, a worker or
`resume --orphans` adopts it; it is then released, charged and written to history once.

Nothing here waits on the machine's speed: each step waits (with a generous limit) for the
ledger or `status` to show what it expects. The clock runs 60 times fast, so a ten-hour lease
lasts ten minutes of real time, far longer than any step; the tests release explicitly. A
killed process on this host is seen dead by its PID at once, so the beats' stale time is set
long: a busy machine that delays a live monitor's beat never makes it look dead here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from starlette.testclient import TestClient

from graph.metrics import registry_for
from graph.orchestrator import Orchestrator
from graph.records import Records
from graph.ui import SERVER, create_app
from tests.conftest import fleet_toml, run_cli

COUNCIL = {
    "policy": "reference",
    "approve_threshold": 0.99,
    "deny_threshold": 0.01,
    "auto_approve_max_gpus": 1,
    "auto_approve_max_usd": 100_000,
}
LIMIT_S = 90.0


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            council=COUNCIL,
            clock={"time_scale": 60},
            monitor={"tick_seconds": 30, "heartbeat_seconds": 0.2, "heartbeat_stale_seconds": 120},
            scheduler={"poll_seconds": 30},
        )
    )
    return {
        "cwd": tmp_path,
        "state": tmp_path / "state",
        "fleet": fleet,
        "opts": ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)],
    }


def cli(site: dict[str, Any], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "graph.cli", *args, *site["opts"]],
        cwd=site["cwd"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def status(site: dict[str, Any]) -> dict[str, Any]:
    r = run_cli("status", "--json", *site["opts"], cwd=site["cwd"])
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def until(what: str, check: Callable[[], Any]) -> Any:
    """Wait (on the ledger, not a clock) until `check` returns something true."""
    end = time.monotonic() + LIMIT_S
    while time.monotonic() < end:
        try:
            got = check()
        except (sqlite3.Error, OSError, json.JSONDecodeError, AssertionError):
            got = None
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def live(site: dict[str, Any]) -> dict[str, Any] | None:
    found = [a for a in status(site)["allocations"] if a["state"] == "active"]
    return found[0] if found else None


def monitored_by(site: dict[str, Any], kind: str, pid: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        a = live(site)
        return a if a and a["monitored"] and f"{kind} pid {pid} " in a["monitor"] else None

    got: dict[str, Any] = until(f"a {kind} (pid {pid}) monitoring", check)
    return got


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def shows_unmonitored(site: dict[str, Any], aid: str) -> None:
    """`status` (the allocation and a problem naming the way out) and the metrics say it."""
    data = status(site)
    [a] = [a for a in data["allocations"] if a["id"] == aid]
    assert a["state"] == "active" and a["monitored"] is False
    assert any(
        aid in p and "is not monitored" in p and "gpu-agent resume" in p for p in data["problems"]
    )
    text = run_cli("status", *site["opts"], cwd=site["cwd"]).stdout
    assert re.search(rf"{aid} .* NOT MONITORED", text)
    with Records(site["state"], str(site["fleet"]), create=False) as records:
        metrics = generate_latest(registry_for(records.services)).decode()
    assert re.search(
        rf'gpu_agent_unmonitored\{{allocation_id="{aid}",project="vision",'
        r'state="active"\} 1\.0',
        metrics,
    ), metrics


def exactly_once(site: dict[str, Any]) -> None:
    db = sqlite3.connect(f"file:{site['state'] / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*) FROM holds").fetchone() == (0,)
        charges, history = db.execute(
            "SELECT (SELECT count(*) FROM charges), (SELECT count(*) FROM history)"
        ).fetchone()
        assert (
            charges
            == history
            == db.execute("SELECT count(*) FROM allocations WHERE state='released'").fetchone()[0]
            >= 1
        )
    finally:
        db.close()


def release(site: dict[str, Any], aid: str) -> None:
    r = run_cli("release", aid, *site["opts"], cwd=site["cwd"])
    assert r.returncode == 0, r.stderr


def release_and_finish(site: dict[str, Any], aid: str, monitor: subprocess.Popen[str]) -> Any:
    """Release from another process; the monitor sees it, ends, and its JSON is returned."""
    release(site, aid)
    out, err = monitor.communicate(timeout=LIMIT_S)
    assert monitor.returncode == 0, err
    exactly_once(site)
    return json.loads(out)


def ask_for_review(site: dict[str, Any], thread: str) -> None:
    r = run_cli(
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "10",
        "--gpu-type",
        "A100",
        "--thread-id",
        thread,
        "--json",
        *site["opts"],
        cwd=site["cwd"],
    )
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "pending_review", r.stderr


def test_a_killed_request_is_shown_and_resume_adopts_it(site: dict[str, Any]) -> None:
    proc = cli(
        site,
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "10",
        "--gpu-type",
        "A100",
        "--thread-id",
        "fg",
    )
    aid = monitored_by(site, "cli", proc.pid)["id"]
    kill(proc)
    shows_unmonitored(site, aid)
    adopter = cli(site, "resume", "fg", "--json")
    monitored_by(site, "cli", adopter.pid)
    again = run_cli("resume", "fg", *site["opts"], cwd=site["cwd"])  # a second adopter
    assert (
        again.returncode == 2
        and f"allocation {aid} is monitored by cli pid {adopter.pid}" in again.stderr
    )
    assert release_and_finish(site, aid, adopter)["release"]["reason"] == "explicit"


def test_a_killed_approval_is_adopted_by_a_worker(site: dict[str, Any]) -> None:
    ask_for_review(site, "rv")
    approver = cli(site, "resume", "rv", "--approve", "--comment", "go")
    aid = monitored_by(site, "cli", approver.pid)["id"]
    kill(approver)
    shows_unmonitored(site, aid)
    worker = cli(site, "worker", "--exit-when-idle", "--poll-seconds", "0.2", "--json")
    monitored_by(site, "worker", worker.pid)
    assert release_and_finish(site, aid, worker)["finished"] == {"adopted released": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_killed_page_is_flagged_and_resume_orphans_adopts(site: dict[str, Any]) -> None:
    ask_for_review(site, "pg")
    port = free_port()
    page = cli(site, "ui", "--port", str(port))
    url = f"http://127.0.0.1:{port}/reviews/pg"
    body = until("the page", lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', body)
    assert csrf is not None
    form = f"csrf={csrf.group(1)}&decision=approve&comment=ok".encode()
    with urllib.request.urlopen(
        urllib.request.Request(  # a form post from the page itself
            f"{url}/decide", data=form, headers={"Origin": f"http://127.0.0.1:{port}"}
        ),
        timeout=30,
    ) as r:
        assert r.status == 200
    aid = monitored_by(site, "page", page.pid)["id"]
    kill(page)
    shows_unmonitored(site, aid)
    orch = Orchestrator(site["state"], str(site["fleet"]), create=False, identity=SERVER)
    try:  # a page started again shows the flag on its fleet page
        fleet = TestClient(create_app(orch), base_url="http://127.0.0.1").get("/fleet").text
    finally:
        orch.close()
    assert "no process is monitoring this allocation" in fleet and aid in fleet
    adopter = cli(site, "resume", "--orphans", "--json")
    monitored_by(site, "cli", adopter.pid)
    adopted = release_and_finish(site, aid, adopter)["adopted"]
    assert [a["release"]["reason"] for a in adopted] == ["explicit"]


def test_a_killed_worker_is_shown_and_another_worker_takes_over(site: dict[str, Any]) -> None:
    r = run_cli(
        "submit",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "10",
        "--gpu-type",
        "A100",
        "--thread-id",
        "job",
        *site["opts"],
        cwd=site["cwd"],
    )
    assert r.returncode == 0, r.stderr
    first = cli(site, "worker", "--lease-seconds", "2", "--poll-seconds", "0.2")
    aid = monitored_by(site, "worker", first.pid)["id"]
    kill(first)
    shows_unmonitored(site, aid)
    second = cli(
        site,
        "worker",
        "--lease-seconds",
        "2",
        "--poll-seconds",
        "0.2",
        "--exit-when-idle",
        "--json",
    )
    monitored_by(site, "worker", second.pid)
    assert release_and_finish(site, aid, second)["finished"] == {"released": 1}
