"""Readable progress on the graph's `custom` stream: one dict per line a user would want live.

`graph.stream(..., stream_mode=["updates", "custom"])` yields them as ("custom", {"node", "text",
...}); the CLI shows them, the simulator's engine and plain `invoke` drop them (the runtime's
default writer does nothing).
"""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime

from fleet.models import CouncilDecision
from nodes.context import Context

_SILENT = Runtime().stream_writer  # the writer a run without a "custom" stream has


def streaming(runtime: Runtime[Context]) -> bool:
    """Whether anyone listens: the simulator's engine and plain `invoke` do not, so the text
    of a line (one per monitor tick) is not even built for them."""
    return runtime.stream_writer is not _SILENT


def report(runtime: Runtime[Context], node: str, text: str, **data: Any) -> None:
    runtime.stream_writer({"node": node, "text": text} | data)


def votes(decision: CouncilDecision) -> list[dict[str, Any]]:
    return [
        {"member": v.member, "verdict": v.verdict.value, "probability": round(v.probability, 3)}
        for v in decision.votes
    ]
