"""The simulated fleet: deterministic, follows load, calibrated on the real H200 recording."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

import pytest

from fleet.config import FleetConfig
from fleet.errors import ConfigError
from fleet.simulated import PROFILES, SimulatedFleet
from tests.conftest import SHARED, small_config

FIXTURE = SHARED / "fixtures" / "nvml" / "h200-phases.json"


def test_inventory_and_determinism(config: FleetConfig) -> None:
    a, b = SimulatedFleet(config), SimulatedFleet(config)
    assert [g.uuid for g in a.inventory()] == [g.uuid for g in b.inventory()]
    assert len(a.inventory()) == 14 and all(g.uuid.startswith("GPU-") for g in a.inventory())
    ids = [g.uuid for g in a.inventory()]
    assert a.sample(ids, 1e9, {}) == b.sample(ids, 1e9, {})


def test_load_drives_telemetry(config: FleetConfig) -> None:
    fleet = SimulatedFleet(config)
    gpu = fleet.inventory()[0].uuid
    idle = [fleet.sample([gpu], 1e9 + t, {})[0] for t in range(100)]
    busy = [fleet.sample([gpu], 1e9 + t, {gpu: "p"})[0] for t in range(100)]
    assert max(s.util_pct or 0 for s in idle) == 0
    assert statistics.mean(s.util_pct or 0 for s in busy) > 70
    assert (
        statistics.mean(s.temp_c or 0 for s in busy)
        > statistics.mean(s.temp_c or 0 for s in idle) + 15
    )


def test_throttling_lowers_speed_and_heat() -> None:
    hot = SimulatedFleet(small_config(simulation={"workloads": {"p": "overheat"}}))
    gpu = hot.inventory()[0].uuid
    before = hot.sample([gpu], 1e9, {gpu: "p"})[0]
    assert before.temp_c is not None and before.temp_c > 85
    hot.throttle(gpu)
    after = hot.sample([gpu], 1e9, {gpu: "p"})[0]
    assert after.throttled and (after.util_pct or 0) < (before.util_pct or 0)
    assert (after.temp_c or 0) < before.temp_c
    hot.reset([gpu])
    assert not hot.sample([gpu], 1e9, {gpu: "p"})[0].throttled


def test_unknown_workload_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        SimulatedFleet(small_config(simulation={"default_workload": "mining"}))


@pytest.mark.skipif(not FIXTURE.exists(), reason="needs ../shared/fixtures/nvml")
def test_profiles_match_the_h200_recording() -> None:
    """Utilisation and power levels per phase agree with the real recording."""
    data = json.loads(FIXTURE.read_text())
    tdp = data["inventory"][0]["power_limit"] / 1000
    phases: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in data["samples"]:
        phases[s["phase"]].append(s)
    idle_temp = statistics.mean(s["temp"] for s in phases["idle"])
    for phase, profile in [
        ("idle", "idle"),
        ("train", "train"),
        ("bursty", "bursty"),
        ("hoard", "hoard"),
    ]:
        rows = phases[phase]
        util = statistics.mean(s["util"]["gpu"] for s in rows)
        power = statistics.mean(s["power_mW"] for s in rows) / 1000 / tdp
        temp = statistics.mean(s["temp"] for s in rows) - idle_temp
        p = PROFILES[profile]
        mean_util = p.util * (1 - p.burst_share) + p.burst_util * p.burst_share
        assert mean_util == pytest.approx(util, abs=3), phase
        assert p.power_share == pytest.approx(power, abs=0.05), phase
        assert p.temp_rise - PROFILES["idle"].temp_rise == pytest.approx(temp, abs=5), phase
