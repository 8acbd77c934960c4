"""What a new user following the README met at the command line: a GPU another project holds
in `status`, `budget set` refusals that say only what is true, the audit of a first budget,
and a lease its budget ends sooner than the lease says."""

from __future__ import annotations

import importlib.abc
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import RunStopped
from graph import cli as cli_main
from graph import entry
from tests.conftest import add_token, fleet_toml, run_cli
from tests.test_cli_daily import COUNCIL  # a request of one GPU needs no human


@pytest.fixture
def two(tmp_path: Path) -> dict[str, Any]:
    """Tokens: root (admin), alice (member of vision), bob (member of nlp); bob holds one
    A100 (on the wall clock: its lease outlasts the test)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council=COUNCIL))
    state = ["--state-dir", str(tmp_path / "s")]
    root = add_token(tmp_path, tmp_path / "s", "root", "admin", None, None)
    tokens = {
        "root": root,
        "alice": add_token(tmp_path, tmp_path / "s", "alice", "member", "vision", root),
        "bob": add_token(tmp_path, tmp_path / "s", "bob", "member", "nlp", root),
    }
    day = {"cwd": tmp_path, "opts": [*state, "--fleet", str(fleet)], "tokens": tokens}
    r = cli(day, "bob", "request", "--purpose", "training", "--count", "1", "--hours", "4")
    day["held"] = json.loads(r.stdout)["allocation"]["id"]
    return day


def cli(day: dict[str, Any], who: str, *args: str) -> Any:
    """The command as `who`; a request returns once placed (--no-wait), as JSON."""
    extra = ["--no-wait", "--json"] if args[0] == "request" else []
    return run_cli(
        *args, *extra, *day["opts"], cwd=day["cwd"], env={"GPU_AGENT_TOKEN": day["tokens"][who]}
    )


def holder(status: str, aid_or_project: str) -> list[str]:
    """The holder column of the GPU rows that name it."""
    return [line.split()[3] for line in status.splitlines() if aid_or_project in line.split()]


def test_a_gpu_another_project_holds_shows_that_project(two: dict[str, Any]) -> None:
    """docs/projects.md: GPUs held by other projects show as held, without the allocation."""
    aid = two["held"]
    theirs = cli(two, "bob", "status").stdout
    assert holder(theirs, f"nlp/{aid}") == [f"nlp/{aid}"]
    mine = cli(two, "alice", "status")
    assert mine.returncode == 0, mine.stderr
    assert holder(mine.stdout, "nlp") == ["nlp"] and aid not in mine.stdout
    gpus = json.loads(cli(two, "alice", "status", "--json").stdout)["gpus"]
    assert [(g["project"], g["allocation_id"]) for g in gpus if g["project"]] == [("nlp", None)]
    assert cli(two, "bob", "release", aid).returncode == 0


def amounts(line: str) -> list[float]:
    return [float(a.replace(",", "")) for a in re.findall(r"\$([\d,]+\.\d+)", line)]


def test_a_budget_below_the_spend_is_refused_with_what_is_true(two: dict[str, Any]) -> None:
    """Running: what it accrued, which its allocation adds to until released. Released:
    what it spent, and no release to ask for (a release never lowers what was charged); the
    two amounts never read alike when the budget asked is below the spend."""
    running = cli(two, "root", "budget", "set", "nlp", "0")
    assert running.returncode == 2 and running.stderr.count("\n") == 1, running.stderr
    assert "already spent or accrued ($" in running.stderr
    assert "its running allocation adds to it until released" in running.stderr
    assert cli(two, "bob", "release", two["held"]).returncode == 0
    costs = json.loads(cli(two, "root", "costs", "--json").stdout)["projects"]
    [cost] = [c["spent_usd"] for c in costs if c["project"] == "nlp"]
    assert 0.0002 < cost < 1  # seconds of one A100
    for asked in (0.0, cost - 0.0001):
        done = cli(two, "root", "budget", "set", "nlp", f"{asked:.10f}")
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "already spent ($" in done.stderr and "release" not in done.stderr
        budget, spent = amounts(done.stderr)
        assert budget < spent, done.stderr  # at cents the second read "$0.00 ... ($0.00)"


def test_the_audit_of_a_first_budget_says_there_was_none(tmp_path: Path) -> None:
    opts = ["--state-dir", str(tmp_path / "s")]
    for usd in ("500", "600"):
        assert run_cli("budget", "set", "sandbox", usd, *opts, cwd=tmp_path).returncode == 0
    audit = run_cli("audit", *opts, cwd=tmp_path).stdout.splitlines()
    assert [line.split("by local: ")[1] for line in audit] == [
        "no budget -> $500.00; 0 deadline(s) moved",
        "$500.00 -> $600.00; 0 deadline(s) moved",
    ]


def test_a_lease_its_budget_cuts_short_says_when_the_budget_runs_out(tmp_path: Path) -> None:
    """A request admitted on its expected cost (the project once released soon after it
    started) whose budget runs out before its lease ends: the CLI says when, in its text,
    its JSON (`allocation.budget_end`, `status`'s deadline) and the placed event; where the
    budget covers the lease, `budget_end` is null."""
    opts = ["--state-dir", str(tmp_path / "s")]  # the default fleet: 16 A100s at $5.12
    ask = ["request", "--project", "p", "--purpose", "training", "--gpu-type", "A100"]
    ask += ["--count", "16", "--hours", "24", "--priority", "critical", "--no-wait", *opts]
    first = json.loads(run_cli(*ask, "--json", cwd=tmp_path).stdout)
    assert first["allocation"]["budget_end"] is None  # no budget
    assert run_cli("release", first["allocation"]["id"], *opts, cwd=tmp_path).returncode == 0
    assert run_cli("budget", "set", "p", "500", *opts, cwd=tmp_path).returncode == 0
    cut = json.loads(run_cli(*ask, "--json", cwd=tmp_path).stdout)
    held, ends = cut["allocation"], cut["allocation"]["budget_end"]
    assert ends is not None and ends < held["lease_end"]
    status = json.loads(run_cli("status", "--json", *opts, cwd=tmp_path).stdout)
    (live,) = [a for a in status["allocations"] if a["state"] == "active"]
    assert (live["deadline"], live["deadline_reason"], live["term_hours"]) == (ends, "budget", None)
    shown = run_cli("status", *opts, cwd=tmp_path).stdout
    assert f"until {ends} (budget)" in shown
    (placed,) = [e["message"] for e in cut["events"] if e["kind"] == "placed"]
    assert placed.endswith(f"; its project's budget runs out at {ends[:10]} {ends[11:16]} UTC")
    assert run_cli("release", held["id"], *opts, cwd=tmp_path).returncode == 0
    text = run_cli(*ask, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    said = re.search(r"its project's budget runs out at \S+ \S+ UTC, ([\d.]+) h in", text.stdout)
    assert said is not None, text.stdout
    assert float(said[1]) == pytest.approx(500 / (16 * 5.12), abs=0.05)  # $500 at $81.92/h


@pytest.mark.parametrize(
    ("stopped", "said"),
    [
        (RunStopped("thread t1 interrupted", "t1"), "the thread is checkpointed: `gpu-agent "
         "resume t1` carries it on"),
        (RunStopped("nothing of the request was kept: ask again"), "nothing of the request was "
         "kept: ask again"),
        (KeyboardInterrupt(), "interrupted"),
    ],
)  # fmt: skip
def test_ctrl_c_names_a_thread_to_resume_only_where_one_was_kept(
    stopped: KeyboardInterrupt,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 130 and one line (a JSON error of type Interrupted with --json) that names a
    thread to resume only where the run kept one (RunStopped's thread)."""

    def interrupted(args: object) -> int:
        raise stopped

    monkeypatch.setitem(cli_main.COMMANDS, "costs", interrupted)
    assert cli_main.main(["costs"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [f"gpu-agent: interrupted; {said}".removesuffix("; interrupted")]
    assert ("checkpointed" in err) == (getattr(stopped, "thread_id", None) is not None)
    assert cli_main.main(["costs", "--json"]) == 130
    error = json.loads(capsys.readouterr().out)
    assert error["type"] == "Interrupted" and error["exit_code"] == 130
    assert said in error["error"]


class _Interrupting(importlib.abc.MetaPathFinder):
    """A Ctrl-C while graph.cli loads."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "graph.cli":
            raise KeyboardInterrupt


@pytest.mark.parametrize("json_wanted", [False, True])
def test_ctrl_c_while_the_command_loads_is_one_line_not_a_traceback(
    json_wanted: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console script loads the command's modules inside its handler: a Ctrl-C then is
    `interrupted`, exit 130 (a JSON error with --json), where it was a traceback."""
    monkeypatch.delitem(sys.modules, "graph.cli")
    monkeypatch.setattr(sys, "meta_path", [_Interrupting(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["gpu-agent", "status", *(["--json"] * json_wanted)])
    assert entry.main() == 130
    out, err = capsys.readouterr()
    assert err == "gpu-agent: interrupted\n"
    assert (json.loads(out)["type"] if json_wanted else out) == (
        "Interrupted" if json_wanted else ""
    )
