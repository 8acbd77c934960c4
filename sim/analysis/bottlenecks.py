"""The project -> pool -> GPU type graph (networkx) and its rankings by waiting and load."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import networkx as nx

from sim.analysis.history import History
from sim.analysis.thresholds import TOP_N
from sim.analysis.timeseries import held_hours, wait_hours


def build_graph(history: History) -> Any:
    """A networkx DiGraph project -> pool -> GPU type weighted by GPU-hours and waiting."""
    g = nx.DiGraph()
    end = history.end
    for r in history.records:
        chain = [("project", r.project), ("pool", r.pool.value), ("gpu", r.gpu_type)]
        for layer, (kind, name) in enumerate(chain):
            g.add_node(f"{kind}:{name}", kind=kind, name=name, layer=layer)
        for a, b in pairwise(f"{kind}:{name}" for kind, name in chain):
            if not g.has_edge(a, b):
                g.add_edge(a, b, gpu_hours=0.0, wait_hours=0.0, requests=0)
            e = g.edges[a, b]
            e["gpu_hours"] += r.count * held_hours(r, end)
            e["wait_hours"] += wait_hours(r, end)
            e["requests"] += 1
    for _, _, e in g.edges(data=True):
        e["mean_wait_hours"] = e["wait_hours"] / e["requests"]
    return g


def _flow(g: Any, node: str, weight: str) -> float:
    degree = g.out_degree if g.nodes[node]["kind"] == "project" else g.in_degree
    return float(degree(node, weight=weight))


def graph_summary(g: Any) -> dict[str, Any]:
    nodes = [
        {
            "node": n,
            "kind": d["kind"],
            "name": d["name"],
            "gpu_hours": _flow(g, n, "gpu_hours"),
            "wait_hours": _flow(g, n, "wait_hours"),
        }
        for n, d in g.nodes(data=True)
    ]
    edges = [
        {
            "source": u,
            "target": v,
            **{k: e[k] for k in ("gpu_hours", "wait_hours", "mean_wait_hours", "requests")},
        }
        for u, v, e in g.edges(data=True)
    ]
    by_wait = sorted(
        (e for e in edges if g.nodes[e["source"]]["kind"] == "project"),
        key=lambda e: (-e["wait_hours"], -e["gpu_hours"], e["source"]),
    )
    resources = sorted(
        (n for n in nodes if n["kind"] != "project"),
        key=lambda n: (-n["wait_hours"], -n["gpu_hours"], n["kind"] != "pool", n["node"]),
    )
    return {
        "nodes": nodes,
        "edges": edges,
        "top_edges": [e for e in by_wait if e["wait_hours"] > 0][:TOP_N],
        "bottleneck_nodes": [n for n in resources if n["wait_hours"] > 0][:TOP_N],
        "most_loaded_nodes": sorted(nodes, key=lambda n: (-n["gpu_hours"], n["node"]))[:TOP_N],
    }
