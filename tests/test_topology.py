"""Placement on the topology: one node when possible, the fullest node that fits, then nearby."""

from __future__ import annotations

from fleet.config import FleetConfig
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology


def test_prefers_one_node_and_best_fit(config: FleetConfig) -> None:
    inventory = SimulatedFleet(config).inventory()
    topo = Topology(config, inventory)
    a100 = [g for g in inventory if g.gpu_type == "A100"]
    # a100-0 has 4 free, a100-1 has 2 free: a 2-GPU request takes the fuller node a100-1
    free = [g for g in a100 if g.node == "a100-0"] + [g for g in a100 if g.node == "a100-1"][:2]
    chosen = topo.choose(free, 2)
    assert chosen is not None and {g.node for g in chosen} == {"a100-1"}
    chosen = topo.choose(free, 4)
    assert chosen is not None and {g.node for g in chosen} == {"a100-0"}


def test_spans_nodes_only_when_it_must(config: FleetConfig) -> None:
    inventory = SimulatedFleet(config).inventory()
    topo = Topology(config, inventory)
    a100 = [g for g in inventory if g.gpu_type == "A100"]
    free = a100[1:]  # 3 on a100-0, 4 on a100-1
    chosen = topo.choose(free, 6)
    assert chosen is not None and len(chosen) == 6 and len({g.uuid for g in chosen}) == 6
    assert topo.choose(free, 8) is None


def test_distances_follow_racks(config: FleetConfig) -> None:
    topo = Topology(config, SimulatedFleet(config).inventory())
    assert topo.node_distance("a100-0", "h100-0") < topo.node_distance("a100-0", "a100-1")
    assert topo.node_distance("a100-0", "a100-0") == 0
