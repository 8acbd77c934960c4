"""The real NVML backend against a real GPU (`pytest -m gpu`); skipped where NVML cannot start.

Only getters are called: these tests never change a card's settings (no power or clock
setters; power capping stays off).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from fleet.config import load_fleet
from fleet.models import ReleaseReason, Status
from fleet.nvml.backend import NvmlBackend
from fleet.nvml.reader import NvmlSession
from fleet.supervise import Supervised
from graph.orchestrator import Orchestrator
from graph.run_command import request_and_run


def _driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _driver(), reason="no NVIDIA driver (NVML cannot start)"),
]
LOAD = Path(__file__).with_name("gpu_load.py")


@pytest.fixture
def backend() -> Iterator[NvmlBackend]:
    b = NvmlBackend(load_fleet(hardware=True), NvmlSession())
    assert b.problem is None and not b.allow_power_cap
    yield b
    b.close()


def test_inventory_matches_nvidia_smi(backend: NvmlBackend) -> None:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [[f.strip() for f in line.split(",")] for line in smi.strip().splitlines()]
    inv = backend.inventory()
    assert [(g.index, g.uuid, g.model_name) for g in inv] == [
        (int(i), uuid, name) for i, uuid, name, _ in rows
    ]
    for g, (*_, mib) in zip(inv, rows, strict=True):
        assert abs(g.memory_gb - int(mib) / 1024) < 0.2  # nvidia-smi's MiB, our GiB
    print("\ninventory:", [(g.uuid, g.model_name, g.gpu_type, g.memory_gb) for g in inv])


def test_a_matmul_shows_as_utilisation_and_as_a_process(backend: NvmlBackend) -> None:
    gpu = backend.inventory()[0]
    before = backend.sample([gpu.uuid], time.time(), {})[0]
    limit = backend._session.call(gpu.index, "nvmlDeviceGetPowerManagementLimit")
    env = dict(os.environ) | {"CUDA_VISIBLE_DEVICES": gpu.uuid}
    proc = Supervised([sys.executable, str(LOAD), "8"], env)
    utils: list[float | None] = []
    pids: set[int] = set()
    try:
        end = time.monotonic() + 7
        while time.monotonic() < end:
            s = backend.sample([gpu.uuid], time.time(), {})[0]
            utils.append(s.util_pct)
            pids.update(p.pid for p in s.processes or [])
            time.sleep(0.25)
    finally:
        stopped = proc.stop(5.0)
        code = proc.returncode()
    after = backend.sample([gpu.uuid], time.time(), {})[0]
    print(
        f"\nbefore: {before}\nutil while running: {utils}\nNVML pids: {sorted(pids)}, "
        f"child {proc.pid}\nafter: {after}\nstopped: {stopped} code {code}"
    )
    assert max(u for u in utils if u is not None) >= 50
    assert proc.pid in pids
    assert stopped.leftover == []
    assert proc.pid not in {p.pid for p in after.processes or []}
    assert backend._session.call(gpu.index, "nvmlDeviceGetPowerManagementLimit") == limit


def test_gpu_agent_run_on_the_real_gpu(tmp_path: Path) -> None:
    host = load_fleet(hardware=True)
    config = host.model_copy(
        update={"monitor": host.monitor.model_copy(update={"tick_seconds": 0.5})}
    )
    with Orchestrator(tmp_path, config, backend="nvml") as orch:
        gpu_type = orch.services.inventory[0].gpu_type
        request = orch.check(
            {
                "project": "gpu-test",
                "purpose": "training",
                "count": 1,
                "duration_hours": 0.1,
                "gpu_type": gpu_type,
            }
        )
        report = request_and_run(orch, request, [sys.executable, str(LOAD), "6"], grace_s=5)
        (record,) = orch.history()
        outcome = orch.outcome(record.thread_id)
    print(f"\nreport: {report}\nrecord: {record}")
    assert report.exit_code == 0 and report.ended_by == "command"
    assert report.on_gpus == []  # NVML lists no process of it on the GPU any more
    assert record.reason is ReleaseReason.COMMAND_EXIT and outcome.status is Status.RELEASED
    assert record.mean_util_pct is not None and record.mean_util_pct > 20
