"""The `gpu-agent` command.

Exit codes: 0 done (or queued / pending review), 2 invalid input (one line on stderr and,
with --json, {"error": ...} on stdout; nothing changed), 3 denied (council, budget or quota),
4 not placed within --max-wait, 5 not allowed (the caller's token is for another project or
role), 127 a command `run` placed GPUs for could not start, 141 its output closed early (a
pipe whose reader left, as a shell reports a process SIGPIPE ended).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence

from fleet.errors import GPUAgentError, RunStopped, flat
from graph.cli_json import json_wanted
from graph.cli_ledger import (
    cmd_audit,
    cmd_budget,
    cmd_costs,
    cmd_health,
    cmd_history,
    cmd_preempt,
    cmd_release,
    cmd_status,
    cmd_token,
)
from graph.cli_offline import cmd_analyze, cmd_council, cmd_demo, cmd_nvml, cmd_simulate
from graph.cli_parser import Parser, build_parser, error_json
from graph.cli_requests import cmd_jobs, cmd_request, cmd_resume, cmd_reviews, cmd_run, cmd_submit
from graph.cli_servers import cmd_serve_metrics, cmd_studio, cmd_ui, cmd_worker

# Only light modules above: each handler lives with the others of its kind, in a module
# that imports only light modules at its top (graph/cli_common.py says why), so importing
# them all for COMMANDS loads no LangGraph, torch or networkx.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "request": cmd_request,
    "status": cmd_status,
    "release": cmd_release,
    "preempt": cmd_preempt,
    "resume": cmd_resume,
    "history": cmd_history,
    "costs": cmd_costs,
    "budget": cmd_budget,
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "analyze": cmd_analyze,
    "council": cmd_council,
    "serve-metrics": cmd_serve_metrics,
    "run": cmd_run,
    "health": cmd_health,
    "nvml": cmd_nvml,
    "studio": cmd_studio,
    "submit": cmd_submit,
    "worker": cmd_worker,
    "jobs": cmd_jobs,
    "audit": cmd_audit,
    "token": cmd_token,
    "ui": cmd_ui,
    "reviews": cmd_reviews,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # stdout closed early: what is left to print goes nowhere, also
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # at exit
        return 141


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    Parser.json_errors = json_wanted(argv)
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except GPUAgentError as exc:
        error_json(str(exc), exc.exit_code, type(exc).__name__, Parser.json_errors)
        print(f"gpu-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except sqlite3.DatabaseError as exc:
        message = (
            f"the state directory is damaged ({exc}); move it aside and start afresh, "
            "or restore it from a backup"
        )
        error_json(message, 2, "StateDirError", Parser.json_errors)
        print(f"gpu-agent: {flat(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        thread = getattr(exc, "thread_id", None)  # RunStopped's: the run's thread
        message = (
            f"interrupted; the thread is checkpointed: `gpu-agent resume {thread}` carries it on"
            if thread
            else f"interrupted; {exc}"  # a request stopped before anything of it was kept
            if isinstance(exc, RunStopped)
            else "interrupted"  # before a thread was named, or outside one
        )
        error_json(message, 130, "Interrupted", Parser.json_errors)
        print(f"gpu-agent: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
