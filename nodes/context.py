"""The runtime context and the services it resolves to.

Nodes get the fleet backend, ledger, clock and council through LangGraph's runtime context.
In-process callers (the Orchestrator, tests, notebooks) inject a ready `Services`; callers
that can only send JSON (the LangGraph server, Studio) send the plain fields, which resolve to
services opened once per process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from langgraph.runtime import Runtime

from council.voting import Council, council_for
from fleet.backend import FleetBackend
from fleet.clock import Clock, WakeToken
from fleet.config import FleetConfig, load_fleet
from fleet.errors import InvalidInput
from fleet.ledger import Ledger
from fleet.models import GPUInfo, Release, ReleaseReason
from fleet.simulated import SimulatedFleet
from fleet.statedir import LEDGER, clock_for, default_state_dir, prepare
from fleet.topology import Topology
from fleet.validation import check_budget

BACKENDS = ("simulated",)


@dataclass
class Services:
    config: FleetConfig
    backend: FleetBackend
    ledger: Ledger
    clock: Clock
    state_dir: Path
    chosen_council: Council | None = None
    inventory: list[GPUInfo] = field(init=False)
    topology: Topology = field(init=False)
    _wakers: dict[str, WakeToken] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.inventory = self.backend.inventory()
        self.topology = Topology(self.config, self.inventory)

    @property
    def council(self) -> Council:
        """Loaded on first use: commands that never convene it do not pay for torch."""
        if self.chosen_council is None:
            self.chosen_council = council_for(self.config.council)
        return self.chosen_council

    def waker(self, allocation_id: str) -> WakeToken:
        """The token that ends this allocation's monitor or queue sleep early."""
        with self._lock:
            token = self._wakers.get(allocation_id)
            if token is None:
                token = self._wakers[allocation_id] = self.clock.token()
            return token

    def wake(self, allocation_id: str) -> None:
        self.waker(allocation_id).set()

    def wake_waiters(self, freed: str) -> None:
        """Allocation `freed` let its GPUs go: the queued requests in this process that can
        start now retry now, not at their next poll."""
        for aid in self.ledger.placeable(self.ledger.get(freed), self.clock.now(),
                                         self.inventory):
            with self._lock:
                token = self._wakers.get(aid)
            if token is not None:
                token.set()

    def release(self, allocation_id: str, reason: ReleaseReason) -> Release:
        """Release now (or cancel a queued request); its monitor and the queue hear at once.
        A second release returns the first."""
        release = self.ledger.release(allocation_id, reason, self.clock.now())
        self.wake(allocation_id)
        self.wake_waiters(allocation_id)
        return release

    def forget(self, allocation_id: str) -> None:
        with self._lock:
            self._wakers.pop(allocation_id, None)

    def set_budget(self, project: str, budget_usd: float) -> list[str]:
        """Set a project's budget; the monitors of allocations whose deadline moved hear at
        once. Returns their ids."""
        check_budget(project, budget_usd)
        moved = self.ledger.set_budget(project, budget_usd, self.clock.now())
        for row in moved:
            self.wake(row.id)
        return [row.id for row in moved]

    def close(self) -> None:
        self.ledger.close()


def make_backend(name: str, config: FleetConfig) -> FleetBackend:
    if name == "simulated":
        return SimulatedFleet(config)
    raise InvalidInput(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")


def open_services(
    state_dir: str | Path | None = None,
    fleet: FleetConfig | str | Path | None = None,
    *,
    backend: str | FleetBackend = "simulated",
    clock: Clock | None = None,
    council: Council | None = None,
    create: bool = True,
    durable: bool = True,
) -> Services:
    config = fleet if isinstance(fleet, FleetConfig) else load_fleet(fleet)
    directory = prepare(state_dir or default_state_dir(), create=create)
    fleet_backend = make_backend(backend, config) if isinstance(backend, str) else backend
    return Services(
        config=config,
        backend=fleet_backend,
        ledger=Ledger(directory / LEDGER, config, durable=durable),
        clock=clock or clock_for(directory, config.clock),
        chosen_council=council,
        state_dir=directory,
    )


@dataclass(kw_only=True)
class Context:
    """Where the graph finds its fleet. Every field has a default, so a bare run works."""

    state_dir: str = field(
        default_factory=lambda: str(default_state_dir()),
        metadata={"description": "State directory holding the ledger and checkpoints "
                  "(env GPU_AGENT_HOME, default ./.gpu-agent)."},
    )
    fleet_file: str | None = field(
        default_factory=lambda: os.environ.get("GPU_AGENT_FLEET") or None,
        metadata={"description": "Fleet TOML file (env GPU_AGENT_FLEET); the default "
                  "simulated fleet when empty."},
    )
    backend: str = field(
        default_factory=lambda: os.environ.get("GPU_AGENT_BACKEND") or "simulated",
        metadata={"description": "Inventory backend (env GPU_AGENT_BACKEND): simulated."},
    )
    services: Services | None = field(
        default=None,
        metadata={"description": "Ready services injected in-process; overrides the fields "
                  "above."},
    )


_opened: dict[tuple[str, str | None, str], Services] = {}
_opened_lock = threading.Lock()


def services_for(runtime: Runtime[Context]) -> Services:
    ctx = runtime.context if runtime.context is not None else Context()
    if ctx.services is not None:
        return ctx.services
    key = (str(Path(ctx.state_dir).resolve()), ctx.fleet_file, ctx.backend)
    with _opened_lock:
        if key not in _opened:
            _opened[key] = open_services(ctx.state_dir, ctx.fleet_file, backend=ctx.backend)
        return _opened[key]
