"""A simulated fleet whose telemetry follows load, calibrated on a real H200 recording.

Levels come from ../shared/fixtures/nvml/h200-phases.json (mean per phase, as a share of the
card's TDP for power and as degrees above the idle reading for temperature):
idle 0 % util, +3 C, 12 % TDP; train 81 % util, +22 C, 82 % TDP; bursty 3 % util (short bursts),
+6 C, 19 % TDP; hoard 0 % util with 27 % of memory held, +6 C, 17 % TDP. The memory share of
`train` (70 %) is a model choice: the recording's training phase used little memory.
Readings are a pure function of (seed, GPU, second, load), so every process sees the same fleet.
"""

from __future__ import annotations

import random
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.config import FleetConfig
from fleet.errors import ConfigError
from fleet.models import GPUInfo, GPUSample, utc

_NAMESPACE = uuid.UUID("5b1e4c1e-9d8f-4a52-8a4e-6f1f0c2b7a10")


@dataclass(frozen=True)
class Profile:
    util: float
    util_jitter: float
    burst_share: float  # share of samples that are a burst at `burst_util`
    burst_util: float
    mem_share: float
    temp_rise: float
    power_share: float

    @property
    def mean_util(self) -> float:
        """The utilisation its readings average (jitter is symmetric; clipping at 0 aside)."""
        return self.util * (1 - self.burst_share) + self.burst_util * self.burst_share


PROFILES: dict[str, Profile] = {
    "idle": Profile(0.0, 0.0, 0.0, 0.0, 0.004, 3.0, 0.12),
    "train": Profile(81.0, 12.0, 0.0, 0.0, 0.70, 22.0, 0.82),
    "bursty": Profile(0.5, 0.5, 0.08, 30.0, 0.009, 6.0, 0.19),
    "hoard": Profile(0.0, 0.0, 0.0, 0.0, 0.27, 6.0, 0.17),
    "overheat": Profile(95.0, 4.0, 0.0, 0.0, 0.75, 60.0, 0.95),
}
THROTTLE_SPEED = 0.7
THROTTLE_COOLING_C = 10.0


def simulated_uuid(node: str, index: int) -> str:
    return f"GPU-{uuid.uuid5(_NAMESPACE, f'{node}/{index}')}"


def check_simulable(config: FleetConfig) -> None:
    """ConfigError unless the fleet file describes a fleet to simulate: its nodes, and
    workloads that name known profiles. `gpu-agent simulate` asks before it writes anything."""
    if not config.nodes:
        raise ConfigError("the simulated fleet needs [[nodes]] in the fleet file")
    sim = config.simulation
    for profile in [sim.default_workload, *sim.workloads.values()]:
        if profile not in PROFILES:
            raise ConfigError(
                f"simulation workload {profile!r} is unknown (use {', '.join(PROFILES)})"
            )


class SimulatedFleet:
    name = "simulated"
    hardware = False

    def __init__(self, config: FleetConfig) -> None:
        check_simulable(config)
        self._config = config
        self._inventory = [
            GPUInfo(
                uuid=simulated_uuid(node.name, i),
                gpu_type=node.gpu_type,
                node=node.name,
                index=i,
                memory_gb=config.catalog[node.gpu_type].memory_gb,
            )
            for node in config.nodes
            for i in range(node.gpus)
        ]
        self._by_id = {g.uuid: g for g in self._inventory}
        self._ambient = {n.name: n.ambient_c for n in config.nodes}
        self._throttled: set[str] = set()

    def inventory(self) -> list[GPUInfo]:
        return list(self._inventory)

    def workload(self, project: str | None) -> str:
        if project is None:
            return "idle"
        sim = self._config.simulation
        return sim.workloads.get(project, sim.default_workload)

    def throttle(self, gpu_id: str) -> str:
        self._throttled.add(gpu_id)
        return f"throttled to {THROTTLE_SPEED:.0%} speed"

    def unhealthy(self) -> dict[str, str]:
        return {}

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        return at  # readings jitter from second to second

    def reset(self, gpu_ids: list[str]) -> None:
        self._throttled.difference_update(gpu_ids)

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        return [self._read(self._by_id[g], now, holders.get(g)) for g in gpu_ids]

    def _read(self, gpu: GPUInfo, now: float, project: str | None) -> GPUSample:
        p = PROFILES[self.workload(project)]
        spec = self._config.catalog[gpu.gpu_type]
        seed = zlib.crc32(f"{self._config.simulation.seed}:{gpu.uuid}:{int(now)}".encode())
        rng = random.Random(seed)
        if p.burst_share and rng.random() < p.burst_share:
            util = p.burst_util + rng.uniform(-5, 5)
        else:
            util = p.util + rng.uniform(-p.util_jitter, p.util_jitter)
        throttled = gpu.uuid in self._throttled
        speed = THROTTLE_SPEED if throttled else 1.0
        util = min(100.0, max(0.0, util * speed))
        temp = self._ambient[gpu.node] + p.temp_rise + rng.uniform(-1, 1)
        if throttled:
            temp -= THROTTLE_COOLING_C
        power = spec.tdp_watts * p.power_share * speed * rng.uniform(0.97, 1.03)
        return GPUSample(
            gpu_id=gpu.uuid,
            at=utc(now),
            util_pct=round(util, 1),
            mem_used_gb=round(gpu.memory_gb * p.mem_share, 2),
            mem_total_gb=gpu.memory_gb,
            temp_c=round(temp, 1),
            power_w=round(power, 1),
            throttled=throttled,
        )
