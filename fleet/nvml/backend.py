"""The fleet backend for real NVIDIA GPUs (and for recordings of them, through a fake NVML).

- Inventory: every GPU NVML sees on this host, keyed by UUID; its type is the catalog entry
  its name contains ("NVIDIA H100 80GB HBM3" -> H100). A GPU whose type the fleet file does not
  price is listed but never placed (`unpriced`).
- No driver or library: an empty inventory and the reason in `problem`, never a crash and
  never a silent switch to the simulated fleet.
- Health: an XID critical error (other than the application XIDs) or a lost GPU marks the GPU
  unhealthy; `unhealthy()` hands each one over once, for the ledger to take out of placement.
- Overheating: by default a warning and an event. With `allow_power_cap` the power limit is
  lowered (root only; it changes the card for everyone), the previous limit is kept in
  `power-caps.json` in the state directory first, and restored on release and, after a crash,
  at the next start-up.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleet.config import FleetConfig
from fleet.errors import StateDirError
from fleet.models import GPUInfo, GPUProcess, GPUSample, utc
from fleet.nvml import reader as nvml
from fleet.nvml.reader import NvmlSession, NvmlUnavailable, Reading, is_marker

GIB = float(2**30)
POWER_CAP_SHARE = 0.8  # a capped GPU runs at 80 % of its limit, never under the card's minimum
POWER_CAPS = "power-caps.json"
_VENDOR_WORDS = re.compile(r"\b(NVIDIA|TESLA|GEFORCE|QUADRO)\b")


def gpu_type_of(name: str, catalog: Mapping[str, object]) -> str:
    """The catalog type a device name names (the longest match), else the model's own word."""
    flat = re.sub(r"[^A-Z0-9]", "", name.upper())
    hits = [t for t in catalog if re.sub(r"[^A-Z0-9]", "", t.upper()) in flat]
    if hits:
        return max(hits, key=len)
    words = _VENDOR_WORDS.sub(" ", name.upper()).split()
    return words[0] if words else name


def _process(p: dict[str, Any]) -> GPUProcess:
    used = p.get("usedGpuMemory")  # None where the driver does not say
    return GPUProcess(pid=p["pid"], used_gb=None if used is None else round(used / GIB, 3))


def _num(value: Any) -> float | None:
    return None if value is None or is_marker(value) else float(value)


class NvmlBackend:
    hardware = True

    def __init__(
        self,
        config: FleetConfig,
        session: NvmlSession,
        *,
        name: str = "nvml",
        host: str | None = None,
        state_dir: Path | None = None,
        allow_power_cap: bool = False,
    ) -> None:
        if allow_power_cap and state_dir is None:
            raise ValueError("power capping needs a state directory to remember the limits")
        self.name = name
        self._config = config
        self._session = session
        self.host = host or socket.gethostname()
        self.allow_power_cap = allow_power_cap
        self._caps_file = state_dir / POWER_CAPS if state_dir is not None else None
        self.problem: str | None = None
        self._inventory: list[GPUInfo] = []
        self._index: dict[str, int] = {}
        self._bad: dict[str, str] = {}  # uuid -> why it is unusable
        self._new: list[str] = []  # found and not yet handed over by unhealthy()
        try:
            session.open()
        except NvmlUnavailable as exc:
            self.problem = str(exc)
            return
        self._inventory = self._discover()
        self._index = {g.uuid: g.index for g in self._inventory}

    def close(self) -> None:
        self._session.close()

    # ---- inventory ---------------------------------------------------------------------------

    def _discover(self) -> list[GPUInfo]:
        infos = [self._session.static(i) for i in range(len(self._session.handles))]
        types = [gpu_type_of(str(info["name"]), self._config.catalog) for info in infos]
        mixed = len(set(types)) > 1
        out = []
        for info, gpu_type in zip(infos, types, strict=True):
            mem = info["memory"]
            pci = info["pci"]
            out.append(
                GPUInfo(
                    uuid=info["uuid"],
                    gpu_type=gpu_type,
                    node=f"{self.host}/{gpu_type}" if mixed else self.host,
                    index=info["index"],
                    memory_gb=0.0 if is_marker(mem) else round(mem["total"] / GIB, 1),
                    model_name=str(info["name"]),
                    pci_bus_id=None if is_marker(pci) else pci["busId"],
                    mig=not is_marker(info["mig_mode"]) and bool(info["mig_mode"][0]),
                )
            )
        return out

    def inventory(self) -> list[GPUInfo]:
        return list(self._inventory)

    def unpriced(self) -> list[GPUInfo]:
        """GPUs whose type the fleet file's catalog does not price: shown, never placed."""
        return [g for g in self._inventory if g.gpu_type not in self._config.catalog]

    # ---- readings ----------------------------------------------------------------------------

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        self._poll_events()
        return [
            self._to_sample(g, self._session.read(self._index[g], now), now)
            if g in self._index
            else GPUSample(gpu_id=g, at=utc(now))  # not on this host
            for g in gpu_ids
        ]

    def _to_sample(self, uuid: str, r: Reading, now: float) -> GPUSample:
        if "lost" in r:
            self._flag(uuid, str(r["lost"]))
            return GPUSample(gpu_id=uuid, at=utc(now), health=self._bad[uuid])
        mem, util, reasons, procs = r["mem"], r["util"], r["clock_event_reasons"], r["procs"]
        power = _num(r["power_mW"])
        return GPUSample(
            gpu_id=uuid,
            at=utc(now),
            util_pct=None if is_marker(util) else float(util["gpu"]),
            mem_used_gb=None if is_marker(mem) else round(mem["used"] / GIB, 3),
            mem_total_gb=None if is_marker(mem) else round(mem["total"] / GIB, 3),
            temp_c=_num(r["temp"]),
            power_w=None if power is None else round(power / 1000.0, 1),
            throttled=not is_marker(reasons) and bool(int(reasons) & nvml.SLOWDOWN_REASONS),
            sm_clock_mhz=_num(r["sm_clock"]),
            mem_clock_mhz=_num(r["mem_clock"]),
            processes=None if is_marker(procs) else [_process(p) for p in procs],
            health=self._bad.get(uuid),
        )

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        return at  # real readings promise nothing

    # ---- health ------------------------------------------------------------------------------

    def _poll_events(self) -> None:
        for uuid, xid in self._session.events():
            if uuid == "":  # the event wait failed: NVML itself is in trouble
                for g in self._index:
                    self._flag(g, "NVML event wait failed")
            elif xid not in nvml.APPLICATION_XIDS and uuid in self._index:
                self._flag(uuid, f"XID {xid}")

    def _flag(self, uuid: str, reason: str) -> None:
        if uuid not in self._bad:
            self._bad[uuid] = reason
            self._new.append(uuid)

    def unhealthy(self) -> dict[str, str]:
        self._poll_events()
        found, self._new = self._new, []
        return {g: self._bad[g] for g in found}

    # ---- throttling --------------------------------------------------------------------------

    def throttle(self, gpu_id: str) -> str:
        if not self.allow_power_cap:
            return (
                "warning only: lowering the power limit changes the card for everyone and "
                "needs root, so it is off (--allow-power-cap turns it on)"
            )
        index = self._index[gpu_id]
        caps = self._caps()
        if gpu_id in caps:
            return f"already capped at {caps[gpu_id]['capped_mw'] / 1000:.0f} W"
        current = self._session.call(index, "nvmlDeviceGetPowerManagementLimit")
        limits = self._session.call(index, "nvmlDeviceGetPowerManagementLimitConstraints")
        if is_marker(current) or is_marker(limits):
            return "warning only: this GPU does not report its power limits"
        target = max(int(limits[0]), int(current * POWER_CAP_SHARE))
        if target >= current:
            return "warning only: the power limit is already at the card's minimum"
        caps[gpu_id] = {"original_mw": int(current), "capped_mw": target}
        self._save(caps)  # before the change, so a crash right after it still restores
        try:
            self._session.set_power_limit(index, target)
        except self._session.lib.NVMLError as exc:
            del caps[gpu_id]
            self._save(caps)
            return f"warning only: NVML refused the power limit ({exc})"
        return f"power limit lowered {current / 1000:.0f} W -> {target / 1000:.0f} W"

    def reset(self, gpu_ids: list[str]) -> None:
        """Restore the power limits this backend lowered on these GPUs (also those a crashed
        process left: the start-up calls this for every GPU no allocation holds)."""
        caps = self._caps()
        mine = [g for g in gpu_ids if g in caps and g in self._index]
        for g in mine:
            try:
                self._session.set_power_limit(self._index[g], caps[g]["original_mw"])
            except self._session.lib.NVMLError:
                continue  # kept in the file: the next start-up tries again
            del caps[g]
        if mine:
            self._save(caps)

    def _caps(self) -> dict[str, dict[str, int]]:
        """The limits lowered and not yet restored, shared by every process of the state dir."""
        if self._caps_file is None or not self._caps_file.exists():
            return {}
        try:
            caps: dict[str, dict[str, int]] = json.loads(self._caps_file.read_text())
        except (OSError, ValueError) as exc:
            raise StateDirError(
                f"{self._caps_file} is unreadable ({exc}); it holds the power limits to "
                "restore: restore them with nvidia-smi -pl, then delete the file"
            ) from None
        return caps

    def _save(self, caps: dict[str, dict[str, int]]) -> None:
        if self._caps_file is None:
            return
        tmp = self._caps_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(caps, indent=1, sort_keys=True))
        os.replace(tmp, self._caps_file)
