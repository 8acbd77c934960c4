"""A recorded GPU played back through the NVML code path: a fake `pynvml` module.

`FakeNvml` answers the calls `fleet.nvml.reader.NvmlSession` makes from a recording in the format of
../shared/fixtures/nvml/h200-phases.json (what `gpu-agent nvml record` writes), so the real
backend's parsing, fallbacks and error handling run without a GPU, the way gpustat's tests
mock NVML at the call boundary. Errors are the binding's own (`pynvml.NVMLError(value)`, which
becomes the same generated subclass the real library raises); a field recorded as an error
marker is raised again. Time is step-and-hold: each query answers with the latest sample at or
before the replayed time, which follows an injected clock and loops at the end by default.

Tests inject faults: an error per call (`faults`), lost GPUs (`lost`), no library
(`library_missing`), XID events (`events`), and refused setters (`root=False`). Setters are
logged in `setter_calls`; a power limit that was set is what later reads return.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from fleet.errors import InvalidInput
from fleet.nvml import reader as nvml

NVMLError = pynvml.NVMLError


@dataclass
class Recording:
    meta: dict[str, Any]
    inventory: list[dict[str, Any]]
    samples: dict[int, list[dict[str, Any]]]  # GPU index -> samples in time order
    events: list[dict[str, Any]] = field(default_factory=list)  # {"t", "gpu", "xid"}

    @property
    def start(self) -> float:
        return float(min(s[0]["t"] for s in self.samples.values()))

    @property
    def end(self) -> float:
        return float(max(s[-1]["t"] for s in self.samples.values()))

    def phases(self, gpu: int = 0) -> list[tuple[str, float, float]]:
        """(phase, first t, last t) in order, for recordings annotated with phases."""
        out: list[tuple[str, float, float]] = []
        for s in self.samples[gpu]:
            phase = s.get("phase", "")
            if out and out[-1][0] == phase:
                out[-1] = (phase, out[-1][1], s["t"])
            else:
                out.append((phase, s["t"], s["t"]))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        p = Path(path)
        try:
            raw = json.loads(p.read_text("utf-8"))
        except FileNotFoundError:
            raise InvalidInput(f"recording {p}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"recording {p}: not a JSON recording ({exc})") from None
        return cls.parse(raw, str(p))

    @classmethod
    def parse(cls, raw: object, source: str = "recording") -> Recording:
        """A recording checked enough that replay cannot fail half-way with a KeyError."""
        if not isinstance(raw, dict):
            raise InvalidInput(f"{source}: expected a JSON object")
        inventory, samples = raw.get("inventory"), raw.get("samples")
        if (
            not isinstance(inventory, list)
            or not inventory
            or not all(isinstance(g, dict) and isinstance(g.get("uuid"), str) for g in inventory)
        ):
            raise InvalidInput(f"{source}: 'inventory' must list GPUs, each with a 'uuid'")
        if not isinstance(samples, list) or not samples:
            raise InvalidInput(f"{source}: 'samples' must be a non-empty list")
        by_gpu: dict[int, list[dict[str, Any]]] = {}
        for i, s in enumerate(samples):
            if not (
                isinstance(s, dict)
                and isinstance(s.get("gpu"), int)
                and 0 <= s["gpu"] < len(inventory)
                and isinstance(s.get("t"), int | float)
                and math.isfinite(s["t"])
            ):
                raise InvalidInput(
                    f"{source}: sample {i} needs 'gpu' (an inventory index) and a finite 't'"
                )
            by_gpu.setdefault(s["gpu"], []).append(s)
        if len(by_gpu) != len(inventory):
            raise InvalidInput(f"{source}: every GPU of the inventory needs samples")
        for rows in by_gpu.values():
            rows.sort(key=lambda s: s["t"])
        events = raw.get("events", [])
        if not isinstance(events, list):
            raise InvalidInput(f"{source}: 'events' must be a list")
        meta = raw.get("meta", {})
        return cls(
            meta if isinstance(meta, dict) else {},
            inventory,
            by_gpu,
            sorted(events, key=lambda e: e["t"]),
        )


@dataclass(frozen=True)
class _Handle:
    index: int


def _error(value: int) -> Exception:
    exc: Exception = NVMLError(value)
    return exc


def _raise_marker(value: Any) -> Any:
    """A recorded value, or the recorded error raised again."""
    if nvml.is_marker(value):
        code = _code_of(getattr(pynvml, str(value.get("class", "")), None))
        raise _error(nvml.UNKNOWN if code is None else code)
    return value


def _code_of(cls: Any) -> int | None:
    """The error value of one of the binding's generated classes."""
    for code, known in NVMLError._valClassMapping.items():
        if known is cls:
            return int(code)
    return None


class FakeNvml:
    NVMLError = NVMLError

    def __init__(
        self,
        recording: Recording,
        clock: Callable[[], float],
        *,
        origin: float | None = None,
        loop: bool = True,
        faults: dict[str, int] | None = None,
        lost: Iterable[int] = (),
        library_missing: bool = False,
        events: Iterable[dict[str, Any]] = (),
        root: bool = True,
    ) -> None:
        self.recording = recording
        self._clock = clock
        self._origin = origin
        self._loop = loop
        self.faults = dict(faults or {})
        self.lost = set(lost)
        self.library_missing = library_missing
        self._events = sorted([*recording.events, *events], key=lambda e: e["t"])
        self._delivered = 0
        self.root = root
        self.setter_calls: list[tuple[str, int, int]] = []
        self._power_limit: dict[int, int] = {}
        self._times = {g: [s["t"] for s in rows] for g, rows in recording.samples.items()}

    # ---- time ------------------------------------------------------------------------------

    def now(self) -> float:
        """The replayed time: the recording's start plus the clock's time since `origin`."""
        now = self._clock()
        if self._origin is None:
            self._origin = now
        rec = self.recording
        elapsed = max(0.0, now - self._origin)
        span = rec.end - rec.start
        if self._loop and span > 0:
            elapsed %= span + self._period()
        return rec.start + elapsed

    def _period(self) -> float:
        return float(self.recording.meta.get("period_s", 0.0) or 0.0)

    def _sample(self, index: int) -> dict[str, Any]:
        times = self._times[index]
        i = max(0, bisect.bisect_right(times, self.now()) - 1)
        return self.recording.samples[index][i]

    def _enter(self, name: str, handle: _Handle | None = None) -> None:
        if name in self.faults:
            raise _error(self.faults[name])
        if handle is not None and (
            handle.index in self.lost or "lost" in self._sample(handle.index)
        ):
            raise _error(nvml.GPU_IS_LOST)

    def _static(self, name: str, handle: _Handle, key: str) -> Any:
        self._enter(name, handle)
        return _raise_marker(
            self.recording.inventory[handle.index].get(
                key, {"nvml_error": "Not Supported", "class": "NVMLError_NotSupported"}
            )
        )

    def _dynamic(self, name: str, handle: _Handle, key: str) -> Any:
        self._enter(name, handle)
        return _raise_marker(
            self._sample(handle.index).get(
                key, {"nvml_error": "Not Supported", "class": "NVMLError_NotSupported"}
            )
        )

    # ---- system ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.library_missing:
            raise _error(nvml.LIBRARY_NOT_FOUND)
        self._enter("nvmlInit")

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return str(self.recording.meta.get("driver", ""))

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return str(self.recording.meta.get("nvml_version", ""))

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion_v2")
        return int(self.recording.meta.get("cuda_driver", 0) or 0)

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.recording.inventory)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.recording.inventory):
            raise _error(nvml.INVALID_ARGUMENT)
        return _Handle(index)

    # ---- static fields ----------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, h: _Handle) -> str:
        return str(self._static("nvmlDeviceGetUUID", h, "uuid"))

    def nvmlDeviceGetName(self, h: _Handle) -> str:
        return str(self._static("nvmlDeviceGetName", h, "name"))

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> SimpleNamespace:
        pci = self._static("nvmlDeviceGetPciInfo", h, "pci")
        return SimpleNamespace(busId=pci.get("busId", ""))

    def nvmlDeviceGetMinorNumber(self, h: _Handle) -> int:
        return int(self._static("nvmlDeviceGetMinorNumber", h, "minor"))

    def nvmlDeviceGetCudaComputeCapability(self, h: _Handle) -> tuple[int, int]:
        cc = self._static("nvmlDeviceGetCudaComputeCapability", h, "cuda_cc")
        return int(cc[0]), int(cc[1])

    def nvmlDeviceGetMigMode(self, h: _Handle) -> tuple[int, int]:
        mode = self._static("nvmlDeviceGetMigMode", h, "mig_mode")
        return int(mode[0]), int(mode[1])

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: _Handle) -> tuple[int, int]:
        lo, hi = self._static(
            "nvmlDeviceGetPowerManagementLimitConstraints", h, "power_limit_constraints"
        )
        return int(lo), int(hi)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: _Handle) -> int:
        return int(self._static("nvmlDeviceGetPowerManagementDefaultLimit", h, "power_default"))

    def nvmlDeviceGetPowerManagementLimit(self, h: _Handle) -> int:
        value = int(self._static("nvmlDeviceGetPowerManagementLimit", h, "power_limit"))
        return self._power_limit.get(h.index, value)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: _Handle) -> int:
        value = int(self._static("nvmlDeviceGetEnforcedPowerLimit", h, "enforced_power"))
        return self._power_limit.get(h.index, value)

    def nvmlDeviceGetTemperatureThreshold(self, h: _Handle, which: int) -> int:
        key = {
            nvml.THRESHOLD_SLOWDOWN: "temp_slowdown",
            nvml.THRESHOLD_SHUTDOWN: "temp_shutdown",
            nvml.THRESHOLD_GPU_MAX: "temp_gpu_max",
        }.get(which, "")
        return int(self._static("nvmlDeviceGetTemperatureThreshold", h, key))

    def nvmlDeviceGetMaxClockInfo(self, h: _Handle, clock: int) -> int:
        key = "max_sm_clock" if clock == nvml.CLOCK_SM else "max_mem_clock"
        return int(self._static("nvmlDeviceGetMaxClockInfo", h, key))

    # ---- dynamic fields ---------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> SimpleNamespace:
        util = self._dynamic("nvmlDeviceGetUtilizationRates", h, "util")
        return SimpleNamespace(gpu=util["gpu"], memory=util["memory"])

    def nvmlDeviceGetMemoryInfo(self, h: _Handle, version: int | None = None) -> SimpleNamespace:
        name = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        mem = self._dynamic(name, h, "mem")
        out = SimpleNamespace(total=mem["total"], free=mem["free"], used=mem["used"])
        if version:
            out.reserved = mem.get("reserved", 0)
        return out

    def nvmlDeviceGetTemperatureV(self, h: _Handle, sensor: int) -> int:
        return int(self._dynamic("nvmlDeviceGetTemperatureV", h, "temp"))

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        return int(self._dynamic("nvmlDeviceGetTemperature", h, "temp"))

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:
        return int(self._dynamic("nvmlDeviceGetPowerUsage", h, "power_mW"))

    def nvmlDeviceGetClockInfo(self, h: _Handle, clock: int) -> int:
        key = "sm_clock" if clock == nvml.CLOCK_SM else "mem_clock"
        return int(self._dynamic("nvmlDeviceGetClockInfo", h, key))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: _Handle) -> int:
        return int(
            self._dynamic("nvmlDeviceGetCurrentClocksEventReasons", h, "clock_event_reasons")
        )

    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list[SimpleNamespace]:
        procs = self._dynamic("nvmlDeviceGetComputeRunningProcesses", h, "procs")
        return [
            SimpleNamespace(
                pid=p["pid"],
                usedGpuMemory=p.get("usedGpuMemory"),
                gpuInstanceId=p.get("gpuInstanceId", 0xFFFFFFFF),
                computeInstanceId=p.get("computeInstanceId", 0xFFFFFFFF),
            )
            for p in procs
        ]

    # ---- events -----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> object:
        self._enter("nvmlEventSetCreate")
        return object()

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._enter("nvmlEventSetFree")

    def nvmlDeviceGetSupportedEventTypes(self, h: _Handle) -> int:
        self._enter("nvmlDeviceGetSupportedEventTypes", h)
        return nvml.EVENT_XID

    def nvmlDeviceRegisterEvents(self, h: _Handle, types: int, event_set: object) -> None:
        self._enter("nvmlDeviceRegisterEvents", h)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait_v2")
        if self._delivered < len(self._events) and self._events[self._delivered]["t"] <= self.now():
            event = self._events[self._delivered]
            self._delivered += 1
            return SimpleNamespace(
                device=_Handle(int(event["gpu"])),
                eventType=nvml.EVENT_XID,
                eventData=int(event["xid"]),
            )
        raise _error(nvml.TIMEOUT)

    # ---- setters ----------------------------------------------------------------------------

    def nvmlDeviceSetPowerManagementLimit(self, h: _Handle, milliwatts: int) -> None:
        self._enter("nvmlDeviceSetPowerManagementLimit", h)
        if not self.root:
            raise _error(nvml.NO_PERMISSION)
        lo, hi = self.nvmlDeviceGetPowerManagementLimitConstraints(h)
        if not lo <= milliwatts <= hi:
            raise _error(nvml.INVALID_ARGUMENT)
        self.setter_calls.append(("nvmlDeviceSetPowerManagementLimit", h.index, milliwatts))
        self._power_limit[h.index] = milliwatts
