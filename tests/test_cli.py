"""The `gpu-agent` command: JSON shapes, exit codes, and bad input that changes nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tests.conftest import fleet_toml, run_cli


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, list[str]]:
    """One virtual hour per 3 real seconds: leases of hours outlast a few CLI start-ups
    (about 1-2.5 s each with torch), and still end within a test."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 1200}, monitor={"tick_seconds": 600}))
    return tmp_path, ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]


def ledger_rows(state: Path) -> list[str]:
    db = sqlite3.connect(state / "ledger.sqlite")
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_request_status_release_history_costs(env: tuple[Path, list[str]]) -> None:
    cwd, opts = env
    r = run_cli(
        "request",
        "--project",
        "vision",
        "--purpose",
        "model_training",
        "--count",
        "2",
        "--hours",
        "4",
        "--gpu-type",
        "A100",
        "--budget",
        "50",
        "--no-wait",
        "--json",
        "--thread-id",
        "t1",
        *opts,
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"thread_id", "status", "reason", "cost_usd", "allocation"} <= set(out)
    assert out["thread_id"] == "t1" and out["status"] == "allocated"
    alloc = out["allocation"]
    assert {
        "id",
        "gpu_ids",
        "node",
        "gpu_type",
        "cuda_visible_devices",
        "lease_end",
        "price_per_hour",
    } <= set(alloc)
    assert alloc["cuda_visible_devices"] == ",".join(alloc["gpu_ids"])

    status = json.loads(run_cli("status", "--json", *opts, cwd=cwd).stdout)
    held = [g for g in status["gpus"] if g["allocation_id"] == alloc["id"]]
    assert len(held) == 2 and all({"uuid", "type", "node", "util_pct"} <= set(g) for g in held)
    [a] = status["allocations"]
    assert a["state"] == "active" and a["thread_id"] == "t1" and a["gpu_ids"] == alloc["gpu_ids"]

    r = run_cli("release", alloc["id"], "--json", *opts, cwd=cwd)
    assert r.returncode == 0 and json.loads(r.stdout)["reason"] == "explicit"
    again = json.loads(run_cli("release", alloc["id"], "--json", *opts, cwd=cwd).stdout)
    assert again["already_released"] is True

    history = json.loads(run_cli("history", "--project", "vision", "--json", *opts, cwd=cwd).stdout)
    [record] = history["records"]
    assert record["allocation_id"] == alloc["id"] and record["reason"] == "explicit"
    assert {"thread_id", "project", "gpu_ids", "cost_usd"} <= set(record)

    costs = json.loads(run_cli("costs", "--json", *opts, cwd=cwd).stdout)
    [row] = costs["projects"]
    assert row["project"] == "vision" and row["spent_usd"] == pytest.approx(record["cost_usd"])
    assert row["budget_usd"] is None

    done = json.loads(run_cli("resume", "t1", "--json", *opts, cwd=cwd).stdout)
    assert done["status"] == "released" and done["release"]["reason"] == "explicit"


def test_foreground_request_runs_to_the_end(env: tuple[Path, list[str]]) -> None:
    cwd, opts = env
    r = run_cli(
        "request",
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "2",
        "--gpu-type",
        "A100",
        *opts,
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr
    assert "placed" in r.stdout and "lease-expired" in r.stdout and "charged $10.24" in r.stdout


def test_exit_codes(tmp_path: Path) -> None:
    """One virtual minute per real second: the 5 h lease that the last two requests queue
    behind lasts 5 real minutes, however slow the machine runs the few CLI calls before."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 60}, monitor={"tick_seconds": 600}))
    cwd, opts = tmp_path, ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]
    assert run_cli("budget", "set", "tight", "5", *opts, cwd=cwd).returncode == 0
    denied = run_cli(
        "request",
        "--project",
        "tight",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "4",
        "--json",
        *opts,
        cwd=cwd,
    )
    assert denied.returncode == 3 and json.loads(denied.stdout)["status"] == "denied"
    held = run_cli(
        "request",
        "--project",
        "a",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "5",
        "--gpu-type",
        "H100",
        "--no-wait",
        "--json",
        *opts,
        cwd=cwd,
    )
    assert json.loads(held.stdout)["status"] == "allocated"
    late = run_cli(
        "request",
        "--project",
        "b",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "1",
        "--gpu-type",
        "H100",
        "--max-wait",
        "1",
        "--json",
        *opts,
        cwd=cwd,
    )
    assert late.returncode == 4 and json.loads(late.stdout)["status"] == "timed_out"
    queued = run_cli(
        "request",
        "--project",
        "b",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "1",
        "--gpu-type",
        "H100",
        "--no-wait",
        "--json",
        *opts,
        cwd=cwd,
    )
    assert queued.returncode == 0 and json.loads(queued.stdout)["status"] == "queued"


BAD_REQUESTS = [
    ["--count", "0"],
    ["--count", "-2"],
    ["--count", "two"],
    ["--count", "999"],
    ["--gpu-type", "K80"],
    ["--hours", "nan"],
    ["--hours", "-1"],
    ["--hours", "0"],
    ["--hours", "100000"],
    ["--hours", "inf"],
    ["--budget", "nan"],
    ["--budget", "-5"],
    ["--priority", "urgent"],
    ["--purpose", "mining"],
    ["--project", "no spaces"],
    ["--min-memory-gb", "500"],
    ["--mode", "cheap"],
    ["--max-wait", "-1"],
    ["--workload", "no spaces"],
]


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=lambda b: " ".join(b))
def test_bad_requests_exit_2_and_change_nothing(
    env: tuple[Path, list[str]], bad: list[str]
) -> None:
    cwd, opts = env
    assert run_cli("budget", "set", "p", "100", *opts, cwd=cwd).returncode == 0
    before = ledger_rows(cwd / "state")
    args = {"--project": "p", "--purpose": "training", "--count": "1", "--hours": "1"}
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    flat = [x for kv in args.items() for x in kv]
    r = run_cli("request", *flat, *opts, cwd=cwd)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert ledger_rows(cwd / "state") == before


@pytest.mark.parametrize(
    "args",
    [
        ["budget", "set", "p", "nan"],
        ["budget", "set", "p", "-3"],
        ["budget", "set", "bad name", "3"],
        ["release", "a-nope"],
        ["resume", "no-such-thread"],
        ["request"],
        ["frobnicate"],
        ["health", "--clear", " "],
    ],
)
def test_other_bad_input(env: tuple[Path, list[str]], args: list[str]) -> None:
    cwd, opts = env
    assert run_cli("budget", "set", "p", "100", *opts, cwd=cwd).returncode == 0
    before = ledger_rows(cwd / "state")
    r = run_cli(*args, *(opts if args[0] not in ("request", "frobnicate") else []), cwd=cwd)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert ledger_rows(cwd / "state") == before


def test_a_budget_of_fractions_of_a_cent_is_shown_as_set(env: tuple[Path, list[str]]) -> None:
    """$0.001 used to read as $0.00, a budget of nothing, in both `budget set` and `costs`."""
    cwd, opts = env
    r = run_cli("budget", "set", "p", "0.001", *opts, cwd=cwd)
    assert r.returncode == 0 and "budget of p: $0.001;" in r.stdout
    costs = run_cli("costs", *opts, cwd=cwd)
    assert "$0.001" in costs.stdout.splitlines()[1]
    r = run_cli("budget", "set", "p", "1234.5", *opts, cwd=cwd)
    assert "budget of p: $1,234.50;" in r.stdout  # whole cents as before
    r = run_cli("budget", "set", "p", "0.8540597344292535", *opts, cwd=cwd)
    assert "budget of p: $0.85406;" in r.stdout  # to the micro-dollar
    r = run_cli("budget", "set", "p", "1e-300", *opts, cwd=cwd)
    assert "budget of p: $1e-300;" in r.stdout  # not hundreds of zeros


def test_missing_and_corrupt_state_dirs(tmp_path: Path) -> None:
    missing = run_cli("status", "--state-dir", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "file").write_text("x")
    not_dir = run_cli("status", "--state-dir", str(tmp_path / "file"), cwd=tmp_path)
    assert not_dir.returncode == 2 and "not a directory" in not_dir.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ledger.sqlite").write_bytes(b"garbage" * 1000)
    r = run_cli("status", "--state-dir", str(corrupt), cwd=tmp_path)
    assert r.returncode == 2 and "move it aside" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(
        "request",
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--state-dir",
        str(corrupt),
        cwd=tmp_path,
    )
    assert r.returncode == 2 and (corrupt / "ledger.sqlite").read_bytes() == b"garbage" * 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("history", "--state-dir", str(empty), cwd=tmp_path)
    assert r.returncode == 2 and "no ledger" in r.stderr


def test_json_is_the_cli_s_only_before_a_double_dash_and_a_closed_pipe_is_no_traceback(
    tmp_path: Path,
) -> None:
    """`--json` after `--` is `run`'s command's, so the error is text; a reader that leaves
    the pipe early ends the command with 141 (as SIGPIPE would), never a traceback."""
    state = ["--state-dir", str(tmp_path / "s")]
    nan_hours = "--project p --count 1 --hours nan -- echo --json"
    theirs = run_cli("run", *state, *nan_hours.split(), cwd=tmp_path)
    assert theirs.returncode == 2 and theirs.stdout == ""
    assert theirs.stderr.count("\n") == 1 and "finite number" in theirs.stderr
    one_gpu = "--project p --purpose training --count 1 --hours 1 --no-wait"
    made = run_cli("request", *state, *one_gpu.split(), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    for args in (["status", *state], ["costs", *state, "--json"]):
        read, write = os.pipe()
        os.close(read)  # the reader has left
        try:
            done = subprocess.run(
                [sys.executable, "-m", "graph.cli", *args],
                cwd=tmp_path,
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        finally:
            os.close(write)
        assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr


def test_malformed_fleet_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[nodes]]\nname = 3\n")
    r = run_cli(
        "request",
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--fleet",
        str(bad),
        "--state-dir",
        str(tmp_path / "s"),
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.startswith("gpu-agent: fleet file")
    assert not (tmp_path / "s").exists()


def test_demo(tmp_path: Path) -> None:
    r = run_cli("demo", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["outcomes"]
    reasons = {k: (v["release"] or {}).get("reason") for k, v in out.items()}
    assert reasons["sandbox-notebook"] == "idle"
    assert reasons["ads-serving"] == "budget"
    assert out["sandbox-bigrun"]["status"] == "denied"
    assert (
        out["nlp-train"]["allocation"]["started_at"]
        < out["vision-finetune"]["allocation"]["started_at"]
    )  # queued later, went first
    assert any(e["kind"] == "queued" for e in out["vision-finetune"]["events"])


@pytest.mark.parametrize("fleet", ["missing.toml", "bad.toml"])
def test_demo_refuses_a_fleet_it_cannot_load_in_one_line(tmp_path: Path, fleet: str) -> None:
    """Refused before its header (which would name a state directory that never comes to be)."""
    (tmp_path / "bad.toml").write_text("[[nodes]]\nname = 3\n")
    for extra in ([], ["--state-dir", str(tmp_path / "s")]):
        r = run_cli("demo", "--fleet", str(tmp_path / fleet), *extra, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "", r.stdout
        assert r.stderr.startswith("gpu-agent: fleet file") and r.stderr.count("\n") == 1
        assert not (tmp_path / "s").exists()


def test_demo_tells_its_story_once_in_a_state_directory(tmp_path: Path) -> None:
    """Told again in the same state directory, its threads' names would meet the first
    story's (every request refused, budgets set again, exit 0): refused up front, nothing
    changed. Its header names the fleet it runs on; it offers no backend (it simulates)."""
    state = tmp_path / "s"
    fleet = tmp_path / "f.toml"
    fleet.write_text(resources.files("fleet").joinpath("data", "default_fleet.toml").read_text())
    told = run_cli("demo", "--state-dir", str(state), "--fleet", str(fleet), cwd=tmp_path)
    assert told.returncode == 0, told.stderr
    assert told.stdout.startswith(f"gpu-agent demo: one virtual day on fleet file {fleet} ")
    before = sorted((p, p.stat().st_mtime_ns) for p in state.rglob("*"))
    again = run_cli("demo", "--state-dir", str(state), "--json", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == (
        f"gpu-agent: --state-dir {state} is not empty: the demo tells its story in a new "
        "state directory (or, without --state-dir, in a temporary one)\n"
    )
    assert json.loads(again.stdout)["type"] == "InvalidInput"
    assert sorted((p, p.stat().st_mtime_ns) for p in state.rglob("*")) == before
    other = run_cli("demo", "--backend", "nvml", cwd=tmp_path)
    assert other.returncode == 2 and "unrecognized arguments: --backend nvml" in other.stderr


def test_human_review_through_the_cli(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            clock={"time_scale": 3600},
            monitor={"tick_seconds": 600},
            council={"policy": "reference", "approve_threshold": 0.99, "auto_approve_max_gpus": 0},
        )
    )
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]
    ask = [
        "request",
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "2",
        "--hours",
        "1",
        "--json",
        *opts,
    ]
    first = run_cli(*ask, "--thread-id", "yes", cwd=tmp_path)
    assert first.returncode == 0 and json.loads(first.stdout)["status"] == "pending_review"
    assert json.loads(first.stdout)["next"] == ["review"]
    approved = run_cli("resume", "yes", "--approve", "--by", "ana", "--json", *opts, cwd=tmp_path)
    out = json.loads(approved.stdout)
    assert approved.returncode == 0 and out["status"] == "released"
    assert any(
        e["kind"] == "human_decision" and "ana approved" in e["message"] for e in out["events"]
    )
    run_cli(*ask, "--thread-id", "no", cwd=tmp_path)
    denied = run_cli(
        "resume", "no", "--deny", "--comment", "not now", "--json", *opts, cwd=tmp_path
    )
    assert denied.returncode == 3 and json.loads(denied.stdout)["status"] == "denied"
    again = run_cli("resume", "no", "--approve", *opts, cwd=tmp_path)
    assert again.returncode == 2 and "already decided: deny by cli" in again.stderr


def test_the_demos_lines_of_one_instant_follow_cause_and_effect() -> None:
    """Threads report at one virtual instant in whatever order the machine runs them (on a
    busy machine a woken request's placement could print before the release that woke it):
    the demo orders them as cause and effect, whatever order they arrived in."""
    from graph.demo import _rank

    arrived = [
        ("nlp-train", "placed: 8 x H100 on h100-0"),
        ("vision-pretrain", "released: after 3.00 h (lease-expired)"),
        ("vision-pretrain", "idle: every GPU under 5% for 30 min"),
        ("finance", "sets ads's budget to $4.00"),
        ("sandbox", "asks for 2 GPU(s) for research, 4 h"),
    ]
    ordered = sorted((_rank(what), who, i, what) for i, (who, what) in enumerate(arrived))
    assert [what.split()[0] for *_, what in ordered] == [
        "asks",
        "sets",
        "idle:",
        "released:",
        "placed:",
    ]


def test_a_state_dir_is_opened_only_at_the_time_scale_it_ran_at(tmp_path: Path) -> None:
    """A 100-hour lease placed at one clock speed; every command at another is refused in one
    line (JSON with --json, exit 2) naming both, and changes nothing: read at the wrong speed
    the lease would be released as expired-while-down (or held years too long)."""
    wall, fast = tmp_path / "wall.toml", tmp_path / "fast.toml"
    wall.write_text(fleet_toml())
    fast.write_text(fleet_toml(clock={"time_scale": 1200}))
    cases = [
        (fast, wall, "ran at time_scale 1200, not at time_scale 1 (the wall clock)"),
        (wall, fast, "ran at time_scale 1 (the wall clock), not at time_scale 1200"),
    ]
    for ran, other, says in cases:
        state = tmp_path / ran.stem
        opts = ["--state-dir", str(state)]
        hold = ["--project", "p", "--purpose", "training", "--count", "1", "--hours", "100"]
        hold += ["--no-wait", "--json"]
        r = run_cli("request", *hold, *opts, "--fleet", str(ran), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        aid = json.loads(r.stdout)["allocation"]["id"]
        before = ledger_rows(state), (state / "clock.json").exists()
        r = run_cli("status", "--json", *opts, "--fleet", str(other), cwd=tmp_path)
        assert r.returncode == 2 and says in json.loads(r.stdout)["error"], r.stdout + r.stderr
        r = run_cli("release", aid, *opts, "--fleet", str(other), cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr
        assert (ledger_rows(state), (state / "clock.json").exists()) == before
        r = run_cli("status", "--json", *opts, "--fleet", str(ran), cwd=tmp_path)
        [alloc] = json.loads(r.stdout)["allocations"]
        assert alloc["state"] == "active"
