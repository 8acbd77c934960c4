"""The Python API: request GPUs, hold them in a `with` block, resume, release, report.

    orchestrator = Orchestrator(project="vision")
    allocation = await orchestrator.allocate_gpu(GPURequest(type="A100", count=2, ...))
    async with allocation:
        train(gpu_ids=allocation.gpu_ids)
    # released, charged and recorded here, also when the block raises

Every request is a LangGraph thread checkpointed in the state directory; the ledger is the
truth about GPUs and money. `allocate_gpu_sync` is the synchronous twin for scripts and
notebooks.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.types import Command, Durability, StateSnapshot, StreamMode

from council.voting import Council
from fleet.access import LOCAL, Identity, identify
from fleet.backend import FleetBackend
from fleet.backends import BackendChoice
from fleet.clock import Clock, VirtualClock
from fleet.config import FleetConfig
from fleet.errors import GPUAgentError, InvalidInput
from fleet.jobs import Job, JobQueue
from fleet.ledger import AuditEntry, ProjectCost
from fleet.models import (
    Event,
    GPURequest,
    HistoryRecord,
    HumanDecision,
    Release,
    ReleaseReason,
    Status,
)
from fleet.validation import check_against_fleet, parse_request
from graph.builder import after_allocate, build_graph
from graph.checkpoint import close_checkpointer, open_checkpointer
from graph.handle import AllocationHandle
from graph.outcome import RequestOutcome, outcome_from
from graph.status import fleet_status, scoped
from nodes import audit
from nodes.context import LocalContext, Services, open_services
from nodes.review import parse_decision
from nodes.state import InputState, request_of

# Durability from allocate on: each step's checkpoint is on disk before the next step starts
# (see Orchestrator._invoke for the pure part before it).
DURABILITY: Durability = "sync"
PURE_NODES = frozenset({"validate", "council", "review", "route"})  # no side effects


class Orchestrator:
    def __init__(
        self,
        state_dir: str | Path | None = None,
        fleet: FleetConfig | str | Path | None = None,
        *,
        project: str | None = None,
        backend: str | BackendChoice | FleetBackend = "simulated",
        clock: Clock | None = None,
        council: Council | None = None,
        create: bool = True,
        database: str | None = None,
        pool_size: int = 8,
        token: str | None = None,
        identity: Identity | None = None,
    ) -> None:
        """`database`: a postgresql:// URL holding the ledger and the checkpoints, shared by
        every worker (default: SQLite files in the state directory). `pool_size`: its
        checkpoint connections (one per thread running at once is plenty). `token` (default:
        env GPU_AGENT_TOKEN): who is calling, where the state directory has an access file
        (fleet.access); without one the caller may do everything. `identity`: one the caller
        authenticated itself (a server acting for its users through `acting_as`)."""
        self.services: Services = open_services(
            state_dir, fleet, backend=backend, clock=clock, council=council, create=create,
            database=database,
        )
        self.project = project
        try:
            self.identity = identity or identify(self.services.state_dir,
                                                 token or os.environ.get("GPU_AGENT_TOKEN"))
            self.services.actor = self.identity.name
            self.checkpointer = open_checkpointer(self.services.state_dir, database,
                                                  pool_size=pool_size)
        except BaseException:
            self.services.close()
            raise
        self.graph = build_graph(self.checkpointer)
        self.context = LocalContext(state_dir=str(self.services.state_dir),
                                    services=self.services)
        self.services.ledger.reconcile(self.services.clock.now())  # leases that ran out while down
        held = self.services.ledger.holders()  # power limits a crashed process left lowered
        self.services.backend.reset([g.uuid for g in self.services.gpus if g.uuid not in held])
        self.services.reconcile_reservations()  # a crashed worker's placement groups (Ray)

    def close(self) -> None:
        close_checkpointer(self.checkpointer)
        self.services.close()

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- running threads -------------------------------------------------------------------

    def check(self, request: GPURequest | Mapping[str, Any]) -> GPURequest:
        """The request as the graph will see it, or InvalidInput; nothing is written."""
        req = parse_request(request)
        problem = getattr(self.services.backend, "problem", None)
        if problem and not self.services.inventory:
            raise InvalidInput(f"no GPUs to place on: {problem}")
        project = self.project or self.identity.project
        if project and "project" not in req.model_fields_set:
            req = req.model_copy(update={"project": project})
        self.identity.check_project(req.project, "request GPUs")
        check_against_fleet(req, self.services.config)
        return req

    def _project_of(self, values: dict[str, Any], what: str) -> str:
        """The thread's project, if the caller may act on it (else Forbidden)."""
        request = values.get("request")
        project = str(request.project if isinstance(request, GPURequest) else
                      dict(request or {}).get("project", "default"))
        self.identity.check_project(project, what)
        return project

    def _config(self, thread_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": thread_id}}

    def _stream(
        self,
        graph_input: InputState | Command[Any] | None,
        config: RunnableConfig,
        durability: Durability,
        on_update: Callable[[str, dict[str, Any]], None] | None,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interrupt_before: list[str] | None = None,
        interrupt_after: list[str] | None = None,
    ) -> tuple[dict[str, Any], tuple[Any, ...] | None]:
        """Run until the graph stops: (final values, interrupts or None if it did not stop)."""
        values: dict[str, Any] = {}
        stopped: tuple[Any, ...] | None = None
        modes: list[StreamMode] = ["updates", "values"]
        if on_progress is not None:
            modes.append("custom")
        for mode, part in self.graph.stream(
            graph_input, config, context=self.context, durability=durability,
            stream_mode=modes, interrupt_before=interrupt_before,
            interrupt_after=interrupt_after,
        ):
            chunk = cast(dict[str, Any], part)
            if mode == "custom":
                assert on_progress is not None
                on_progress(chunk)
            elif mode == "values":
                values = chunk
            elif "__interrupt__" in chunk:
                stopped = tuple(chunk["__interrupt__"])
            elif on_update is not None:
                for node, update in chunk.items():
                    if isinstance(update, dict):
                        on_update(node, update)
        return values, stopped

    def _invoke(
        self,
        graph_input: InputState | Command[Any] | None,
        thread_id: str,
        *,
        wait: bool,
        pure_first: bool,
        on_update: Callable[[str, dict[str, Any]], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> RequestOutcome:
        """Run a thread: the pure decision nodes first, then the side effects.

        Durability is chosen per part. validate, council, review and route only read, so they
        run with durability "exit": one checkpoint when they stop, none per step; a crash there
        loses no side effect and the request is simply made again. From allocate on, every
        step is checkpointed synchronously ("sync") before the next begins, so a crash while
        GPUs are held resumes from the last tick. Both parts are idempotent on re-run.
        """
        config = self._config(thread_id)
        if pure_first:
            values, stopped = self._stream(graph_input, config, "exit", on_update,
                                           on_progress=on_progress,
                                           interrupt_before=["allocate"])
            if stopped != ():  # finished, or a human review: not standing before allocate
                return self._outcome_of(thread_id, values, stopped)
            graph_input = None
        values, stopped = self._stream(graph_input, config, DURABILITY, on_update,
                                       on_progress=on_progress,
                                       interrupt_after=None if wait else ["allocate"])
        return self._outcome_of(thread_id, values, stopped)

    def _outcome_of(self, thread_id: str, values: dict[str, Any],
                    stopped: tuple[Any, ...] | None) -> RequestOutcome:
        if stopped:  # an interrupt() with a payload: the council's human review
            nxt: tuple[str, ...] = ("review",)
        elif stopped == ():  # stopped after allocate (--no-wait)
            step = after_allocate(values)  # type: ignore[arg-type]
            nxt = () if step == "__end__" else (step,)
        else:
            nxt = ()
        return outcome_from(thread_id, values, bool(stopped), nxt)

    def request(
        self,
        request: GPURequest | Mapping[str, Any],
        *,
        thread_id: str | None = None,
        wait: bool = True,
        on_event: Callable[[Event], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> RequestOutcome:
        """Run a request. wait=True: to the end of its allocation; False: until placed or queued.

        `on_event` hears each recorded event; `on_progress` each line of the graph's custom
        stream (votes, route, monitor ticks: {"node", "text", ...}). Invalid input raises
        InvalidInput before anything is written.
        """
        req = self.check(request)
        thread_id = thread_id or uuid.uuid4().hex
        if self.checkpointer.get_tuple(self._config(thread_id)) is not None:
            raise InvalidInput(f"thread {thread_id!r} already exists; resume it instead")
        return self._invoke(InputState(request=req), thread_id, wait=wait, pure_first=True,
                            on_update=_events_to(on_event), on_progress=on_progress)

    def resume(
        self,
        thread_id: str,
        decision: HumanDecision | bool | Mapping[str, Any] | None = None,
        *,
        wait: bool = True,
        on_event: Callable[[Event], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> RequestOutcome:
        """Carry a thread on from its last checkpoint: after a crash, a queue, or a review."""
        snap = self.graph.get_state(self._config(thread_id))
        if not snap.values:
            raise InvalidInput(f"no thread {thread_id!r}")
        project = self._project_of(snap.values, "resume threads")
        graph_input: Command[Any] | None = None
        if snap.interrupts:
            human = self._decision(snap.values, project, decision)
            if human is None:
                return self.outcome(thread_id)
            graph_input = Command(resume=human.model_dump())
        elif decision is not None:
            done = self.services.ledger.audit_entry(audit.decision_key(
                snap.values, request_of(snap.values))  # type: ignore[arg-type]
            ) if "request" in snap.values else None
            if done is not None:
                raise InvalidInput(f"this review was already decided: {done.action} by "
                                   f"{done.who}; nothing changed")
            raise InvalidInput(f"thread {thread_id!r} is not waiting for a review decision")
        elif not _to_run(snap):
            return self.outcome(thread_id)
        return self._invoke(graph_input, thread_id, wait=wait,
                            pure_first=bool(PURE_NODES & set(_to_run(snap))),
                            on_update=_events_to(on_event), on_progress=on_progress)

    def _decision(self, values: dict[str, Any], project: str,
                  decision: HumanDecision | bool | Mapping[str, Any] | None
                  ) -> HumanDecision | None:
        """The decision a waiting review gets, claimed in the ledger first so that exactly one
        decision wins: a second one (another approver, a second click) is refused with who
        decided, also the same one twice. Without a decision: the one claimed earlier and not
        yet applied (a crash between the claim and the review's checkpoint), or None."""
        request = request_of(values)  # type: ignore[arg-type]
        claimed = self.services.ledger.audit_entry(
            audit.decision_key(values, request))  # type: ignore[arg-type]
        if decision is None:
            return None if claimed is None else audit.recorded(claimed)
        human = parse_decision(dict(decision) if isinstance(decision, Mapping) else decision)
        self.identity.check_decide(project)
        if self.identity is not LOCAL:  # the decision is the caller's, whatever it says
            human = human.model_copy(update={"by": self.identity.name})
        entry = audit.decision_entry(self.services, values, request,  # type: ignore[arg-type]
                                     human)
        won, held = self.services.ledger.claim(entry)
        if not won:
            raise InvalidInput(f"this review was already decided: {held.action} by "
                               f"{held.who} (nothing changed; resume without a decision "
                               "carries the thread on)")
        return human

    def continue_in_background(self, thread_id: str) -> threading.Thread:
        """Carry a placed or queued thread on (monitor, release) in a background thread."""
        return self._spawn(lambda: self._resume_quietly(thread_id))

    def _resume_quietly(self, thread_id: str) -> None:
        try:
            self.resume(thread_id)
        except Exception:  # the thread stays checkpointed: `gpu-agent resume` carries it on
            logging.getLogger(__name__).exception("background thread %s stopped", thread_id)

    def submit(self, request: GPURequest | Mapping[str, Any], *,
               thread_id: str | None = None) -> Job:
        """Queue a request for `gpu-agent worker` (any worker on the same database runs it);
        checked first, so invalid input raises InvalidInput and queues nothing."""
        req = self.check(request)
        thread_id = thread_id or uuid.uuid4().hex
        if self.checkpointer.get_tuple(self._config(thread_id)) is not None:
            raise InvalidInput(f"thread {thread_id!r} already exists; resume it instead")
        return JobQueue(self.services.ledger).submit(thread_id, req)

    def job(self, thread_id: str) -> Job:
        """A submitted request's job: pending, running (on which worker) or done (how)."""
        job = JobQueue(self.services.ledger).get(thread_id)
        self.identity.check_project(job.request.project, "read jobs")
        return job

    def acting_as(self, identity: Identity) -> Orchestrator:
        """This orchestrator (same services, graph and checkpoints) acting as `identity`: what
        a server that authenticates each request (the web page) calls per request."""
        other = copy.copy(self)
        other.identity = identity
        return other

    def pending_reviews(self) -> list[str]:
        """Threads waiting for a human decision that the caller may see, oldest first."""
        log = self.services.ledger.audit_log(self._visible(None))
        decided = {e.key.removeprefix("decide:") for e in log if e.key.startswith("decide:")}
        return [e.target for e in log
                if e.action == "ask" and e.key.removeprefix("ask:") not in decided]

    def jobs(self) -> list[Job]:
        """The submitted requests the caller may see, oldest first."""
        mine = self._visible(None)
        return [j for j in JobQueue(self.services.ledger).jobs()
                if mine is None or j.request.project == mine]

    def outcome(self, thread_id: str) -> RequestOutcome:
        """Where a thread stands, read from its last checkpoint."""
        snap = self.graph.get_state(self._config(thread_id))
        if not snap.values:
            raise InvalidInput(f"no thread {thread_id!r}")
        self._project_of(snap.values, "read threads")
        return outcome_from(thread_id, snap.values, bool(snap.interrupts), _to_run(snap))

    # ---- holding GPUs in a block ------------------------------------------------------------

    def allocate_gpu_sync(
        self, request: GPURequest | Mapping[str, Any], *, thread_id: str | None = None
    ) -> AllocationHandle:
        """Place the request and return while the graph keeps monitoring in the background.

        Raises InvalidInput, Denied, NotPlaced or PendingReview when no GPUs were placed.
        """
        req = self.check(request)
        thread_id = thread_id or uuid.uuid4().hex
        placed = threading.Event()
        box: dict[str, Any] = {}

        def on_update(node: str, update: dict[str, Any]) -> None:
            if node == "allocate" and update.get("status") == Status.ALLOCATED:
                box["allocation"] = update["allocation"]
                placed.set()

        def run() -> None:
            try:
                box["outcome"] = self._invoke(InputState(request=req), thread_id, wait=True,
                                              pure_first=True, on_update=on_update)
            except BaseException as exc:  # handed to the caller, never swallowed
                box["error"] = exc
            finally:
                placed.set()

        runner = self._spawn(run)
        placed.wait()
        if "allocation" in box:
            return AllocationHandle(self, thread_id, box["allocation"], runner, box)
        runner.join()
        if "error" in box:
            raise box["error"]
        outcome: RequestOutcome = box["outcome"]
        outcome.raise_for_status()
        raise GPUAgentError(f"request ended without GPUs: {outcome.reason}")

    async def allocate_gpu(
        self, request: GPURequest | Mapping[str, Any], *, thread_id: str | None = None
    ) -> AllocationHandle:
        return await asyncio.to_thread(self.allocate_gpu_sync, request, thread_id=thread_id)

    def _spawn(self, fn: Callable[[], None]) -> threading.Thread:
        clock = self.services.clock
        if isinstance(clock, VirtualClock):
            return clock.spawn(fn)
        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        return thread

    # ---- the ledger's view ----------------------------------------------------------------

    def release(
        self, allocation_id: str, reason: ReleaseReason = ReleaseReason.EXPLICIT
    ) -> Release:
        """Release now (or cancel a queued request). A second release returns the first."""
        self.identity.check_project(self.services.ledger.get(allocation_id).project,
                                    "release allocations")
        return self.services.release(allocation_id, reason)

    def set_budget(self, project: str, budget_usd: float) -> list[str]:
        """Set a project's budget; returns the allocations whose deadline it moved."""
        self.identity.check_admin("set budgets")
        return self.services.set_budget(project, budget_usd)

    def _visible(self, project: str | None) -> str | None:
        """The project a caller may read (None: all, for an admin who asked for all)."""
        if project is not None:
            self.identity.check_project(project, "read the records")
            return project
        return self.identity.project if not self.identity.admin else None

    def history(self, project: str | None = None) -> list[HistoryRecord]:
        return self.services.ledger.history(self._visible(project))

    def costs(self) -> list[ProjectCost]:
        mine = self._visible(None)
        return [c for c in self.services.ledger.costs(self.services.clock.now())
                if mine is None or c.project == mine]

    def audit(self, project: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Who approved, denied, decided, released and set budgets, and why; oldest first."""
        return self.services.ledger.audit_log(self._visible(project), limit)

    def problems(self) -> list[str]:
        """What in the ledger and checkpoints does not add up, each with a way out: live
        allocations on GPUs this fleet lacks (another --fleet or --backend than they were
        placed with), and live allocations whose thread has no checkpoint (the checkpoint file
        replaced or its tables lost), which nothing will monitor or release."""
        known = {g.uuid for g in self.services.gpus}
        mine = self._visible(None)
        out = []
        for row in self.services.ledger.allocations():
            if row.state == "released" or (mine is not None and row.project != mine):
                continue
            end = (f"`gpu-agent release {row.id}` ends it and charges the time held"
                   if row.state == "active" else f"`gpu-agent release {row.id}` cancels it")
            missing = [g for g in row.gpu_ids if g not in known]
            if missing:
                out.append(f"allocation {row.id} ({row.project}) holds {', '.join(missing)}, "
                           "which this fleet does not have (was it placed with another "
                           f"--fleet or --backend?): {end}")
            if self.checkpointer.get_tuple(self._config(row.thread_id)) is None:
                out.append(f"allocation {row.id} ({row.project}): its thread {row.thread_id} "
                           "has no checkpoint (were the checkpoints replaced or lost?), so "
                           f"nothing will monitor or release it: {end}")
        return out

    def status(self) -> dict[str, Any]:
        """Every GPU with its holder and live reading, and the allocations the caller may see
        (the `status` JSON); GPUs held by other projects show no thread or allocation."""
        status = fleet_status(self.services) | {"problems": self.problems()}
        mine = self._visible(None)
        return status if mine is None else scoped(status, mine)


def _to_run(snap: StateSnapshot) -> tuple[str, ...]:
    """The steps a resume would run. A process that died after a step's writes were saved
    but before its checkpoint leaves that step's task with its result: get_state then shows
    the step's writes applied and `next` empty, yet a resume applies them and goes on."""
    return tuple(snap.next) or tuple(t.name for t in snap.tasks if not t.interrupts)


def _events_to(
    on_event: Callable[[Event], None] | None,
) -> Callable[[str, dict[str, Any]], None] | None:
    if on_event is None:
        return None

    def on_update(node: str, update: dict[str, Any]) -> None:
        for event in update.get("events", []):
            on_event(event)

    return on_update
