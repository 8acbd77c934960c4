"""What the command handlers share: what a command opens (the ledger alone, Records, or the
graph too, the Orchestrator) on the fleet file, backend and database its options or the
environment name, and how it prints a result (text, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from fleet.choose_backend import BackendChoice, gpus_present
from fleet.config import FleetConfig
from fleet.errors import flat
from fleet.services import Services
from graph.records import Records

# Only light modules above: the commands that read or write the ledger (status, costs,
# release, history, ...) use Records and never load LangGraph, torch or networkx. What runs
# the graph (the Orchestrator) is imported by the handlers that need it, as is anything heavy.
if TYPE_CHECKING:
    from graph.orchestrator import Orchestrator


def open_orchestrator(
    args: argparse.Namespace,
    *,
    create: bool,
    config: FleetConfig | None = None,
    choice: BackendChoice | None = None,
    pool_size: int = 8,
    kind: str = "cli",
    say_problem: bool = True,
) -> Orchestrator:
    """For the commands that run threads: the graph and its checkpointer (LangGraph).
    `say_problem=False`: a command that places GPUs refuses with the backend's problem
    itself, so it is not said twice."""
    from graph.orchestrator import Orchestrator

    orch = Orchestrator(
        args.state_dir,
        config or fleet_file(args),
        backend=choice or backend_choice(args),
        create=create,
        database=database_url(args),
        pool_size=pool_size,
        monitor_kind=kind,
    )
    say_backend(orch.services, say_problem)
    return orch


def open_records(args: argparse.Namespace, *, create: bool) -> Records:
    """For the commands that only read or write the ledger: no graph, no checkpointer."""
    records = Records(
        args.state_dir,
        fleet_file(args),
        backend=backend_choice(args),
        create=create,
        database=database_url(args),
    )
    say_backend(records.services)
    return records


def say_backend(services: Services, say_problem: bool = True) -> None:
    if services.note:
        print(f"gpu-agent: {services.note}", file=sys.stderr)
    problem = getattr(services.backend, "problem", None)
    if problem and say_problem:
        print(
            f"gpu-agent: {services.backend.name}: {problem}; the inventory is empty "
            "(--backend simulated simulates a fleet)",
            file=sys.stderr,
        )


def database_url(args: argparse.Namespace) -> str | None:
    return getattr(args, "database", None) or os.environ.get("GPU_AGENT_DATABASE") or None


def fleet_file(args: argparse.Namespace) -> str | None:
    return args.fleet or os.environ.get("GPU_AGENT_FLEET") or None


def backend_choice(args: argparse.Namespace) -> BackendChoice:
    name = args.backend or os.environ.get("GPU_AGENT_BACKEND")
    if name is None and (found := gpus_present()):
        print(
            f"gpu-agent: using the simulated fleet (the default), although this host has "
            f"{found} NVIDIA GPU(s): --backend nvml or auto uses them",
            file=sys.stderr,
        )
    allow = args.allow_power_cap or os.environ.get("GPU_AGENT_ALLOW_POWER_CAP") == "1"
    return BackendChoice(
        name or "simulated",
        args.replay or os.environ.get("GPU_AGENT_REPLAY"),
        allow,
        args.ray_address,
    )


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def quoted(value: object) -> str:
    """A value from the ledger as printed: control characters escaped (one line each)."""
    return flat(str(value))
