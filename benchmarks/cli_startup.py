"""Start-up of the everyday `gpu-agent` commands, each run as a new process, as a user runs it.

    .venv/bin/python benchmarks/cli_startup.py [--runs 5] [--state-dir DIR]

Runs `--help`, `status`, `costs`, `release <id>`, `history` and two placed `request --no-wait`
(one GPU, which the rules auto-approve, and two, which the neural council votes on) `--runs`
times each (interleaved, so a busy moment hits every command alike) against a scratch
state directory on the default simulated fleet, and prints the median, min and max wall
seconds of each against its goal: 0.5 s for the commands that only read or write the ledger,
2 s for a request (which runs the graph, so LangGraph is loaded). Each `release` gets a fresh
allocation placed before it, and each timed request's allocation is released after it, both
untimed. `python -c pass` is shown as the floor. Then, for each command run once more in a
fresh interpreter, which heavy modules (torch, langgraph, networkx, pandas, matplotlib) it
imported: the ledger commands should import none.

Environment variables GPU_AGENT_* are ignored (the defaults apply), so the figures do not
depend on the caller's shell. Exit status 1 if a command failed (not if it was slow).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HEAVY = ("torch", "langgraph", "networkx", "pandas", "matplotlib")
LIGHT_GOAL_S, REQUEST_GOAL_S = 0.5, 2.0
Timed = tuple[float, subprocess.CompletedProcess[str]]  # wall seconds, and what it did


def request_argv(count: int) -> list[str]:
    return [
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        str(count),
        "--hours",
        "1",
        "--no-wait",
        "--json",
    ]


REQUEST = request_argv(1)  # one GPU, one hour: the rules auto-approve it, no member votes
VOTED = request_argv(2)  # over auto_approve_max_gpus (1): the neural council votes

# What a command imported: runs graph.cli's main in this fresh interpreter, then lists the
# heavy top-level packages in sys.modules (on stderr's last line, after the command's output).
PROBE = """
import json, sys
from graph.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
heavy = set(json.loads(sys.argv[1]))
print("HEAVY " + json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)),
      file=sys.stderr)
"""


class Bench:
    def __init__(self, state_dir: Path) -> None:
        self.python = sys.executable
        script = Path(sys.executable).with_name("gpu-agent")  # the console script users run
        self.command = [str(script)] if script.exists() else [self.python, "-m", "graph.cli"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_AGENT_")}
        self.env["GPU_AGENT_HOME"] = str(state_dir)
        self.cwd = state_dir.parent
        self.cwd.mkdir(parents=True, exist_ok=True)

    def run(self, argv: list[str]) -> Timed:
        start = time.perf_counter()
        done = subprocess.run(
            [*self.command, *argv],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return time.perf_counter() - start, done

    def floor(self) -> float:
        start = time.perf_counter()
        subprocess.run([self.python, "-c", "pass"], env=self.env, check=True)
        return time.perf_counter() - start

    def place(self) -> str:
        """A fresh allocation (untimed): its id."""
        _, done = self.run(REQUEST)
        return self.placed(done)

    @staticmethod
    def placed(done: subprocess.CompletedProcess[str], voted: bool = False) -> str:
        """The placed allocation's id; with `voted`, the council's members must have voted."""
        if done.returncode != 0:
            raise RuntimeError(f"request failed ({done.returncode}): {done.stderr.strip()}")
        out = json.loads(done.stdout)
        if out["status"] != "allocated":
            raise RuntimeError(f"request not placed: {out['status']} ({out['reason']})")
        if voted and not out["council"]["votes"]:
            raise RuntimeError(f"the council did not vote: {out['council']['summary']}")
        return str(out["allocation"]["id"])

    def heavy(self, argv: list[str]) -> list[str]:
        done = subprocess.run(
            [self.python, "-c", PROBE, json.dumps(HEAVY), *argv],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        if not last.startswith("HEAVY "):
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
        found: list[str] = json.loads(last.removeprefix("HEAVY "))
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (5)")
    parser.add_argument(
        "--state-dir", help="a scratch state directory to create (default: a new temporary one)"
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        state = Path(args.state_dir) if args.state_dir else Path(tmp) / "state"
        if state.exists() and any(state.iterdir()):
            parser.error(f"{state} is not empty: give a new directory")
        return bench(Bench(state), args.runs)


def bench(b: Bench, runs: int) -> int:
    b.run(["release", b.place()])  # the state directory, with a finished allocation for
    b.place()  # history and a live one for status

    def request(argv: list[str]) -> Timed:
        took, done = b.run(argv)
        aid = b.placed(done, voted=argv is VOTED)
        b.run(["release", aid])  # untimed: the fleet never fills up
        return took, done

    def release() -> Timed:
        return b.run(["release", b.place()])  # the placement before it is untimed

    commands: dict[str, tuple[float, Callable[[], Timed]]] = {
        "--help": (LIGHT_GOAL_S, lambda: b.run(["--help"])),
        "status": (LIGHT_GOAL_S, lambda: b.run(["status"])),
        "costs": (LIGHT_GOAL_S, lambda: b.run(["costs"])),
        "release <id>": (LIGHT_GOAL_S, release),
        "history": (LIGHT_GOAL_S, lambda: b.run(["history"])),
        "request --no-wait": (REQUEST_GOAL_S, lambda: request(REQUEST)),
        "request --count 2": (REQUEST_GOAL_S, lambda: request(VOTED)),
    }
    times: dict[str, list[float]] = {name: [] for name in ["python -c pass", *commands]}
    failed = []
    for _ in range(runs):  # interleaved: a busy moment slows every command alike
        times["python -c pass"].append(b.floor())
        for name, (_, fn) in commands.items():
            took, done = fn()
            times[name].append(took)
            if done.returncode != 0:
                failed.append(f"{name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")

    print(
        f"gpu-agent start-up, {runs} run(s) each, new process per run "
        f"({' '.join(b.command)}; {os.cpu_count()} CPUs)"
    )
    print(f"{'command':<20}{'median s':>10}{'min s':>8}{'max s':>8}{'goal s':>8}  meets")
    for name, secs in times.items():
        goal = commands[name][0] if name in commands else None
        verdict = "-" if goal is None else ("yes" if statistics.median(secs) < goal else "NO")
        print(
            f"{name:<20}{statistics.median(secs):>10.3f}{min(secs):>8.3f}{max(secs):>8.3f}"
            f"{'' if goal is None else f'{goal:.1f}':>8}  {verdict}"
        )

    print("\nheavy modules imported (of " + ", ".join(HEAVY) + "):")
    aid = b.place()
    probes = {
        "--help": ["--help"],
        "status": ["status"],
        "costs": ["costs"],
        "release <id>": ["release", aid],
        "history": ["history"],
        "request --no-wait": REQUEST,
        "request --count 2": VOTED,
    }
    for name, argv in probes.items():
        found = b.heavy(argv)
        print(f"  {name:<20}{', '.join(found) or 'none'}")
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
