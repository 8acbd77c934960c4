"""Latency of a request through validate -> council -> route -> allocate, against a floor.

The floor is a bare LangGraph graph with the same number of trivial nodes, the same SQLite
checkpointer (WAL, same serializer) and durability "sync" on every step. Ours runs as the
Orchestrator runs it: the pure nodes (validate, council, route) with durability "exit", then
allocate with "sync" (see graph/orchestrator.py, Orchestrator._invoke, for why). A third
graph, ours with nodes that replay recorded updates, measures the cost of our graph's shape.
All three run in this process, interleaved, so the ratios are what count. A stopwatch inside
each node and around what ours does outside the graph that the shape's run does not (giving
the allocation's monitor up), and the same work repeated outside the graph by kind (ledger
reads, placement, council, routing), account for the difference.

    .venv/bin/python benchmarks/graph_latency.py [--requests 300]

The last line holds the figures: p50_ms p99_ms rps floor_p50_ms ratio.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from council.features import build_features
from council.voting import convene
from fleet import thread_claims
from fleet.clock import VirtualClock
from fleet.config import FleetConfig, load_fleet
from fleet.models import GPURequest, ReleaseReason, RouteDecision, Status
from fleet.routing import route as choose_route
from fleet.validation import check_against_fleet, refusal
from graph.builder import build_graph
from graph.checkpoint import open_sqlite_saver
from graph.orchestrator import DURABILITY, Orchestrator
from nodes.context import council_of
from nodes.state import InputState, State
from nodes.wiring import NODES as GRAPH_NODES

NODES = ["validate", "council", "route", "allocate"]


class Bare(TypedDict, total=False):
    request: dict[str, Any]
    n: int


def _step(state: Bare) -> dict[str, Any]:
    return {"n": state.get("n", 0) + 1}


def bare_graph(state_dir: Path) -> Any:
    builder = StateGraph(Bare)
    for name in NODES:
        builder.add_node(name, _step)
    builder.add_edge(START, NODES[0])
    for a, b in itertools.pairwise(NODES):
        builder.add_edge(a, b)
    builder.add_edge(NODES[-1], END)
    state_dir.mkdir()
    return builder.compile(checkpointer=open_sqlite_saver(state_dir))


POLICY = ["neural"]  # the council policy, set from --policy


def fleet() -> FleetConfig:
    config = load_fleet()
    return config.model_copy(
        update={"council": config.council.model_copy(update={"policy": POLICY[0]})}
    )


def shape_orchestrator(state_dir: Path, recorded: dict[str, dict[str, Any]]) -> Orchestrator:
    """Our graph, state and two-part run, but each node returns a recorded update at once:
    what remains is the cost of the graph's shape (branches, typed state, the two parts)."""
    orch = Orchestrator(state_dir, fleet(), clock=VirtualClock())

    def replay(name: str) -> Callable[..., State]:
        return lambda state, runtime: cast(State, dict(recorded[name]))

    orch.graph = build_graph(orch.checkpointer, replace={n: replay(n) for n in recorded})
    return orch


# What Orchestrator.request does around the graph that the shape's run does not, timed
OUTSIDE = {"monitor": "giving the allocation's monitor up (a commit)"}


def stopwatch(spent: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, timed into `spent`; with its signature, which LangGraph reads (a node that takes
    `runtime` is given it)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append((time.perf_counter() - t0) * 1000)

    return run


def timed_orchestrator(state_dir: Path) -> tuple[Orchestrator, dict[str, list[float]]]:
    """The real graph, with a stopwatch around each of its first four nodes and around what
    the Orchestrator does outside the graph that the shape's run does not (OUTSIDE)."""
    orch = Orchestrator(state_dir, fleet(), clock=VirtualClock())
    spent: dict[str, list[float]] = {name: [] for name in [*NODES, *OUTSIDE]}
    replace = {name: stopwatch(spent[name], GRAPH_NODES[name]) for name in NODES}
    orch.graph = build_graph(orch.checkpointer, replace=replace)
    svc = orch.services
    svc.unwatch_thread = stopwatch(spent["monitor"], svc.unwatch_thread)  # type: ignore[method-assign]
    return orch, spent


def record_updates(orch: Orchestrator) -> dict[str, dict[str, Any]]:
    recorded: dict[str, dict[str, Any]] = {}

    def keep(node: str, update: dict[str, Any]) -> None:
        recorded[node] = update

    orch._invoke(
        InputState(request=GPURequest.model_validate(request(-1))),
        "recording",
        wait=False,
        pure_first=True,
        on_update=keep,
    )
    return recorded


def request(i: int) -> dict[str, Any]:
    # Two GPUs: past the council's auto-approval, so every member votes.
    return {
        "project": f"team-{i % 4}",
        "purpose": "training",
        "count": 2,
        "duration_hours": 1.0,
        "request_id": f"r{i}",
    }


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(n: int, warmup: int) -> dict[str, float]:
    tmp = tempfile.TemporaryDirectory(prefix="gpu-agent-bench-")
    base = Path(tmp.name)
    orch, spent = timed_orchestrator(base / "agent")
    floor = bare_graph(base / "floor")
    shape = shape_orchestrator(base / "shape", record_updates(orch))
    ours: list[float] = []
    bare: list[float] = []
    shaped: list[float] = []
    for i in range(warmup + n):
        thread = uuid.uuid4().hex
        t0 = time.perf_counter()
        out = orch.request(request(i), thread_id=thread, wait=False)
        t1 = time.perf_counter()
        assert out.status is Status.ALLOCATED and out.allocation is not None, out.reason
        orch.services.ledger.release(
            out.allocation.id, ReleaseReason.EXPLICIT, orch.services.clock.now()
        )  # untimed: free the GPUs
        config = {"configurable": {"thread_id": thread}}
        t2 = time.perf_counter()
        floor.invoke({"request": request(i)}, config, durability=DURABILITY)
        t3 = time.perf_counter()
        shape.request(request(i), thread_id=thread, wait=False)
        t4 = time.perf_counter()
        if i >= warmup:
            ours.append((t1 - t0) * 1000)
            bare.append((t3 - t2) * 1000)
            shaped.append((t4 - t3) * 1000)
    per_node = {name: statistics.median(v[-n:]) for name, v in spent.items()}
    parts = component_costs(orch, n)
    orch.close()
    shape.close()
    floor.checkpointer.conn.close()
    tmp.cleanup()
    return {
        "p50_ms": statistics.median(ours),
        "p99_ms": percentile(ours, 0.99),
        "rps": 1000.0 / statistics.mean(ours),
        "floor_p50_ms": statistics.median(bare),
        "floor_p99_ms": percentile(bare, 0.99),
        "shape_p50_ms": statistics.median(shaped),
        **{f"{k}_ms": v for k, v in per_node.items()},
        **{f"part:{k}": v for k, v in parts.items()},
    }


def component_costs(orch: Orchestrator, n: int) -> dict[str, float]:
    """Median milliseconds per request of what the nodes do, grouped by kind of work."""
    svc = orch.services
    settings = svc.config.council
    costs: dict[str, list[float]] = {
        "ledger reads": [],
        "ledger placement": [],
        "thread claim": [],
        "council": [],
        "routing and checks": [],
    }
    for i in range(n):
        req = GPURequest.model_validate(request(i) | {"request_id": f"c{i}"})
        now = svc.clock.now()
        t0 = time.perf_counter()
        svc.ledger.remaining_usd(req.project)  # the council's features
        remaining = svc.ledger.remaining_usd(req.project, running=False)
        for _ in range(2):  # validate, the council's check and route each read it
            svc.ledger.remaining_usd(req.project, running=False)
        stats = svc.ledger.project_stats(req.project, now, settings.history_events)
        held = Counter(g.gpu_type for g in svc.inventory if g.uuid in svc.ledger.holders())
        t1 = time.perf_counter()
        features = build_features(req, svc.config, stats, dict(held), now)
        convene(council_of(svc), features, False, settings)
        t2 = time.perf_counter()
        check_against_fleet(req, svc.config)
        for _ in range(2):  # validate (hard rules) and council (again) ...
            refusal(req, svc.config, remaining)
        decision = choose_route(req, svc.config, remaining)  # ... and route
        t3 = time.perf_counter()
        assert isinstance(decision, RouteDecision)
        thread_claims.claim(svc.ledger, f"c{i}", req.request_id, "python", lambda: False)
        t3a = time.perf_counter()  # the name claimed, as a request on a named thread does
        placed = svc.ledger.place(req, decision, f"c{i}", now, svc.inventory, svc.topology)
        t4 = time.perf_counter()
        assert placed.row is not None
        svc.ledger.release(placed.row.id, ReleaseReason.EXPLICIT, now)
        for key, dt in [
            ("ledger reads", t1 - t0),
            ("council", t2 - t1),
            ("routing and checks", t3 - t2),
            ("thread claim", t3a - t3),
            ("ledger placement", t4 - t3a),
        ]:
            costs[key].append(dt * 1000)
    return {k: statistics.median(v) for k, v in costs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument(
        "--policy",
        choices=("neural", "reference"),
        default="neural",
        help="the council: the shipped CfC members or the reference rules",
    )
    args = parser.parse_args()
    POLICY[0] = args.policy
    r = measure(args.requests, args.warmup)
    nodes = sum(r[f"{name}_ms"] for name in NODES)
    print(
        f"{args.policy} council; requests through {' -> '.join(NODES)}, SQLite checkpointer; "
        "ours: durability "
        f"'exit' for the pure nodes, {DURABILITY!r} from allocate on; floor: {DURABILITY!r}; "
        f"{args.requests} requests after {args.warmup} warm-up"
    )
    print(f"  ours:  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  {r['rps']:.0f} req/s")
    print(
        f"  floor: p50 {r['floor_p50_ms']:.2f} ms  p99 {r['floor_p99_ms']:.2f} ms "
        f"(bare graph, {len(NODES)} trivial nodes)"
    )
    print(
        f"  shape: p50 {r['shape_p50_ms']:.2f} ms (our graph and two-part run, nodes "
        f"replaying recorded updates): {r['shape_p50_ms'] - r['floor_p50_ms']:.2f} ms "
        "above the floor"
    )
    print(
        f"  above the floor: {r['p50_ms'] - r['floor_p50_ms']:.2f} ms; time inside our nodes "
        f"(median): " + ", ".join(f"{n} {r[f'{n}_ms']:.2f}" for n in NODES) + f" = {nodes:.2f} ms"
    )
    print(
        "  outside the nodes, and not in the shape's run (median): "
        + ", ".join(f"{what} {r[f'{k}_ms']:.2f} ms" for k, what in OUTSIDE.items())
    )
    parts = {k.removeprefix("part:"): v for k, v in r.items() if k.startswith("part:")}
    print(
        "  the same work outside the graph, by kind (median): "
        + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        + f" = {sum(parts.values()):.2f} ms"
    )
    print(
        f"p50_ms={r['p50_ms']:.2f} p99_ms={r['p99_ms']:.2f} rps={r['rps']:.1f} "
        f"floor_p50_ms={r['floor_p50_ms']:.2f} ratio={r['p50_ms'] / r['floor_p50_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
