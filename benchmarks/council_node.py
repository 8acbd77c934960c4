"""The council node alone: what it costs a request, with no graph and no commit around it.

    PYTHONPATH=CHECKOUT .venv/bin/python CHECKOUT/benchmarks/council_node.py [--requests 300]

It sends 200 of benchmarks/graph_latency.py's requests through the graph (each released at
once, so that every project has a record of 32 events and older history, as in that
benchmark), then calls the council node itself on the next requests with the same runtime
context, timed. Every member votes (2 GPUs). Run it from two checkouts in turn, each with
PYTHONPATH at its own root, to compare them: the graph and its commits, the part of
graph_latency.py's figure that swings most on a busy disk, are left out.

The last line holds the figure: council_node_p50_ms.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# this file's folder holds council.py: the repository root goes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langgraph.runtime import Runtime

from fleet.clock import VirtualClock
from fleet.models import GPURequest, ReleaseReason
from graph.orchestrator import Orchestrator
from nodes.context import Context
from nodes.council import council
from nodes.state import State

ROOT = Path(__file__).resolve().parents[1]


def graph_latency() -> Any:
    """benchmarks/graph_latency.py as a module: its fleet and requests."""
    spec = importlib.util.spec_from_file_location(
        "graph_latency", ROOT / "benchmarks" / "graph_latency.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    bench = graph_latency()
    with tempfile.TemporaryDirectory(prefix="gpu-agent-bench-") as tmp:
        orch = Orchestrator(Path(tmp) / "agent", bench.fleet(), clock=VirtualClock())
        svc = orch.services
        for i in range(200):
            out = orch.request(bench.request(i), thread_id=uuid.uuid4().hex, wait=False)
            assert out.allocation is not None, out.reason
            svc.ledger.release(out.allocation.id, ReleaseReason.EXPLICIT, svc.clock.now())
        runtime: Runtime[Context] = Runtime(context=orch.context)
        spent = []
        for i in range(args.requests):
            state: State = {
                "request": GPURequest.model_validate(bench.request(i)),
                "thread_id": f"node-{i}",
            }
            t0 = time.perf_counter()
            update = council(state, runtime)
            spent.append((time.perf_counter() - t0) * 1000)
            decided = update.get("council")
            assert decided is not None and "status" not in update, update
        orch.close()
    print(f"council node alone, {args.requests} requests, every member voting")
    print(f"council_node_p50_ms={statistics.median(spent):.3f}")


if __name__ == "__main__":
    main()
