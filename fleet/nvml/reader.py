"""Reading GPUs through NVML (nvidia-ml-py's `pynvml`), one field at a time.

Any single field may fail (NotSupported on a VM, FunctionNotFound on an old driver): it then
reads as an error marker, `{"nvml_error": ..., "class": ...}`, never as a failed read, and the
function is not called again for that GPU. Errors are matched by NVML's error value, never by
the class names the binding generates at import time. The readings are plain dicts in the
format of a recording (../shared/fixtures/nvml/h200-phases.json), so the recorder writes them
as they are and the replay serves them back through the same code.

The NVML module is injected: `pynvml` on a real host, `fleet.nvml.replay.FakeNvml` in tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from fleet.errors import GPUAgentError

# NVML_ERROR_* values (nvml.h; stable across drivers).
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NO_PERMISSION = 4
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
RESET_REQUIRED = 16
LIB_RM_VERSION_MISMATCH = 18
ARGUMENT_VERSION_MISMATCH = 25
GPU_NOT_FOUND = 28
UNKNOWN = 999

NO_DRIVER = {
    LIBRARY_NOT_FOUND: "NVML library not found (no NVIDIA driver on this host, or a container "
    "without the NVIDIA runtime)",
    DRIVER_NOT_LOADED: "the NVIDIA driver is not loaded",
    LIB_RM_VERSION_MISMATCH: "the NVIDIA driver was upgraded without a reboot (NVML/RM "
    "version mismatch)",
}
LOST = {
    GPU_IS_LOST: "GPU is lost",
    RESET_REQUIRED: "GPU requires a reset",
    GPU_NOT_FOUND: "GPU not found",
}
# The call is missing or refused for this GPU: do not ask again.
PERMANENT = {NOT_SUPPORTED, FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH, NO_PERMISSION}

# nvml.h constants the reader passes (values, so a fake module need not define them).
TEMPERATURE_GPU = 0
THRESHOLD_SHUTDOWN, THRESHOLD_SLOWDOWN, THRESHOLD_GPU_MAX = 0, 1, 3
CLOCK_SM, CLOCK_MEM = 1, 2
MEMORY_V2 = 0x02000028
EVENT_XID = 0x0000000000000008
# Clock-event reasons that mean the GPU is being slowed down against its will (SwPowerCap is
# left out: a training job sits at its power cap as a matter of course).
SLOWDOWN_REASONS = 0x08 | 0x20 | 0x40 | 0x80  # HwSlowdown, Sw/HwThermal, HwPowerBrake
# XIDs the Kubernetes device plugin treats as application errors, not a broken GPU.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

Reading = dict[str, Any]


class NvmlUnavailable(GPUAgentError):
    """No usable NVML on this host."""


class DeviceLost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def marker(lib: Any, value: int) -> dict[str, str]:
    """An error as a recording stores it: the binding's message and class name."""
    exc = lib.NVMLError(value)
    return {"nvml_error": str(exc), "class": type(exc).__name__}


def is_marker(value: object) -> bool:
    return isinstance(value, dict) and "nvml_error" in value


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class NvmlSession:
    """One NVML initialisation and the GPUs it sees, keyed by index (PCI order)."""

    def __init__(self, lib: Any = None, *, timed: bool = False) -> None:
        if lib is None:
            import pynvml  # the ctypes binding; it loads libnvidia-ml only at nvmlInit

            lib = pynvml
        self.lib: Any = lib
        self.handles: list[Any] = []
        self.uuids: list[str] = []
        self._skip: set[tuple[int, str, tuple[Any, ...]]] = set()  # calls failed for good
        self._events: Any = None
        self._timed = timed
        self.latency: dict[str, list[float]] = {}  # call -> microseconds, when timed
        self.opened = False

    # ---- opening -----------------------------------------------------------------------

    def open(self) -> None:
        """Initialise NVML and find the GPUs; NvmlUnavailable with the reason if it cannot."""
        if self.opened:
            return
        try:
            self.lib.nvmlInit()
        except self.lib.NVMLError as exc:
            why = NO_DRIVER.get(exc.value, f"NVML failed to initialise: {exc}")
            raise NvmlUnavailable(why) from None
        count = self.lib.nvmlDeviceGetCount()
        self.handles = [self.lib.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.uuids = [_text(self.lib.nvmlDeviceGetUUID(h)) for h in self.handles]
        self._register_events()
        self.opened = True

    def close(self) -> None:
        if not self.opened:
            return
        self.opened = False
        if self._events is not None:
            self._quiet(self.lib.nvmlEventSetFree, self._events)
            self._events = None
        self._quiet(self.lib.nvmlShutdown)

    def _quiet(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(self.lib.NVMLError):
            fn(*args)

    def system(self) -> dict[str, Any]:
        """Driver, NVML and CUDA driver versions."""
        out: dict[str, Any] = {}
        for key, call in (
            ("driver", "nvmlSystemGetDriverVersion"),
            ("nvml_version", "nvmlSystemGetNVMLVersion"),
            ("cuda_driver", "nvmlSystemGetCudaDriverVersion_v2"),
        ):
            try:
                out[key] = _text(getattr(self.lib, call)())
            except (self.lib.NVMLError, AttributeError):
                out[key] = None
        return out

    # ---- one field ------------------------------------------------------------------------

    def call(self, index: int, name: str, *args: Any, **kwargs: Any) -> Any:
        """lib.name(handle, *args): its value, or an error marker. A lost GPU raises
        DeviceLost; a call that failed for good is not made again."""
        key = (index, name, (*args, *sorted(kwargs.items())))
        if key in self._skip:
            return marker(self.lib, NOT_SUPPORTED)
        fn = getattr(self.lib, name, None)
        if fn is None:  # an older binding
            self._skip.add(key)
            return marker(self.lib, FUNCTION_NOT_FOUND)
        start = time.perf_counter() if self._timed else 0.0
        try:
            value = fn(self.handles[index], *args, **kwargs)
        except self.lib.NVMLError as exc:
            if exc.value in LOST:
                raise DeviceLost(LOST[exc.value]) from None
            if exc.value in PERMANENT:
                self._skip.add(key)
            return marker(self.lib, exc.value)
        finally:
            if self._timed:
                self.latency.setdefault(name, []).append((time.perf_counter() - start) * 1e6)
        return value

    def _first(self, index: int, *calls: tuple[str, tuple[Any, ...], dict[str, Any]]) -> Any:
        """The first call that answers; the last marker if none does (newer calls first)."""
        value: Any = None
        for name, args, kwargs in calls:
            value = self.call(index, name, *args, **kwargs)
            if not is_marker(value):
                return value
        return value

    # ---- static fields ----------------------------------------------------------------------

    def static(self, index: int) -> Reading:
        """What does not change while the GPU runs (the recording's `inventory` entry)."""

        def get(name: str, *args: Any, **kwargs: Any) -> Any:
            return self.call(index, name, *args, **kwargs)

        pci = get("nvmlDeviceGetPciInfo")
        memory = self._memory(index)
        info: Reading = {
            "name": _text(get("nvmlDeviceGetName")),
            "uuid": self.uuids[index],
            "pci": pci if is_marker(pci) else {"busId": _text(pci.busId)},
            "memory": memory,
            "cuda_cc": _plain(get("nvmlDeviceGetCudaComputeCapability")),
            "mig_mode": _plain(get("nvmlDeviceGetMigMode")),
            "power_limit": get("nvmlDeviceGetPowerManagementLimit"),
            "power_limit_constraints": _plain(get("nvmlDeviceGetPowerManagementLimitConstraints")),
            "power_default": get("nvmlDeviceGetPowerManagementDefaultLimit"),
            "enforced_power": get("nvmlDeviceGetEnforcedPowerLimit"),
            "temp_slowdown": get("nvmlDeviceGetTemperatureThreshold", THRESHOLD_SLOWDOWN),
            "temp_shutdown": get("nvmlDeviceGetTemperatureThreshold", THRESHOLD_SHUTDOWN),
            "temp_gpu_max": get("nvmlDeviceGetTemperatureThreshold", THRESHOLD_GPU_MAX),
            "max_sm_clock": get("nvmlDeviceGetMaxClockInfo", CLOCK_SM),
            "max_mem_clock": get("nvmlDeviceGetMaxClockInfo", CLOCK_MEM),
            "minor": get("nvmlDeviceGetMinorNumber"),
            "index": index,
        }
        return info

    # ---- one reading ----------------------------------------------------------------------

    def read(self, index: int, t: float) -> Reading:
        """The dynamic fields now (the recording's `samples` row), or {"lost": reason}."""
        try:
            util = self.call(index, "nvmlDeviceGetUtilizationRates")
            procs = self._first(
                index,
                ("nvmlDeviceGetComputeRunningProcesses", (), {}),
                ("nvmlDeviceGetComputeRunningProcesses_v2", (), {}),
            )
            return {
                "t": t,
                "gpu": index,
                "util": util if is_marker(util) else {"gpu": util.gpu, "memory": util.memory},
                "mem": self._memory(index),
                "temp": self._first(
                    index,
                    ("nvmlDeviceGetTemperatureV", (TEMPERATURE_GPU,), {}),
                    ("nvmlDeviceGetTemperature", (TEMPERATURE_GPU,), {}),
                ),
                "power_mW": self.call(index, "nvmlDeviceGetPowerUsage"),
                "sm_clock": self.call(index, "nvmlDeviceGetClockInfo", CLOCK_SM),
                "mem_clock": self.call(index, "nvmlDeviceGetClockInfo", CLOCK_MEM),
                "clock_event_reasons": self._first(
                    index,
                    ("nvmlDeviceGetCurrentClocksEventReasons", (), {}),
                    ("nvmlDeviceGetCurrentClocksThrottleReasons", (), {}),
                ),
                "procs": procs
                if is_marker(procs)
                else [{"pid": p.pid, "usedGpuMemory": p.usedGpuMemory} for p in procs],
            }
        except DeviceLost as lost:
            return {"t": t, "gpu": index, "lost": lost.reason}

    def _memory(self, index: int) -> Any:
        """Memory through the v2 structure (v1's `used` counts reserved memory, hundreds of
        MiB on an idle card), falling back to v1 on drivers without it."""
        mem = self._first(
            index,
            ("nvmlDeviceGetMemoryInfo", (), {"version": MEMORY_V2}),
            ("nvmlDeviceGetMemoryInfo", (), {}),
        )
        if is_marker(mem):
            return mem
        out = {"total": mem.total, "free": mem.free, "used": mem.used}
        reserved = getattr(mem, "reserved", None)
        return out if reserved is None else out | {"reserved": reserved}

    # ---- health events ----------------------------------------------------------------------

    def _register_events(self) -> None:
        """XID critical errors on every GPU that reports them (where the driver cannot,
        e.g. some VMs, health rests on lost-GPU errors alone)."""
        try:
            self._events = self.lib.nvmlEventSetCreate()
        except (self.lib.NVMLError, AttributeError):
            return
        for index, handle in enumerate(self.handles):
            supported = self.call(index, "nvmlDeviceGetSupportedEventTypes")
            if is_marker(supported) or not supported & EVENT_XID:
                continue
            try:
                self.lib.nvmlDeviceRegisterEvents(handle, EVENT_XID, self._events)
            except self.lib.NVMLError:
                continue

    def events(self) -> list[tuple[str, int]]:
        """(GPU uuid, XID) of the critical errors since the last call; never blocks."""
        if self._events is None:
            return []
        out = []
        while True:
            try:
                data = self.lib.nvmlEventSetWait_v2(self._events, 0)
            except self.lib.NVMLError as exc:
                if exc.value != TIMEOUT:
                    out.append(("", -1))  # the wait itself failed: the caller decides
                return out
            if data.eventType & EVENT_XID:
                out.append((_text(self.lib.nvmlDeviceGetUUID(data.device)), int(data.eventData)))

    # ---- setters (root only; used only with --allow-power-cap) ---------------------------------

    def set_power_limit(self, index: int, milliwatts: int) -> None:
        self.lib.nvmlDeviceSetPowerManagementLimit(self.handles[index], milliwatts)


def _plain(value: Any) -> Any:
    """A tuple answer as a list (as JSON keeps it); markers and scalars as they are."""
    return list(value) if isinstance(value, tuple) else value
