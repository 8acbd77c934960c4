"""The runtime context and the services it resolves to.

Nodes get the fleet backend, ledger, clock and council through LangGraph's runtime context.
In-process callers (the Orchestrator, the simulator, tests) pass ready `Services` in a
`LocalContext`; callers that can only send JSON (the LangGraph server, Studio, MCP) send the
plain `Context` fields, which resolve to services opened once per process. `Services` and
`open_services` live in fleet/services.py (no LangGraph) and are re-exported here.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from langgraph.runtime import Runtime

from council.voting import Council
from fleet.access import Identity
from fleet.choose_backend import BackendChoice
from fleet.config import FleetConfig
from fleet.models import Allocation, utc
from fleet.services import Services, open_services
from fleet.statedir import default_state_dir

Releaser = Callable[[tuple[tuple[float, float], ...]], float]

__all__ = ["Context", "LocalContext", "Services", "open_services", "services_for"]


@dataclass(kw_only=True)
class Context:
    """Where the graph finds its fleet. Every field has a default, so a bare run works. On
    the LangGraph server every field is the server's own (its environment): a run may echo
    it, never change it."""

    state_dir: str = field(
        default_factory=lambda: str(default_state_dir()),
        metadata={
            "description": "State directory holding the ledger and checkpoints "
            "(env GPU_AGENT_HOME, default ./.gpu-agent)."
        },
    )
    fleet_file: str | None = field(
        default_factory=lambda: os.environ.get("GPU_AGENT_FLEET") or None,
        metadata={
            "description": "Fleet TOML file (env GPU_AGENT_FLEET); when empty, the "
            "built-in simulated fleet, or for real GPUs the built-in host policy."
        },
    )
    backend: str = field(
        default_factory=lambda: os.environ.get("GPU_AGENT_BACKEND") or "simulated",
        metadata={
            "description": "Inventory backend (env GPU_AGENT_BACKEND): simulated, nvml "
            "(real GPUs), replay (a recording) or auto (nvml where a driver is)."
        },
    )
    replay: str | None = field(
        default_factory=lambda: os.environ.get("GPU_AGENT_REPLAY") or None,
        metadata={"description": "Recording the replay backend plays (env GPU_AGENT_REPLAY)."},
    )
    database: str | None = field(
        default_factory=lambda: os.environ.get("GPU_AGENT_DATABASE") or None,
        metadata={
            "description": "A postgresql:// URL for the ledger (env GPU_AGENT_DATABASE); "
            "when empty, SQLite in the state directory."
        },
    )


@dataclass(kw_only=True)
class LocalContext(Context):
    """What in-process callers (the Orchestrator, the simulator, tests) pass: ready services.
    Not JSON, so never part of the graph's context schema that the server and Studio show.
    `identity`: who is calling, where the caller authenticated one (the Orchestrator's): the
    validate node then requests GPUs only for a project they may act on, as theirs, also
    when the graph runs inside another (graph/subgraph.py); None: the caller is trusted.
    `resumed`: the run carries a thread on from its checkpoint with no new input (the
    Orchestrator's resume), so the request in the state is the one first submitted, stamped
    then with who asked: validate keeps that name instead of the caller's, who only carries
    it on."""

    services: Services
    identity: Identity | None = None
    resumed: bool = False


_opened: dict[tuple[str, str | None, BackendChoice, str | None], Services] = {}
_opened_lock = threading.Lock()


# The fields a JSON context may echo but never choose: they are this process's own.
BOUND = ("state_dir", "fleet_file", "backend", "replay", "database")


def _compared(name: str, value: object) -> object:
    """A context value as compared with the process's own: paths resolved."""
    if name in ("state_dir", "fleet_file", "replay") and isinstance(value, str):
        try:
            return str(Path(value).resolve())
        except (OSError, ValueError):  # a NUL byte, a loop of links: not the server's
            return value
    return value


def chosen_context(*sources: object) -> list[str]:
    """The BOUND fields that `sources` (mappings: a run's context, its config's configurable,
    an assistant's or a cron's) set to anything but this process's own (`Context()`, from the
    environment); an empty value is no choice. Resolving a relative path reads the working
    directory: async callers run this off the event loop."""
    own = Context()
    chosen: list[str] = []
    for source in sources:
        if not isinstance(source, Mapping):
            continue
        for name in BOUND:
            value = source.get(name)
            if value in (None, "") or name in chosen:
                continue
            if _compared(name, value) != _compared(name, getattr(own, name)):
                chosen.append(name)
    return chosen


def bound_context_refusal(chosen: list[str]) -> str:
    return (
        f"a run may not choose its {', '.join(chosen)}: the context is bound to the "
        "server's own configuration (its GPU_AGENT_* environment)"
    )


def council_of(svc: Services) -> Council:
    """The council the services convene: the one given, else the fleet file's, loaded on first
    use (commands that never convene it do not pay for its modules and weights)."""
    if svc.chosen_council is None:
        from council.policies import council_for

        svc.chosen_council = council_for(svc.config.council)
    council: Council = svc.chosen_council
    return council


def check_models(config: FleetConfig, *, council_given: bool = False) -> None:
    """The models a fleet file names are read before anything is opened or written
    (ConfigError, one line, where one cannot be), not first at a tick or a vote: the idle
    stream's where GPUs are released by their stream, a council's `[council] weights`
    (unless the caller gives its own council, which is then convened instead)."""
    if "stream" in (config.monitor.idle_release, config.council.guard_idle_release):
        from council.stream_release import shipped

        shipped()
    if config.council.weights is not None and not council_given:
        from council.policies import council_for

        council_for(config.council)  # kept: council_of loads it again from the cache


def release_after(
    svc: Services, allocation: Allocation, placed_end: float | None, guarded: bool = False
) -> Releaser | None:
    """Where the fleet releases idle GPUs by their stream (`[monitor] idle_release =
    "stream"`), or the guardrails say so for this allocation (`guarded`): the shipped model,
    on this allocation's lease as placed (read once per process). `placed_end`: where the
    lease asked ends (fleet.ledger.rows.Lease.asked_end), read where a preemption or a term
    let end cut it (Allocation.lease_cut): the job was expected to take the lease asked."""
    if svc.config.monitor.idle_release != "stream" and not guarded:
        return None
    from council.stream_release import shipped

    end = allocation.renewed_up_to or allocation.lease_end  # a term's renewals included
    if allocation.lease_cut is not None and placed_end is not None:
        end = utc(placed_end)
    lease_hours = (end - allocation.started_at).total_seconds() / 3600.0
    return functools.partial(shipped().after, lease_hours=max(lease_hours, 1e-6))


def services_for(runtime: Runtime[Context]) -> Services:
    """The services a node works with. A LocalContext brings its own. A plain Context (JSON:
    the LangGraph server, Studio, MCP, crons) is bound to this process's own configuration,
    what `Context()` reads from the environment (GPU_AGENT_HOME, GPU_AGENT_FLEET,
    GPU_AGENT_BACKEND, GPU_AGENT_REPLAY, GPU_AGENT_DATABASE): a caller may echo it or leave
    a field empty, never choose another state directory, fleet file, backend, recording or
    database (InvalidInput), so that no run opens a ledger the server was not started on."""
    ctx = runtime.context if runtime.context is not None else Context()
    if isinstance(ctx, LocalContext):  # every node asks, at every step: nothing else first
        return ctx.services
    from fleet.errors import InvalidInput

    chosen = chosen_context({name: getattr(ctx, name, None) for name in BOUND})
    if chosen:
        raise InvalidInput(bound_context_refusal(chosen))
    return own_services()


def own_services() -> Services:
    """This process's own services, what `Context()` reads from the environment: opened once
    and shared by every run (and the server's auth) that is bound to them."""
    own = Context()
    choice = BackendChoice(own.backend, own.replay)
    key = (str(_compared("state_dir", own.state_dir)), own.fleet_file, choice, own.database)
    with _opened_lock:
        if key not in _opened:
            opened = open_services(
                own.state_dir,
                own.fleet_file,
                backend=choice,
                database=own.database,
                check=check_models,
            )
            opened.monitor_kind = "server"  # its runs beat for what they monitor
            _opened[key] = opened
        return _opened[key]
