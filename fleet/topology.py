"""The fleet as a networkx graph: GPUs inside nodes, nodes in racks, racks on one fabric.

Placement asks it for the tightest set of free GPUs: one node when any node has room (the
fullest such node, to keep big holes open for big requests), otherwise nodes as close to each
other as the fabric allows. The graph and its distances are built on first use: placement on
one node (and every command that only reads the ledger) never loads networkx.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING

from fleet.config import FleetConfig
from fleet.models import GPUInfo

if TYPE_CHECKING:
    import networkx as nx

NVLINK, PCIE, RACK, FABRIC = 1.0, 2.0, 4.0, 8.0


class Topology:
    def __init__(self, config: FleetConfig, inventory: list[GPUInfo]) -> None:
        self._config = config
        self._inventory = list(inventory)

    @cached_property
    def graph(self) -> nx.Graph:
        import networkx as nx  # ~0.15 s: only placement across nodes needs it

        graph = nx.Graph()
        nvlink = {n.name: n.nvlink for n in self._config.nodes}
        rack_of = {n.name: n.rack for n in self._config.nodes}
        for rack in set(rack_of.values()):
            graph.add_edge(("rack", rack), ("fabric", "root"), weight=FABRIC)
        for node, rack in rack_of.items():
            graph.add_edge(("node", node), ("rack", rack), weight=RACK)
        by_node: dict[str, list[GPUInfo]] = defaultdict(list)
        for gpu in self._inventory:
            by_node[gpu.node].append(gpu)
            graph.add_edge(("gpu", gpu.uuid), ("node", gpu.node), weight=PCIE)
        for node, gpus in by_node.items():
            if nvlink.get(node, False):
                for i, a in enumerate(gpus):
                    for b in gpus[i + 1 :]:
                        graph.add_edge(("gpu", a.uuid), ("gpu", b.uuid), weight=NVLINK)
        return graph

    @cached_property
    def _node_distance(self) -> dict[str, dict[str, float]]:
        import networkx as nx

        # a node's GPUs lead only to each other and back to it: no path between two nodes
        # runs through one, so the distances are read on the graph without them
        graph = self.graph.subgraph(v for v in self.graph if v[0] != "gpu")
        hosts = [("node", name) for name in dict.fromkeys(n.name for n in self._config.nodes)]
        out: dict[str, dict[str, float]] = {}
        for host in hosts:
            lengths = nx.single_source_dijkstra_path_length(graph, host, weight="weight")
            out[host[1]] = {h[1]: float(lengths[h]) for h in hosts if h in lengths}
        return out

    def node_distance(self, a: str, b: str) -> float:
        return self._node_distance[a][b]

    def choose(self, free: Sequence[GPUInfo], count: int) -> list[GPUInfo] | None:
        """The best `count` GPUs among `free` (all of one type), or None if there are too few."""
        if count > len(free):
            return None
        by_node: dict[str, list[GPUInfo]] = defaultdict(list)
        for gpu in free:
            by_node[gpu.node].append(gpu)
        fitting = [n for n, gpus in by_node.items() if len(gpus) >= count]
        if fitting:  # best fit: the node with the fewest free GPUs that hold the request
            best = min(fitting, key=lambda n: (len(by_node[n]), n))
            return sorted(by_node[best], key=lambda g: g.index)[:count]
        for gpus in by_node.values():
            gpus.sort(key=lambda g: g.index)
        best_set: list[GPUInfo] | None = None
        best_cost = float("inf")
        for seed in sorted(by_node):
            order = sorted(
                by_node, key=lambda n: (self.node_distance(seed, n), -len(by_node[n]), n)
            )
            chosen: list[GPUInfo] = []
            for node in order:
                chosen.extend(by_node[node][: count - len(chosen)])
                if len(chosen) == count:
                    break
            cost = sum(self.node_distance(seed, g.node) for g in chosen)
            if cost < best_cost:
                best_set, best_cost = chosen, cost
        return best_set
