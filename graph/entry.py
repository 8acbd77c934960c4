"""The `gpu-agent` console script. It loads graph.cli, the command's modules (LangGraph,
pydantic, the fleet: a second or more on a busy machine), inside a handler, so that a Ctrl-C
meanwhile ends as one later does (`interrupted`, exit 130; with --json also one JSON error)
rather than with a traceback. Nothing has started then: there is nothing to resume."""

from __future__ import annotations

import sys

from graph.cli_json import error_object, json_wanted


def main() -> int:
    try:
        from graph.cli import main as command
    except KeyboardInterrupt:
        if json_wanted(sys.argv[1:]):
            print(error_object("interrupted", 130, "Interrupted"))
        print("gpu-agent: interrupted", file=sys.stderr)
        return 130
    return command()
