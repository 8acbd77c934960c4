"""A user's day at the command line: pending reviews listed and decided without holding the
terminal, tokens listed and revoked, a member's requests in their own project, the lease and
why it is not the hours asked, what a budget change did, JSON errors, shell-quoted hints, a
command that cannot start, and studio's port."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import InvalidInput
from graph.cli_servers import _studio_port
from tests.conftest import add_token, fleet_toml, run_cli

COUNCIL = {
    "policy": "reference",
    "approve_threshold": 0.99,
    "deny_threshold": 0.01,
    "auto_approve_max_gpus": 1,
    "auto_approve_max_usd": 100_000,
}


@pytest.fixture
def day(tmp_path: Path) -> dict[str, Any]:
    """Tokens: root (admin), alice (member of vision), dave (approver of vision). The wall
    clock: leases outlast the test; it releases what it placed."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council=COUNCIL))
    opts = ["--state-dir", str(tmp_path / "s"), "--fleet", str(fleet)]

    root = add_token(tmp_path, tmp_path / "s", "root", "admin", None, None)
    tokens = {
        "root": root,
        "alice": add_token(tmp_path, tmp_path / "s", "alice", "member", "vision", root),
        "dave": add_token(tmp_path, tmp_path / "s", "dave", "approver", "vision", root),
    }
    return {"cwd": tmp_path, "opts": opts, "tokens": tokens, "state": tmp_path / "s"}


def cli(day: dict[str, Any], who: str, *args: str) -> Any:
    return run_cli(*args, *day["opts"], cwd=day["cwd"], env={"GPU_AGENT_TOKEN": day["tokens"][who]})


def token(day: dict[str, Any], who: str, *args: str) -> Any:
    return run_cli(
        "token",
        *args,
        "--state-dir",
        str(day["state"]),
        cwd=day["cwd"],
        env={"GPU_AGENT_TOKEN": day["tokens"][who]},
    )


def ledger(day: dict[str, Any], sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{day['state'] / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_a_review_from_request_to_placement_without_holding_the_terminal(
    day: dict[str, Any],
) -> None:
    r = cli(
        day,
        "alice",
        "request",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "4",
        "--thread-id",
        "rv",
    )  # no --project: alice's own
    assert r.returncode == 0, r.stderr
    assert "pending_review" in r.stdout
    assert "decide with: gpu-agent resume rv --approve (or --deny)" in r.stdout
    listed = json.loads(cli(day, "dave", "reviews", "--json").stdout)["reviews"]
    assert [(x["thread_id"], x["project"], x["requested_by"], x["count"]) for x in listed] == [
        ("rv", "vision", "alice", 2)
    ]
    assert listed[0]["waiting_s"] >= 0 and listed[0]["council"]
    text = cli(day, "dave", "reviews").stdout
    assert "asked by alice" in text and "gpu-agent resume rv --approve" in text
    r = cli(
        day, "dave", "resume", "rv", "--approve", "--comment", "deadline", "--no-wait", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "allocated" and out["next"] == ["monitor"]
    aid = out["allocation"]["id"]
    [a] = [
        a
        for a in json.loads(cli(day, "root", "status", "--json").stdout)["allocations"]
        if a["id"] == aid
    ]
    assert a["monitored"] is False  # nobody carries it on until a worker or `resume` does
    assert cli(day, "dave", "reviews").stdout.strip() == "no request is waiting for a decision"
    decided = [
        e
        for e in json.loads(cli(day, "root", "audit", "--json").stdout)["entries"]
        if e["target"] == "rv" and e["action"] == "approve"
    ]
    assert [(e["who"], e["detail"]) for e in decided] == [("dave", "human review: deadline")]
    assert cli(day, "alice", "release", aid).returncode == 0


def test_a_faster_type_leases_the_hours_asked(day: dict[str, Any]) -> None:
    r = cli(
        day,
        "alice",
        "request",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "4",
        "--gpu-type",
        "H100",
        "--no-wait",
    )
    assert r.returncode == 0 and "lease" not in r.stdout.split("\n", 2)[2], r.stdout
    r = cli(
        day,
        "alice",
        "request",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "4",
        "--mode",
        "performance",
        "--no-wait",
    )  # the fastest type: H100 for A100-hours; the lease is the 4 h asked all the same
    assert r.returncode == 0, r.stderr
    assert "lease" not in r.stdout.split("\n", 2)[2], r.stdout
    assert [h for (h,) in ledger(day, "SELECT hours FROM allocations WHERE state='active'")] == [
        4.0,
        4.0,
    ]
    for (aid,) in ledger(day, "SELECT id FROM allocations WHERE state='active'"):
        assert cli(day, "alice", "release", aid).returncode == 0


def test_the_lease_says_when_the_budget_shortened_it(day: dict[str, Any]) -> None:
    """A new fleet prices a new project at its worst case: $30 buys 5.86 of the 10 A100
    hours (over half of them, limits.min_lease_share), so the lease is that long (the
    council asks a human about a request dearer than the budget left)."""
    assert cli(day, "root", "budget", "set", "vision", "30").returncode == 0
    asked = cli(
        day,
        "alice",
        "request",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "10",
        "--gpu-type",
        "A100",
        "--no-wait",
        "--json",
    )
    thread = json.loads(asked.stdout)["thread_id"]
    r = cli(day, "dave", "resume", thread, "--approve", "--no-wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "lease 5.86 h, not the 10.00 h this work takes on A100: the project's budget "
        "buys no more" in r.stdout
    )
    refused = cli(
        day,
        "alice",
        "request",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "10",
        "--gpu-type",
        "A100",
        "--no-wait",
    )
    assert (
        refused.returncode != 0 and "even for 50% of the lease" in refused.stdout + refused.stderr
    )


def test_what_a_budget_change_did(day: dict[str, Any]) -> None:
    r = cli(
        day,
        "alice",
        "request",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "10",
        "--gpu-type",
        "A100",
        "--no-wait",
        "--json",
    )
    aid = json.loads(r.stdout)["allocation"]["id"]
    cut = cli(day, "root", "budget", "set", "vision", "2")
    assert "budget of vision: $2.00; 1 running allocation now ends earlier" in cut.stdout
    raised = cli(day, "root", "budget", "set", "vision", "1000", "--json")
    moved = json.loads(raised.stdout)["moved"]
    assert [(m["allocation_id"], m["earlier"]) for m in moved] == [(aid, False)]
    assert cli(day, "root", "budget", "set", "vision", "2").returncode == 0
    again = cli(day, "root", "budget", "set", "vision", "1000")
    assert "1 running allocation now ends later (back towards" in again.stdout, again.stdout
    assert (
        "no running allocation had to move"
        in cli(day, "root", "budget", "set", "vision", "2000").stdout
    )
    refused = cli(day, "root", "budget", "set", "vision", "1e300", "--json")
    assert refused.returncode == 2 and json.loads(refused.stdout)["exit_code"] == 2
    assert cli(day, "alice", "release", aid).returncode == 0


def test_tokens_listed_and_revoked(day: dict[str, Any]) -> None:
    listed = json.loads(token(day, "root", "list", "--json").stdout)["identities"]
    assert [(i["name"], i["role"], i["project"]) for i in listed] == [
        ("root", "admin", None),
        ("alice", "member", "vision"),
        ("dave", "approver", "vision"),
    ]
    assert "token_sha256" not in json.dumps(listed)
    assert token(day, "alice", "list").returncode == 5  # admins only
    assert token(day, "alice", "revoke", "dave").returncode == 5
    r = token(day, "root", "revoke", "root")
    assert r.returncode == 2 and "last admin" in r.stderr
    r = token(day, "root", "revoke", "dave")
    assert r.returncode == 0 and "dave (approver) revoked" in r.stdout
    r = cli(day, "dave", "request", "--purpose", "training", "--count", "1", "--hours", "1")
    assert r.returncode == 5 and "unknown token" in r.stderr  # it stopped working at once
    assert token(day, "root", "revoke", "dave").returncode == 2  # no such identity


def test_a_member_without_a_project_and_an_admin_without_one(day: dict[str, Any]) -> None:
    r = cli(
        day, "root", "request", "--purpose", "training", "--count", "1", "--hours", "1", "--json"
    )
    assert r.returncode == 2 and "--project is required (root is an admin" in r.stderr
    assert json.loads(r.stdout)["error"].startswith("--project is required")


def test_json_errors_are_one_object_on_stdout(day: dict[str, Any]) -> None:
    for args in (
        ["request", "--purpose", "training", "--count", "x", "--hours", "1", "--json"],
        ["release", "a-nothere00000", "--json"],
        ["resume", "no-such-thread", "--json"],
        ["nvml", "record", "--out", "/nonexistent/dir/x.json", "--json"],
    ):
        r = cli(day, "root", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        error = json.loads(r.stdout)
        assert set(error) == {"error", "exit_code", "type"} and error["exit_code"] == 2


def test_a_command_that_cannot_start_places_nothing(day: dict[str, Any]) -> None:
    for command in ("/nonexistent", "no-such-program-here", str(day["cwd"])):
        r = cli(
            day,
            "alice",
            "run",
            "--project",
            "vision",
            "--count",
            "1",
            "--hours",
            "1",
            "--",
            command,
        )
        assert r.returncode == 2 and "nothing was placed" in r.stderr, r.stderr
    assert not (day["state"] / "ledger.sqlite").exists()  # nothing was even opened


def test_studio_checks_its_port_and_says_the_one_it_gets(
    day: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    r = run_cli("studio", "--port", "-1", cwd=day["cwd"])
    assert r.returncode == 2 and r.stderr == "gpu-agent: --port must be 1-65535, not -1\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = _studio_port("127.0.0.1", port)
    assert (
        got != port and f"port {port} is taken on 127.0.0.1; using {got}" in capsys.readouterr().err
    )
    with pytest.raises(InvalidInput, match="--host"):
        _studio_port("no-such-host.invalid", 2024)
