"""The NVML backend through a fake pynvml: parsing, fallbacks, injected errors, health, caps.

Every test here runs the real reader (fleet.nvml.reader) and backend (fleet.nvml.backend); only the
library underneath is replaced (fleet.nvml.replay.FakeNvml), the way gpustat's tests mock NVML
at the call boundary. The errors raised are the binding's own NVMLError classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from fleet.choose_backend import BackendChoice, resolve
from fleet.clock import VirtualClock
from fleet.config import load_fleet
from fleet.errors import InvalidInput
from fleet.models import ReleaseReason, Status
from fleet.nvml import reader as nvml
from fleet.nvml.backend import NvmlBackend, gpu_type_of
from fleet.nvml.reader import NvmlSession
from fleet.nvml.record import record
from fleet.nvml.replay import FakeNvml, Recording
from graph.orchestrator import Orchestrator
from tests.conftest import run_cli

T0 = 1_800_000_000.0
GIB = 2**30


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3") -> dict[str, Any]:
    return {
        "name": name,
        "uuid": f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd",
        "pci": {"busId": f"00000000:0{index}:00.0"},
        "memory": {"total": 80 * GIB, "free": 80 * GIB, "used": 0},
        "cuda_cc": [9, 0],
        "mig_mode": [0, 0],
        "power_limit": 700_000,
        "power_limit_constraints": [200_000, 700_000],
        "power_default": 700_000,
        "enforced_power": 700_000,
        "temp_slowdown": 87,
        "temp_shutdown": 92,
        "temp_gpu_max": 85,
        "max_sm_clock": 1980,
        "max_mem_clock": 2619,
        "minor": index,
        "index": index,
        "fan": {"nvml_error": "Not Supported", "class": "NVMLError_NotSupported"},
    }


def row(
    t: float,
    index: int,
    util: int,
    used_gib: float = 1.0,
    temp: int = 50,
    procs: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "t": t,
        "gpu": index,
        "util": {"gpu": util, "memory": util // 4},
        "mem": {"total": 80 * GIB, "free": int((80 - used_gib) * GIB), "used": int(used_gib * GIB)},
        "temp": temp,
        "power_mW": 300_000,
        "sm_clock": 1755,
        "mem_clock": 2619,
        "clock_event_reasons": 0,
        "procs": procs or [],
        **extra,
    }


def recording(n_gpus: int = 2, seconds: int = 60, util: int = 90, **extra: Any) -> Recording:
    rows = [row(T0 + s, i, util, **extra) for s in range(seconds) for i in range(n_gpus)]
    return Recording.parse(
        {
            "meta": {"driver": "580.1", "period_s": 1.0},
            "inventory": [gpu(i) for i in range(n_gpus)],
            "samples": rows,
        }
    )


def backend(rec: Recording, clock: VirtualClock | None = None, **fake: Any) -> NvmlBackend:
    clock = clock or VirtualClock(start=T0)
    lib = FakeNvml(rec, clock.now, origin=T0, **fake)
    return NvmlBackend(load_fleet(hardware=True), NvmlSession(lib), name="replay", host="h0")


# ---- inventory ---------------------------------------------------------------------------


def test_inventory_is_keyed_by_uuid_with_the_catalog_type_and_gib() -> None:
    b = backend(recording())
    inv = b.inventory()
    assert [g.uuid for g in inv] == [gpu(0)["uuid"], gpu(1)["uuid"]]
    assert {g.gpu_type for g in inv} == {"H100"}
    assert inv[0].memory_gb == 80.0 and inv[0].node == "h0"
    assert inv[0].model_name == "NVIDIA H100 80GB HBM3"
    assert inv[1].pci_bus_id == "00000000:01:00.0"
    assert not inv[0].mig


def test_mig_mode_is_read_and_a_mig_gpu_reads_no_utilisation() -> None:
    rec = Recording.parse(
        {
            "inventory": [gpu(0) | {"mig_mode": [1, 1]}],
            "samples": [
                row(T0, 0, 0)
                | {"util": {"nvml_error": "Not Supported", "class": "NVMLError_NotSupported"}}
            ],
        }
    )
    b = backend(rec)
    assert b.inventory()[0].mig
    s = b.sample([b.inventory()[0].uuid], T0, {})[0]
    assert s.util_pct is None and s.mem_used_gb == 1.0  # never judged idle on no reading


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA H200", "H200"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("NVIDIA L40S", "L40S"),
    ],
)
def test_gpu_type_from_the_device_name(name: str, expected: str) -> None:
    assert gpu_type_of(name, load_fleet(hardware=True).catalog) == expected


def test_a_gpu_the_catalog_does_not_price_is_listed_but_never_placed(tmp_path: Path) -> None:
    rec = Recording.parse(
        {"inventory": [gpu(0), gpu(1, "NVIDIA L40S")], "samples": [row(T0, 0, 0), row(T0, 1, 0)]}
    )
    clock = VirtualClock(start=T0)
    with Orchestrator(
        tmp_path, load_fleet(hardware=True), backend=backend(rec, clock), clock=clock
    ) as orch:
        assert [g.gpu_type for g in orch.services.unpriced] == ["L40S"]
        assert [g.gpu_type for g in orch.services.inventory] == ["H100"]
        assert orch.services.config.gpus_of_type("H100") == 1
        status = orch.status()
        assert status["unpriced_types"] == ["L40S"]
        assert [g["placeable"] for g in status["gpus"]] == [True, False]


# ---- one field at a time ---------------------------------------------------------------------

FIELD_OF_CALL: dict[str, tuple[str, ...]] = {
    "nvmlDeviceGetUtilizationRates": ("util_pct",),
    "nvmlDeviceGetMemoryInfo_v2": (),  # falls back to v1: memory still read
    "nvmlDeviceGetPowerUsage": ("power_w",),
    "nvmlDeviceGetClockInfo": ("sm_clock_mhz", "mem_clock_mhz"),
    "nvmlDeviceGetComputeRunningProcesses": ("processes",),
    "nvmlDeviceGetCurrentClocksEventReasons": (),  # throttled stays False
}
READ = (
    "util_pct",
    "mem_used_gb",
    "mem_total_gb",
    "temp_c",
    "power_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "processes",
)


@pytest.mark.parametrize("call", sorted(FIELD_OF_CALL))
def test_a_field_that_is_not_supported_reads_as_unavailable(call: str) -> None:
    b = backend(
        recording(procs=[{"pid": 4242, "usedGpuMemory": GIB}]), faults={call: nvml.NOT_SUPPORTED}
    )
    s = b.sample([b.inventory()[0].uuid], T0 + 1, {})[0]
    gone = FIELD_OF_CALL[call]
    for name in READ:
        assert (getattr(s, name) is None) == (name in gone), name
    assert s.health is None


def test_every_dynamic_field_unsupported_is_still_a_reading() -> None:
    calls = [
        *FIELD_OF_CALL,
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetComputeRunningProcesses_v2",
    ]
    b = backend(recording(), faults=dict.fromkeys(calls, nvml.NOT_SUPPORTED))
    s = b.sample([b.inventory()[0].uuid], T0, {})[0]
    assert all(getattr(s, name) is None for name in READ)
    assert s.health is None and not s.throttled


def test_recorded_errors_are_raised_again_and_read_as_unavailable() -> None:
    """The H200 recording stores NotSupported fields as markers; a replayed sample whose
    temperature was NotSupported reads None, through the binding's own error class."""
    rec = recording(temp={"nvml_error": "Not Supported", "class": "NVMLError_NotSupported"})
    lib = FakeNvml(rec, lambda: T0, origin=T0)
    lib.nvmlInit()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        lib.nvmlDeviceGetTemperatureV(lib.nvmlDeviceGetHandleByIndex(0), 0)
    b = backend(rec)
    assert b.sample([b.inventory()[0].uuid], T0, {})[0].temp_c is None


def test_newer_calls_fall_back_and_a_missing_call_is_not_asked_again() -> None:
    rec = recording()
    clock = VirtualClock(start=T0)
    lib = FakeNvml(
        rec,
        clock.now,
        origin=T0,
        faults={
            "nvmlDeviceGetTemperatureV": nvml.FUNCTION_NOT_FOUND,
            "nvmlDeviceGetMemoryInfo_v2": nvml.FUNCTION_NOT_FOUND,
        },
    )
    calls: list[str] = []
    real = lib.nvmlDeviceGetTemperatureV

    def counted(h: Any, sensor: int) -> int:
        calls.append("V")
        return real(h, sensor)

    lib.nvmlDeviceGetTemperatureV = counted  # type: ignore[method-assign]
    b = NvmlBackend(load_fleet(hardware=True), NvmlSession(lib), host="h0")
    uuid = b.inventory()[0].uuid
    for k in range(3):
        s = b.sample([uuid], T0 + k, {})[0]
        assert s.temp_c == 50.0 and s.mem_used_gb == 1.0  # v1 and the old call answered
    assert calls == ["V"]  # asked once, then remembered as missing


def test_errors_are_matched_by_value_not_by_class_name() -> None:
    """A binding whose generated classes differ (another version, a wrapper) still works:
    only NVMLError and `.value` are relied on."""

    class OtherBindingError(pynvml.NVMLError):  # type: ignore[misc]
        def __new__(cls, value: int) -> OtherBindingError:
            obj = Exception.__new__(cls)
            obj.value = value
            return obj

    lib = FakeNvml(recording(), lambda: T0, origin=T0)
    lib.nvmlDeviceGetPowerUsage = (  # type: ignore[method-assign]
        lambda h: (_ for _ in ()).throw(OtherBindingError(nvml.GPU_IS_LOST))
    )
    b = NvmlBackend(load_fleet(hardware=True), NvmlSession(lib), host="h0")
    s = b.sample([b.inventory()[0].uuid], T0, {})[0]
    assert s.health == "GPU is lost"


# ---- no driver -------------------------------------------------------------------------------


def test_no_library_gives_a_clear_reason_and_an_empty_inventory() -> None:
    b = backend(recording(), library_missing=True)
    assert b.inventory() == []
    assert b.problem is not None and "NVML library not found" in b.problem


def test_this_machine_has_no_driver_and_auto_says_it_picked_the_simulated_fleet() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # a GPU host: auto must pick nvml
        pynvml.nvmlShutdown()
        assert resolve(BackendChoice("auto")).name == "nvml"
        return
    resolved = resolve(BackendChoice("auto"))
    assert resolved.name == "simulated"
    assert resolved.note is not None and "NVML library not found" in resolved.note


def test_nvml_without_a_driver_is_an_empty_fleet_with_the_reason(tmp_path: Path) -> None:
    with Orchestrator(
        tmp_path,
        None,
        backend=backend(recording(), library_missing=True),
        clock=VirtualClock(start=T0),
    ) as orch:
        assert orch.status()["gpus"] == []
        assert "NVML library not found" in orch.status()["problem"]
        with pytest.raises(InvalidInput, match="no GPUs to place on: NVML library not found"):
            orch.request(
                {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1}, wait=False
            )


def test_backend_choice_rejects_unknown_names_and_replay_without_a_file() -> None:
    with pytest.raises(InvalidInput, match="unknown backend 'gpu'"):
        BackendChoice("gpu")
    with pytest.raises(InvalidInput, match="needs a recording"):
        BackendChoice("replay")


def test_a_broken_recording_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"inventory": [gpu(0)], "samples": [{"gpu": 3, "t": 1}]}))
    with pytest.raises(InvalidInput, match="sample 0 needs 'gpu'"):
        Recording.load(bad)
    with pytest.raises(InvalidInput, match="no such file"):
        Recording.load(tmp_path / "missing.json")


# ---- health --------------------------------------------------------------------------------


def test_a_lost_gpu_ends_its_allocation_and_leaves_placement(tmp_path: Path) -> None:
    rec = recording(n_gpus=2, seconds=3600)
    clock = VirtualClock(start=T0)
    lib = FakeNvml(rec, clock.now, origin=T0)
    b = NvmlBackend(load_fleet(hardware=True), NvmlSession(lib), name="replay", host="h0")
    with Orchestrator(tmp_path, None, backend=b, clock=clock) as orch:
        first = orch.request(
            {
                "project": "p",
                "purpose": "training",
                "count": 1,
                "duration_hours": 1,
                "gpu_type": "H100",
            },
            wait=False,
        )
        assert first.allocation is not None
        lost = first.allocation.gpu_ids[0]
        lib.lost.add(next(g.index for g in b.inventory() if g.uuid == lost))
        out = orch.resume(first.thread_id)
        assert out.status is Status.RELEASED
        assert out.release is not None and out.release.reason is ReleaseReason.UNHEALTHY
        assert orch.services.ledger.unhealthy() == {lost: "GPU is lost"}
        second = orch.request(
            {
                "project": "p",
                "purpose": "training",
                "count": 1,
                "duration_hours": 1,
                "gpu_type": "H100",
            },
            wait=False,
        )
        assert second.allocation is not None and second.allocation.gpu_ids != [lost]
        third = orch.request(
            {
                "project": "p",
                "purpose": "training",
                "count": 1,
                "duration_hours": 1,
                "gpu_type": "H100",
            },
            wait=False,
        )
        assert third.status is Status.QUEUED  # the lost GPU is not handed out
        assert orch.services.ledger.clear_unhealthy(lost)


def test_xid_errors_mark_a_gpu_unhealthy_and_application_xids_do_not() -> None:
    b = backend(
        recording(), events=[{"t": T0 + 1, "gpu": 0, "xid": 13}, {"t": T0 + 2, "gpu": 1, "xid": 79}]
    )
    uuids = [g.uuid for g in b.inventory()]
    clock_at = T0 + 5
    b._session.lib._clock = lambda: clock_at
    assert b.unhealthy() == {uuids[1]: "XID 79"}
    assert b.unhealthy() == {}  # handed over once
    samples = b.sample(uuids, clock_at, {})
    assert [s.health for s in samples] == [None, "XID 79"]


# ---- overheating and the power limit ----------------------------------------------------------


def capped(tmp_path: Path, **fake: Any) -> tuple[NvmlBackend, FakeNvml]:
    lib = FakeNvml(recording(temp=95), lambda: T0, origin=T0, **fake)
    b = NvmlBackend(
        load_fleet(hardware=True),
        NvmlSession(lib),
        host="h0",
        state_dir=tmp_path,
        allow_power_cap=True,
    )
    return b, lib


def test_overheating_is_a_warning_unless_power_capping_is_allowed() -> None:
    b = backend(recording(temp=95))
    action = b.throttle(b.inventory()[0].uuid)
    assert action.startswith("warning only") and "--allow-power-cap" in action
    assert b._session.lib.setter_calls == []


def test_an_allowed_power_cap_is_remembered_and_restored(tmp_path: Path) -> None:
    b, lib = capped(tmp_path)
    uuid = b.inventory()[0].uuid
    assert b.throttle(uuid) == "power limit lowered 700 W -> 560 W"
    assert json.loads((tmp_path / "power-caps.json").read_text()) == {
        uuid: {"original_mw": 700_000, "capped_mw": 560_000}
    }
    assert b.throttle(uuid).startswith("already capped")
    b.reset([uuid])
    assert lib.setter_calls == [
        ("nvmlDeviceSetPowerManagementLimit", 0, 560_000),
        ("nvmlDeviceSetPowerManagementLimit", 0, 700_000),
    ]
    assert json.loads((tmp_path / "power-caps.json").read_text()) == {}


def test_a_refused_power_cap_is_a_warning_and_leaves_nothing_to_restore(tmp_path: Path) -> None:
    b, _ = capped(tmp_path, root=False)
    action = b.throttle(b.inventory()[0].uuid)
    assert action.startswith("warning only: NVML refused") and "Insufficient Permissions" in action
    assert json.loads((tmp_path / "power-caps.json").read_text()) == {}


def test_start_up_restores_limits_a_crashed_process_left_lowered(tmp_path: Path) -> None:
    b, lib = capped(tmp_path)
    uuid = b.inventory()[0].uuid
    b.throttle(uuid)  # ... and the process dies here, the card still capped
    clock = VirtualClock(start=T0)
    with Orchestrator(tmp_path, None, backend=b, clock=clock):
        pass
    assert lib.setter_calls[-1] == ("nvmlDeviceSetPowerManagementLimit", 0, 700_000)
    assert lib.nvmlDeviceGetPowerManagementLimit(lib.nvmlDeviceGetHandleByIndex(0)) == 700_000


def test_a_hot_gpu_during_an_allocation_records_what_was_done(tmp_path: Path) -> None:
    rec = recording(n_gpus=1, seconds=600, temp=95)
    clock = VirtualClock(start=T0)
    b = NvmlBackend(
        load_fleet(hardware=True), NvmlSession(FakeNvml(rec, clock.now, origin=T0)), host="h0"
    )
    with Orchestrator(tmp_path, None, backend=b, clock=clock) as orch:
        out = orch.request(
            {"project": "p", "purpose": "training", "count": 1, "duration_hours": 0.1}, wait=True
        )
    hot = [e for e in out.events if e.kind.value == "throttle"]
    assert len(hot) == 1 and "95 C is over 85 C: warning only" in hot[0].message


# ---- recording -----------------------------------------------------------------------------


def test_a_recording_replays_to_the_same_readings(tmp_path: Path) -> None:
    source = recording(n_gpus=2, seconds=30, procs=[{"pid": 7, "usedGpuMemory": GIB}])
    clock = VirtualClock(start=T0)
    session = NvmlSession(FakeNvml(source, clock.now, origin=T0), timed=True)
    made = record(session, seconds=5, period=0.5, phase="train", clock=clock.now, sleep=clock.sleep)
    assert made["device_count"] == 2 and len(made["samples"]) == 2 * 11
    assert made["meta"]["driver"] == "580.1" and made["meta"]["binding"].startswith("nvidia")
    assert "nvmlDeviceGetUtilizationRates" in made["query_latency"]
    assert {s["phase"] for s in made["samples"]} == {"train"}
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(made))
    again = Recording.load(path)
    replayed = backend(again)
    original = backend(source)
    uuids = [g.uuid for g in original.inventory()]
    assert [g.uuid for g in replayed.inventory()] == uuids
    for k in range(5):
        a = original.sample(uuids, T0 + k, {})
        b = replayed.sample(uuids, T0 + k, {})
        assert [s.model_dump(exclude={"at"}) for s in a] == [
            s.model_dump(exclude={"at"}) for s in b
        ]


def test_the_cli_explains_a_missing_driver(tmp_path: Path) -> None:
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    except pynvml.NVMLError:
        pass
    done = run_cli("nvml", "record", "--out", str(tmp_path / "r.json"), cwd=tmp_path)
    assert done.returncode == 1 and "NVML library not found" in done.stderr
    done = run_cli(
        "request",
        "--backend",
        "auto",
        "--state-dir",
        str(tmp_path / "s"),
        "--project",
        "p",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--no-wait",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "backend auto: simulated (NVML library not found" in done.stderr
    done = run_cli("status", "--backend", "nvml", "--state-dir", str(tmp_path / "s"), cwd=tmp_path)
    assert done.returncode == 0 and "backend nvml: NVML library not found" in done.stdout


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--out", "adir"], "is a directory"),
        (["--out", "missing/r.json"], "missing is not a directory"),
        (["--out", "r.json", "--seconds", "0.3", "--period", "inf"], "--period"),
        (["--out", "r.json", "--seconds", "0.3", "--period", "nan"], "--period"),
        (["--out", "r.json", "--seconds", "1", "--period", "2"], "--period"),
        (["--out", "r.json", "--seconds", "inf"], "--seconds"),
        (["--out", "r.json", "--seconds", "nan"], "--seconds"),
        (["--out", "r.json", "--seconds", "86401"], "--seconds"),
        (["--out", "r.json", "--seconds", "0"], "--seconds"),
    ],
)
def test_nvml_record_refuses_bad_options_before_recording(
    flags: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from graph.cli import main

    class NoSession:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("opened NVML before checking the options")

    monkeypatch.setattr(nvml, "NvmlSession", NoSession)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    assert main(["nvml", "record", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]
    assert not any((tmp_path / "adir").iterdir())


# ---- our own recording of a real H200 (tests/data, made with `gpu-agent nvml record`) -------

RECORDED = Path(__file__).with_name("data") / "h200-recorded.json"


def replayed(rec: Recording, at: float, tmp_path: Path, name: str) -> Orchestrator:
    clock = VirtualClock(start=at)
    lib = FakeNvml(rec, clock.now, origin=rec.start, loop=False)
    backend = NvmlBackend(load_fleet(hardware=True), NvmlSession(lib), name="replay", host="vm")
    return Orchestrator(tmp_path / name, None, backend=backend, clock=clock)


def test_our_h200_recording_replays_through_the_backend(tmp_path: Path) -> None:
    rec = Recording.load(RECORDED)
    phases = {name: (a, b) for name, a, b in rec.phases()}
    assert list(phases) == ["idle", "train"]
    request = {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1}
    with replayed(rec, phases["idle"][1], tmp_path, "a") as orch:  # placed while idle
        (g,) = orch.services.gpus
        assert (g.gpu_type, g.memory_gb, g.model_name) == ("H200", 140.4, "NVIDIA H200")
        idle = orch.status()["gpus"][0]
        # NVML's v2 memory structure: the 615 MiB the driver reserves is not "used"
        assert idle["condition"] == "free" and idle["mem_used_gb"] == 0.0
        placed = orch.request(request, wait=False)
        assert placed.allocation is not None and placed.allocation.gpu_ids == [g.uuid]
        orch.services.clock.sleep(phases["train"][1] - orch.services.clock.now())
        busy = orch.status()["gpus"][0]  # the allocation's job now computes on it
        assert busy["condition"] == "busy" and busy["util_pct"] == 100.0
        assert busy["processes"] == [
            {"pid": rec.samples[0][-1]["procs"][0]["pid"], "used_gb": 0.979}
        ]
        assert busy["power_w"] > 600 and busy["throttled"] is False  # at its power cap: normal


def test_a_free_gpu_running_someone_elses_process_is_not_placed(tmp_path: Path) -> None:
    rec = Recording.load(RECORDED)
    phases = {name: (a, b) for name, a, b in rec.phases()}
    with replayed(rec, phases["train"][1], tmp_path, "b") as orch:  # nobody placed the job
        gpu = orch.status()["gpus"][0]
        assert gpu["condition"] == "in use outside gpu-agent" and not gpu["placeable"]
        out = orch.request(
            {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1}, wait=False
        )
        assert out.status is Status.QUEUED and "0 H200 free" in out.reason
        assert orch.services.ledger.holders() == {}
