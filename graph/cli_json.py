"""What `--json` means for an error, where even the console script's first moments read it
(graph.entry, before the command's modules load): so this module imports nothing heavy."""

from __future__ import annotations

import json


def json_wanted(argv: list[str]) -> bool:
    """Whether the command line asks for JSON: `--json` among gpu-agent's own arguments, not
    after `--` (`run`'s command's)."""
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def error_object(message: str, code: int, kind: str) -> str:
    """An error as one JSON object, what `--json` prints on stdout (scripts read only it)."""
    return json.dumps({"error": message, "exit_code": code, "type": kind})
