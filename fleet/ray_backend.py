"""A Ray cluster as the fleet: its GPU nodes are the inventory, an allocation is a placement group.

- Inventory: every alive node with GPUs; a node's type is its `accelerator_type:<X>` resource
  (Ray sets it from the GPU's name), matched against the catalog like an NVML device name.
  A GPU is `ray:<node id>:<i>`; Ray schedules by count, so the index only names a share of the
  node.
- Reservation: when the ledger places an allocation, a detached placement group named
  `gpu-agent:<allocation id>` reserves its GPUs on the nodes the ledger chose (a label selector
  on `ray.io/node-id` per bundle): STRICT_PACK when they are on one node, PACK otherwise. Ray
  work then runs in that group. Release removes it. Both are idempotent, and at start-up
  `reconcile` removes the groups of allocations that ended while their worker was down and
  re-creates those an active allocation lacks.
- Health: a node that dies takes its GPUs out of placement (`unhealthy`).
- Readings: Ray reports no per-GPU telemetry, so samples are empty: the monitor enforces the
  lease and the budget, not idleness.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.models import GPUInfo, GPUSample, utc
from fleet.nvml.backend import gpu_type_of

PREFIX = "gpu-agent:"
NAMESPACE = "gpu-agent"
RESERVE_TIMEOUT_S = 30.0
_ACCELERATOR = "accelerator_type:"


def _nodes() -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes


def gpu_id(node_id: str, index: int) -> str:
    return f"ray:{node_id}:{index}"


def node_of(gpu: str) -> str:
    return gpu.split(":")[1]


class RayFleet:
    name = "ray"
    hardware = True
    monitoring = "leases and budgets only (Ray reports no per-GPU telemetry)"

    def __init__(self, config: FleetConfig, address: str | None = None) -> None:
        self._config = config
        self._owns = not ray.is_initialized()  # disconnect on close only if we connected
        if self._owns:
            try:
                ray.init(
                    address=address or "auto",
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            except ValueError as exc:  # an address Ray cannot parse (RAY_ADDRESS=bogus:::)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed"
                named = address or os.environ.get("RAY_ADDRESS") or "auto"
                raise InvalidInput(f"Ray address {named!r}: {first}") from None
        self._inventory = self._discover()
        self._alive = {node_of(g.uuid) for g in self._inventory}
        self._lost: dict[str, str] = {}
        self._new: list[str] = []

    def _discover(self) -> list[GPUInfo]:
        out = []
        for node in sorted(_nodes(), key=lambda n: n["NodeID"]):
            gpus = int(node["Resources"].get("GPU", 0)) if node["Alive"] else 0
            if not gpus:
                continue
            kinds = [
                k.removeprefix(_ACCELERATOR)
                for k in node["Resources"]
                if k.startswith(_ACCELERATOR)
            ]
            model = kinds[0] if kinds else "GPU"
            gpu_type = gpu_type_of(model, self._config.catalog)
            spec = self._config.catalog.get(gpu_type)
            name = f"{node['NodeManagerHostname']}-{node['NodeID'][:8]}"
            out += [
                GPUInfo(
                    uuid=gpu_id(node["NodeID"], i),
                    gpu_type=gpu_type,
                    node=name,
                    index=i,
                    memory_gb=spec.memory_gb if spec else 0.0,
                    model_name=model,
                )
                for i in range(gpus)
            ]
        return out

    def inventory(self) -> list[GPUInfo]:
        return list(self._inventory)

    def close(self) -> None:
        if self._owns:
            ray.shutdown()

    # ---- readings and health -----------------------------------------------------------------

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        self._check_nodes()
        return [GPUSample(gpu_id=g, at=utc(now), health=self._lost.get(g)) for g in gpu_ids]

    def _check_nodes(self) -> None:
        alive = {n["NodeID"] for n in _nodes() if n["Alive"]}
        for g in self._inventory:
            if node_of(g.uuid) not in alive and g.uuid not in self._lost:
                self._lost[g.uuid] = "the Ray node died"
                self._new.append(g.uuid)

    def unhealthy(self) -> dict[str, str]:
        self._check_nodes()
        found, self._new = self._new, []
        return {g: self._lost[g] for g in found}

    def throttle(self, gpu_id: str) -> str:
        return "nothing done (Ray reports no temperatures)"

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        return at

    def reset(self, gpu_ids: list[str]) -> None:
        """Nothing to undo per GPU: the placement group goes with `free`."""

    # ---- reservations ------------------------------------------------------------------------

    def reserve(self, allocation_id: str, gpu_ids: list[str]) -> str | None:
        """Reserve the GPUs in a placement group; None, or why Ray could not."""
        if allocation_id in self.reservations():
            return None
        nodes = [node_of(g) for g in gpu_ids]
        group = placement_group(
            [{"GPU": 1} for _ in gpu_ids],
            strategy="STRICT_PACK" if len(set(nodes)) == 1 else "PACK",
            name=PREFIX + allocation_id,
            lifetime="detached",
            bundle_label_selector=[{"ray.io/node-id": n} for n in nodes],
        )
        if group.wait(RESERVE_TIMEOUT_S):
            return None
        remove_placement_group(group)
        return (
            f"the Ray cluster could not reserve {len(gpu_ids)} GPU(s) on "
            f"{', '.join(sorted(set(nodes)))} within {RESERVE_TIMEOUT_S:g} s"
        )

    def free(self, allocation_id: str) -> None:
        try:
            group = get_placement_group(PREFIX + allocation_id)
        except ValueError:
            return  # none, or removed already
        remove_placement_group(group)

    def reservations(self) -> dict[str, dict[str, Any]]:
        """Live placement groups of gpu-agent: allocation id -> Ray's record of it."""
        return {
            g["name"].removeprefix(PREFIX): g
            for g in placement_group_table().values()
            if g["name"].startswith(PREFIX) and g["state"] != "REMOVED"
        }
