"""The everyday commands stay light: `status`, `costs`, `release`, `history` and the other
ledger commands never load LangGraph, torch, networkx, pandas or matplotlib, and a request
loads no torch or networkx, whether the rules auto-approve it or the neural council votes.

Not timed: what is checked is which modules a command imports (sys.modules after it ran in a
fresh interpreter), so an import moved back to a module's top fails here, on any machine.
Start-up times are measured by benchmarks/cli_startup.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

HEAVY = ("torch", "langgraph", "networkx", "pandas", "matplotlib")

# Runs `gpu-agent <argv>` for each argv in turn, in one fresh interpreter, and writes after
# each which heavy top-level packages are loaded so far, and what it printed.
PROBE = """
import contextlib, io, json, sys
argvs, out, heavy = json.loads(sys.argv[1]), sys.argv[2], set(json.loads(sys.argv[3]))
from graph.cli import main
seen = []
for argv in argvs:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            code = main(argv)
        except SystemExit as exc:  # --help
            code = exc.code
    loaded = sorted({m.split(".")[0] for m in sys.modules} & heavy)
    seen.append({"argv": argv, "code": code, "heavy": loaded, "stdout": printed.getvalue()})
with open(out, "w") as f:
    json.dump(seen, f)
"""


def _env() -> dict[str, str]:
    """This process's environment without gpu-agent's own settings: the defaults apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GPU_AGENT_")}


def probe(
    tmp_path: Path, *argvs: list[str], heavy: tuple[str, ...] = HEAVY
) -> list[dict[str, Any]]:
    out = tmp_path / "probe.json"
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argvs), str(out), json.dumps(heavy)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    seen: list[dict[str, Any]] = json.loads(out.read_text())
    return seen


def test_ledger_commands_load_no_heavy_module(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    [placed] = probe(
        tmp_path,
        [
            "request",
            "--project",
            "vision",
            "--purpose",
            "training",
            "--count",
            "1",
            "--hours",
            "1",
            "--no-wait",
            "--json",
            *state,
        ],
        heavy=("torch", "networkx", "pandas", "matplotlib"),
    )
    assert placed["code"] == 0 and placed["heavy"] == [], placed
    light = [
        ["--help"],
        ["status", *state],
        ["status", "--json", *state],
        ["costs", *state],
        ["history", *state],
        ["audit", *state],
        ["jobs", *state],
        ["health", *state],
        ["budget", "set", "vision", "100", *state],
        ["release", _allocation(tmp_path / "state"), *state],
        ["history", "--json", *state],
    ]
    seen = probe(tmp_path, *light)
    for run in seen:
        assert run["code"] == 0, run
        assert run["heavy"] == [], f"gpu-agent {' '.join(run['argv'])} imported {run['heavy']}"


def test_a_request_the_neural_council_votes_on_loads_no_torch(tmp_path: Path) -> None:
    """Two GPUs are over the auto-approval limit: all six members vote, with their reasons,
    on the numpy forward (council/inference.py) and the weights in council.npz."""
    [voted] = probe(
        tmp_path,
        [
            "request",
            "--project",
            "vision",
            "--purpose",
            "training",
            "--count",
            "2",
            "--hours",
            "1",
            "--no-wait",
            "--json",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        heavy=("torch", "networkx", "pandas", "matplotlib"),
    )
    assert voted["code"] == 0 and voted["heavy"] == [], voted
    council = json.loads(voted["stdout"])["council"]
    assert council["policy"].startswith("cfc-council-") and len(council["votes"]) == 6


def test_the_ledger_api_imports_no_langgraph(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, graph.records, graph.status, fleet.services, "
            "graph.cli; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))",
            *HEAVY,
            "langchain_core",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _allocation(state: Path) -> str:
    """The one allocation in the ledger (read with sqlite3: this process imports no more)."""
    db = sqlite3.connect(state / "ledger.sqlite")
    try:
        [(aid,)] = db.execute("SELECT id FROM allocations").fetchall()
    finally:
        db.close()
    return str(aid)
