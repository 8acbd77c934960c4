"""The real H200 recording, replayed through the NVML backend and the whole graph: the monitor
must conclude what the fixture's README says of each phase.

| phase   | what ran                         | conclusion                                  |
| idle    | nothing                          | free                                        |
| train   | dense bf16 matmuls               | healthy: busy, no warning                   |
| bursty  | short kernel, 80 ms sleep        | low-utilisation warning                     |
| hoard   | 40 GiB held, nothing run         | idle with memory held -> released for idle  |
| release | the hoarder exited               | free                                        |

The recording lasts 95 s, so the monitor's windows are scaled to it: a tick every 0.25 s (the
recording's period), an 8 s low-utilisation window, a 10 s idle timeout, and the host policy's
idle threshold (under 1 %: NVML reads 3-5 % for the bursty phase, 0 % for the hoard).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.clock import VirtualClock
from fleet.config import load_fleet
from fleet.models import EventKind, ReleaseReason, Status
from fleet.monitoring import condition
from fleet.nvml.backend import NvmlBackend
from fleet.nvml.reader import NvmlSession
from fleet.nvml.replay import FakeNvml, Recording
from graph.orchestrator import Orchestrator
from tests.conftest import SHARED

FIXTURE = SHARED / "fixtures" / "nvml" / "h200-phases.json"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="needs ../shared/fixtures/nvml")


def test_the_monitor_classifies_every_phase_of_the_h200_recording(tmp_path: Path) -> None:
    rec = Recording.load(FIXTURE)
    phases = {name: (first, last) for name, first, last in rec.phases()}
    assert list(phases) == ["idle", "train", "bursty", "hoard", "release"]

    def phase_at(t: float) -> str:
        return next(n for n, (a, b) in phases.items() if a <= t <= b + 0.25)

    host = load_fleet(hardware=True)
    config = host.model_copy(
        update={
            "monitor": host.monitor.model_copy(
                update={
                    "tick_seconds": 0.25,
                    "low_util_window_minutes": 8 / 60,
                    "idle_timeout_minutes": 10 / 60,
                }
            )
        }
    )
    assert config.monitor.idle_util_pct == 1  # the host policy's, not a test's choice
    clock = VirtualClock(start=rec.start)
    lib = FakeNvml(rec, clock.now, origin=rec.start, loop=False)
    backend = NvmlBackend(config, NvmlSession(lib), name="replay", host="h200")
    settings = config.monitor
    with Orchestrator(tmp_path, config, backend=backend, clock=clock) as orch:
        (gpu,) = orch.services.gpus
        assert (gpu.gpu_type, gpu.model_name, gpu.memory_gb) == ("H200", "NVIDIA H200", 140.4)

        # idle: nothing runs, nobody holds it
        clock.sleep(sum(phases["idle"]) / 2 - clock.now())
        assert orch.status()["gpus"][0]["condition"] == "free"

        # train starts: the request is placed on the H200 and the graph monitors it
        clock.sleep(phases["train"][0] - clock.now())
        out = orch.request(
            {"project": "vision", "purpose": "training", "count": 1, "duration_hours": 1}, wait=True
        )
        assert out.status is Status.RELEASED and out.allocation is not None
        assert out.allocation.gpu_ids == [gpu.uuid]
        by_phase: dict[str, list[EventKind]] = {}
        for e in out.events:
            by_phase.setdefault(phase_at(e.at.timestamp()), []).append(e.kind)

        # train: healthy; busy while it computes, and no warning at all
        assert by_phase["train"] == [EventKind.PLACED]
        t = sum(phases["train"]) / 2  # read it again there, through a second replay
        mid = NvmlBackend(
            config, NvmlSession(FakeNvml(rec, lambda: t, origin=rec.start)), host="h200"
        )
        busy = mid.sample([gpu.uuid], t, {gpu.uuid: "vision"})[0]
        assert condition(busy, True, settings) == "busy"
        assert busy.health is None and not busy.throttled and busy.processes

        # bursty: allocated but underused -> the low-utilisation warning, no release
        assert by_phase["bursty"] == [EventKind.LOW_UTILIZATION]

        # hoard: idle with 40 GiB held -> released for idling after the timeout
        assert by_phase["hoard"] == [EventKind.IDLE, EventKind.RELEASED]
        idle = next(e for e in out.events if e.kind is EventKind.IDLE)
        assert idle.message == (
            "every GPU under 1% for 10 s, 40.6 GiB held by 1 process: "
            "hoarded (training; no command known to run on it)"
        )
        assert out.release is not None and out.release.reason is ReleaseReason.IDLE
        released = out.release.released_at.timestamp()
        assert phases["hoard"][0] + 10 <= released <= phases["hoard"][0] + 11

        # release: the hoarder exited; the GPU is free again
        clock.sleep(sum(phases["release"]) / 2 - clock.now())
        status = orch.status()["gpus"][0]
        assert status["condition"] == "free" and status["allocation_id"] is None
