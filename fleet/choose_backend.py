"""Choosing the inventory backend: simulated, nvml, replay, auto (nvml where a driver is), or a
cluster: ray, slurm.

The simulated fleet is only ever chosen by name: `auto` on a host with an NVIDIA driver picks
nvml, and says which it picked either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import InvalidInput

if TYPE_CHECKING:  # each backend's modules load when it is made: a command pays for its own
    from fleet.clock import Clock
    from fleet.config import FleetConfig
    from fleet.fleet_backend import FleetBackend
    from fleet.nvml.reader import NvmlSession

BACKENDS = ("simulated", "nvml", "replay", "auto", "ray", "slurm")
# What an NVIDIA driver makes: the control device (containers get it from the NVIDIA runtime)
# and the kernel module's /proc entry.
_DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia")


@dataclass(frozen=True)
class BackendChoice:
    name: str = "simulated"
    replay: str | None = None  # the recording `replay` plays
    allow_power_cap: bool = False
    ray_address: str | None = None  # the Ray cluster (None: RAY_ADDRESS, else a local one)

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise InvalidInput(f"unknown backend {self.name!r} (use {', '.join(BACKENDS)})")
        if self.name == "replay" and not self.replay:
            raise InvalidInput(
                "the replay backend needs a recording (--replay FILE or env GPU_AGENT_REPLAY)"
            )


@dataclass(frozen=True)
class Resolved:
    name: str  # simulated, nvml or replay
    note: str | None = None  # what `auto` picked, for the user
    session: NvmlSession | None = None  # auto's NVML, already open

    @property
    def hardware(self) -> bool:
        return self.name != "simulated"


def resolve(choice: BackendChoice) -> Resolved:
    """`auto` made concrete: nvml if NVML opens on this host, else simulated."""
    if choice.name != "auto":
        return Resolved(choice.name)
    from fleet.nvml.reader import NvmlSession, NvmlUnavailable

    session = NvmlSession()
    try:
        session.open()
    except NvmlUnavailable as exc:
        return Resolved("simulated", f"backend auto: simulated ({exc})")
    return Resolved("nvml", f"backend auto: nvml ({len(session.handles)} GPU(s))", session)


def make_backend(
    resolved: Resolved, choice: BackendChoice, config: FleetConfig, *, clock: Clock, state_dir: Path
) -> FleetBackend:
    if resolved.name == "simulated":
        from fleet.simulated import SimulatedFleet

        return SimulatedFleet(config)
    if resolved.name == "ray":
        from fleet.ray_backend import RayFleet  # the optional `ray` extra

        return RayFleet(config, choice.ray_address)
    if resolved.name == "slurm":
        from fleet.slurm.backend import SlurmFleet  # the cluster SLURM_CONF (else /etc) names

        return SlurmFleet(config)
    from fleet.nvml.backend import NvmlBackend
    from fleet.nvml.reader import NvmlSession

    if resolved.name == "replay":
        from fleet.nvml.replay import FakeNvml, Recording

        assert choice.replay is not None
        lib = FakeNvml(Recording.load(choice.replay), clock.now)
        return NvmlBackend(
            config,
            NvmlSession(lib),
            name="replay",
            host="replay",
            state_dir=state_dir,
            allow_power_cap=choice.allow_power_cap,
        )
    return NvmlBackend(
        config,
        resolved.session or NvmlSession(),
        state_dir=state_dir,
        allow_power_cap=choice.allow_power_cap,
    )


def placeable_fleet(config: FleetConfig, backend: FleetBackend) -> FleetConfig:
    """The policy over what the backend has: a hardware backend's priced GPUs are the nodes."""
    if not backend.hardware:
        return config
    return config.with_inventory([g for g in backend.inventory() if g.gpu_type in config.catalog])


def gpus_present() -> int:
    """How many GPUs NVML sees here (0 without a driver): a default that simulates on a GPU
    host says so. Without the driver's device nodes NVML cannot open, so it is not loaded:
    every command without --backend asks, and on a host without GPUs that costs nothing."""
    if not any(os.path.exists(p) for p in _DRIVER_PATHS):
        return 0
    from fleet.nvml.reader import NvmlSession, NvmlUnavailable

    session = NvmlSession()
    try:
        session.open()
    except NvmlUnavailable:
        return 0
    try:
        return len(session.handles)
    finally:
        session.close()
