"""A fleet backend whose GPUs read what the trace job placed on them is doing.

While a job's work phase runs, its GPUs read the phase's utilisation; in a pause or in the idle
tail they read 0 % with memory held, the H200 recording's `hoard` phase; free GPUs (not among
the holders the caller names) read its `idle` phase. Readings are exact and piecewise
constant, so `steady_until` can promise the monitor when they next change and it sleeps
through the ticks in between.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping

from fleet.config import FleetConfig
from fleet.models import GPUInfo, GPUSample, utc
from fleet.simulated import PROFILES, SimulatedFleet
from sim.lifecycle import Segment

_TRAIN, _HOARD, _IDLE = PROFILES["train"], PROFILES["hoard"], PROFILES["idle"]


class TraceFleet:
    name = "trace"
    hardware = False

    def __init__(self, config: FleetConfig) -> None:
        self._config = config
        self._inventory = SimulatedFleet(config).inventory()
        self._by_id = {g.uuid: g for g in self._inventory}
        self._ambient = {n.name: n.ambient_c for n in config.nodes}
        self._runs: dict[str, tuple[list[float], list[Segment]]] = {}

    def inventory(self) -> list[GPUInfo]:
        return list(self._inventory)

    def run(self, gpu_ids: list[str], segments: list[Segment]) -> None:
        """The job whose timeline these GPUs now follow."""
        starts = [s.start for s in segments]
        for g in gpu_ids:
            self._runs[g] = (starts, segments)

    def reset(self, gpu_ids: list[str]) -> None:
        """Nothing to undo. A GPU's run is replaced when it is placed again, never dropped
        here: the GPU may already be running the next job placed at the same instant."""

    def throttle(self, gpu_id: str) -> str:
        return "nothing done (trace jobs stay cool)"

    def unhealthy(self) -> dict[str, str]:
        return {}

    def _segment(self, gpu_id: str, at: float) -> Segment | None:
        run = self._runs.get(gpu_id)
        if run is None:
            return None
        starts, segments = run
        i = bisect.bisect_right(starts, at) - 1
        if i < 0 or at >= segments[-1].end:
            return None if i < 0 else Segment(segments[-1].end, math.inf, 0.0, 0.0)
        return segments[i] if at < segments[i].end else segments[i + 1]

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        ends = [s.end for g in gpu_ids if (s := self._segment(g, at)) is not None]
        return min(ends) if ends else math.inf

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        return [self._read(self._by_id[g], now, g in holders) for g in gpu_ids]

    def _read(self, gpu: GPUInfo, now: float, held: bool) -> GPUSample:
        seg = self._segment(gpu.uuid, now) if held else None
        util = seg.util if seg is not None else 0.0
        profile = _TRAIN if util > 0 else (_HOARD if held else _IDLE)
        spec = self._config.catalog[gpu.gpu_type]
        load = util / _TRAIN.util if util > 0 else 1.0
        return GPUSample(
            gpu_id=gpu.uuid,
            at=utc(now),
            util_pct=util,
            mem_used_gb=round(gpu.memory_gb * profile.mem_share, 2),
            mem_total_gb=gpu.memory_gb,
            temp_c=round(self._ambient[gpu.node] + profile.temp_rise * load, 1),
            power_w=round(spec.tdp_watts * profile.power_share * load, 1),
        )
