"""The Python API: request GPUs, hold them in a `with` block, resume, release, report.

    orchestrator = Orchestrator(project="vision")
    allocation = await orchestrator.allocate_gpu(GPURequest(type="A100", count=2, ...))
    async with allocation:
        train(gpu_ids=allocation.gpu_ids)
    # released, charged and recorded here, also when the block raises

Every request is a LangGraph thread checkpointed in the state directory; the ledger is the
truth about GPUs and money. `allocate_gpu_sync` is the synchronous twin for scripts and
notebooks. The ledger's view (release, budgets, history, costs, audit, status, jobs) is
inherited from Records (graph/records.py), which opens no graph for the commands that need
only that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Self, TypeVar, cast

from langchain_core.runnables import RunnableConfig
from langgraph.types import Command, Durability, StateSnapshot, StreamMode

from council.voting import Council
from fleet import names, thread_claims
from fleet.access import LOCAL, Identity
from fleet.choose_backend import BackendChoice
from fleet.clock import Clock, VirtualClock
from fleet.config import FleetConfig
from fleet.errors import GPUAgentError, InvalidInput, MonitoredElsewhere, RunStopped
from fleet.fleet_backend import FleetBackend
from fleet.jobs import Job, JobQueue
from fleet.ledger.rows import allocation_id
from fleet.models import Event, GPURequest, HumanDecision, ReleaseReason, Status
from fleet.monitors import KINDS, Orphan
from fleet.validation import check_against_fleet, parse_request
from graph.builder import build_graph
from graph.checkpoint import PRUNE_EVERY, close_checkpointer, open_checkpointer, prune
from graph.handle import AllocationHandle
from graph.outcome import RequestOutcome, outcome_from
from graph.records import Records, check_arguments
from nodes import audit
from nodes.context import LocalContext, check_models
from nodes.review import parse_decision
from nodes.state import InputState, State, request_of
from nodes.wiring import after_allocate

# Durability from allocate on: each step's checkpoint is on disk before the next step starts
# (see Orchestrator._invoke for the pure part before it).
DURABILITY: Durability = "sync"
PURE_NODES = frozenset({"validate", "council", "review", "route"})  # no side effects
T = TypeVar("T")


@dataclasses.dataclass
class _Placing:
    """A request running in the background until it is placed (allocate_gpu_sync)."""

    thread_id: str
    request_id: str
    placed: threading.Event
    box: dict[str, Any]  # "allocation", then "outcome" or "error"
    runner: threading.Thread | None = None


class _Ticket:
    """Between allocate_gpu(_sync) and the thread that places its request: exactly one of them
    withdraws a request whose caller gave up (the caller where the thread had checked in,
    else the thread, as it checks in before it runs anything)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._placing: _Placing | None = None

    def check_in(self, placing: _Placing) -> bool:
        """The thread's: False where the caller gave up (the thread withdraws it)."""
        with self._lock:
            self._placing = placing
            return not self._abandoned

    def abandon(self) -> _Placing | None:
        """The caller's: what it must withdraw itself (None: the thread will)."""
        with self._lock:
            self._abandoned = True
            return self._placing


class Orchestrator(Records):
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
        monitor_kind: str = "python",
    ) -> None:
        """`database`: a postgresql:// URL holding the ledger and the checkpoints, shared by
        every worker (default: SQLite files in the state directory). `pool_size`: its
        checkpoint connections (one per thread running at once is plenty). `token` (default:
        env GPU_AGENT_TOKEN): who is calling, where the state directory has an access file
        (fleet.access); without one the caller may do everything. `identity`: one the caller
        authenticated itself (a server acting for its users through `acting_as`). The ledger
        is opened and set right as for Records (graph/records.py); then the checkpointer.
        `monitor_kind`: what this process is ("cli", "worker", "page", "python"), shown by
        `status` beside each allocation whose thread it runs (fleet.monitors)."""
        if project is not None:  # applied to requests later without a model's checks
            names.check("project", project)
        check_arguments(pool_size=pool_size)
        if monitor_kind not in KINDS:
            raise InvalidInput(f"monitor_kind must be one of {', '.join(KINDS)}")
        super().__init__(
            state_dir,
            fleet,
            backend=backend,
            clock=clock,
            council=council,
            create=create,
            database=database,
            token=token,
            identity=identity,
            check_config=functools.partial(check_models, council_given=council is not None),
        )
        self.services.monitor_kind = monitor_kind
        self.project = project
        # the threads this process runs now (shared with its acting_as copies): one graph
        # thread never runs twice at once here, as the monitor's claim ensures across processes
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        try:
            self.checkpointer = open_checkpointer(
                self.services.state_dir, database, pool_size=pool_size
            )
        except BaseException:
            self.services.close()
            raise
        self.graph = build_graph(self.checkpointer)
        self.context = LocalContext(
            state_dir=str(self.services.state_dir), services=self.services, identity=self.identity
        )

    def close(self) -> None:
        close_checkpointer(self.checkpointer)
        super().close()

    def acting_as(self, identity: Identity) -> Self:
        other = super().acting_as(identity)  # checked there
        other.context = dataclasses.replace(self.context, identity=other.identity)
        return other

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
        # who asked is whom the token names, whatever the request said
        req = req.model_copy(update={"requested_by": self.identity.name})
        check_against_fleet(req, self.services.config)
        if req.resumes is not None:  # as validate checks it, before anything is written
            problem = self.services.ledger.resumable(req.project, req.resumes)
            if problem is not None:
                raise InvalidInput(problem)
        return req

    def _project_of(self, values: dict[str, Any], thread_id: str) -> str:
        """The thread's project, if the caller may act on it (else as if it had none)."""
        request = values.get("request")
        project = str(
            request.project
            if isinstance(request, GPURequest)
            else request.get("project", "default")
            if isinstance(request, Mapping)
            else "default"  # no request object at all: refused by validate, the default's
        )
        self.identity.check_sees(project, f"no thread {thread_id!r}")
        return project

    def _config(self, thread_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": names.check("thread id", thread_id)}}

    def _new_thread(self, thread_id: str | None, req: GPURequest) -> tuple[str, str | None]:
        """A thread id for a new request, and the owner of its claim: the caller's name
        (checked, unused, claimed for this request: fleet.thread_claims) or a fresh one (no
        claim). A run that stops in its decision with an error still writes its thread's
        checkpoint, which keeps the name; a claim of a process that died before is taken
        over."""
        if thread_id is None:
            return uuid.uuid4().hex, None
        started = functools.partial(self._started, thread_id)
        if started():
            raise InvalidInput(f"thread {thread_id!r} already exists; resume it instead")
        kind = self.services.monitor_kind or "python"
        return thread_id, thread_claims.claim(
            self.services.ledger, thread_id, req.request_id, kind, started
        )

    def _give_back(self, thread_id: str, claim: str | None) -> None:
        """A name claimed by a start that failed before anything of it was kept (no
        checkpoint; a job, once queued, holds the claim under its own owner) is free again,
        so a retry in this same process is not refused by a call that is over."""
        if claim is None:
            return
        with contextlib.suppress(Exception):  # else it is held until this process exits
            if not self._started(thread_id):
                self.services.ledger.give_thread_back(thread_id, claim)

    def _start(
        self,
        req: GPURequest,
        thread_id: str,
        claim: str | None,
        *,
        wait: bool = True,
        on_update: Callable[[str, dict[str, Any]], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> RequestOutcome:
        """Run a new thread from its first step (its name given back where it fails before
        its first checkpoint)."""
        try:
            return self._invoke(
                InputState(request=req),
                thread_id,
                wait=wait,
                pure_first=True,
                on_update=on_update,
                on_progress=on_progress,
            )
        except BaseException:
            self._give_back(thread_id, claim)
            raise

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
    ) -> tuple[State, tuple[Any, ...] | None]:
        """Run until the graph stops: (final values, interrupts or None if it did not stop).
        Where the fleet keeps only a thread's latest checkpoint, a run that monitors prunes
        the thread at its first tick and every PRUNE_EVERY ticks after (so that runs cut short
        one after another do not pile theirs up), and once more when it stops where it ticked
        or released (graph.checkpoint)."""
        values: State = {}
        stopped: tuple[Any, ...] | None = None
        ticks, ended = 0, False
        modes: list[StreamMode] = ["updates", "values"]
        if on_progress is not None:
            modes.append("custom")
        with self._ctrl_c_stops(str(config["configurable"]["thread_id"])):
            for mode, part in self.graph.stream(
                graph_input,
                config,
                context=self._context_for(graph_input),
                durability=durability,
                stream_mode=modes,
                interrupt_before=interrupt_before,
                interrupt_after=interrupt_after,
            ):
                chunk = cast(dict[str, Any], part)
                if mode == "custom":
                    assert on_progress is not None
                    on_progress(chunk)
                elif mode == "values":
                    values = _state(chunk)
                elif "__interrupt__" in chunk:
                    stopped = tuple(chunk["__interrupt__"])
                else:
                    if "monitor" in chunk:
                        ticks += 1
                        if ticks % PRUNE_EVERY == 1:
                            self._prune(config)
                    ended = ended or "deallocate" in chunk
                    if on_update is not None:
                        for node, update in chunk.items():
                            if isinstance(update, dict):
                                on_update(node, update)
        if ticks or ended:
            self._prune(config)
        return values, stopped

    @contextlib.contextmanager
    def _ctrl_c_stops(self, thread_id: str) -> Iterator[None]:
        """Ctrl-C stops the run at once, not at its next tick. LangGraph runs a node in a
        worker thread and, interrupted, waits for it to finish: a monitor's sleep, up to a
        tick (a minute), and a second Ctrl-C meanwhile left the process hanging. While the
        run streams in the main thread with Python's own SIGINT handler, Ctrl-C also ends
        the node's sleep, where it stops (Services.stop_thread). Another handler (`gpu-agent
        run`'s, which stops its command as a release would; a notebook's) is left alone.
        The interruption the caller gets names the thread (RunStopped), for its resume.
        `request` and `resume` hold it around all they do, so that a Ctrl-C that lands while
        they read a checkpoint (whose decoder turns it into a ValueError) stops them alike;
        the run's own use inside them then leaves their handler be."""
        ours = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )

        hit: list[int] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            hit.append(signum)
            self.services.stop_thread(thread_id)
            signal.default_int_handler(signum, frame)

        if ours:
            signal.signal(signal.SIGINT, stop)
        try:
            yield
        except KeyboardInterrupt as exc:
            if getattr(exc, "thread_id", None) is not None:
                raise
            raise RunStopped(f"thread {thread_id} interrupted", thread_id) from exc
        except Exception as exc:  # a library that turned the interruption into its own error
            if not hit:  # (a checkpoint's decoder: ValueError "ext_hook failed")
                raise
            raise RunStopped(f"thread {thread_id} interrupted", thread_id) from exc
        finally:
            if ours:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                self.services.go_on(thread_id)

    def _prune(self, config: RunnableConfig) -> None:
        """The thread's checkpoints cut to its latest (graph.checkpoint.prune), where the
        fleet keeps no more. A prune that fails (a database gone away) costs nothing but
        space: the next one takes what it left."""
        if self.services.config.checkpoints.keep != "latest":
            return
        thread_id = str(config["configurable"]["thread_id"])
        try:
            prune(self.checkpointer, thread_id)
        except Exception as exc:  # a run is never failed by its tidying
            logging.getLogger(__name__).warning(
                "could not prune the checkpoints of thread %s: %s", thread_id, exc
            )

    def _context_for(self, graph_input: InputState | Command[Any] | None) -> LocalContext:
        """This caller's context; marked `resumed` where the run carries a checkpoint on (no
        new request), so that validate, run again, keeps the request's first asker."""
        if isinstance(graph_input, dict):  # InputState: a new request, stamped by check()
            return self.context
        return dataclasses.replace(self.context, resumed=True)

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
        with self._running_lock:
            if thread_id in self._running:
                raise MonitoredElsewhere(f"thread {thread_id!r} already runs in this process")
            self._running.add(thread_id)
        try:
            if pure_first:
                values, stopped = self._stream(
                    graph_input,
                    config,
                    "exit",
                    on_update,
                    on_progress=on_progress,
                    interrupt_before=["allocate"],
                )
                if stopped != ():  # finished, or a human review: not standing before allocate
                    return self._outcome_of(thread_id, values, stopped)
                graph_input = None
            values, stopped = self._stream(
                graph_input,
                config,
                DURABILITY,
                on_update,
                on_progress=on_progress,
                interrupt_before=["wait"] if wait else None,
                interrupt_after=None if wait else ["allocate"],
            )
            if wait and stopped == ():  # queued: it waits for GPUs in the fair queue
                values, stopped = self._wait_in_queue(config, on_update, on_progress)
            return self._outcome_of(thread_id, values, stopped)
        finally:  # whatever stopped it, this process no longer runs the thread
            self.services.unwatch_thread(thread_id)
            with self._running_lock:
                self._running.discard(thread_id)

    def _wait_in_queue(
        self,
        config: RunnableConfig,
        on_update: Callable[[str, dict[str, Any]], None] | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> tuple[State, tuple[Any, ...] | None]:
        """A queued request's wait: wait and allocate again at every poll (or wake-up) with
        durability "exit", one checkpoint when it is placed or gives up, not two a poll for
        as long as it waits (about 5.5 KB each: ten hours at the default 60-second poll wrote
        1,201, 6.5 MB, docs/durability.md); then, placed, its allocation from its first tick
        on with "sync", as always.
        Waiting changes nothing a resume needs: the ledger's queued row holds its place, so a
        crash meanwhile resumes from the checkpoint before the wait (the thread shows it
        queued), and allocate, idempotent, finds a placement made before the crash."""
        values, stopped = self._stream(
            None, config, "exit", on_update, on_progress=on_progress, interrupt_before=["monitor"]
        )
        if stopped == ():  # placed: before its first tick
            values, stopped = self._stream(
                None, config, DURABILITY, on_update, on_progress=on_progress
            )
        return values, stopped

    def _outcome_of(
        self, thread_id: str, values: State, stopped: tuple[Any, ...] | None
    ) -> RequestOutcome:
        if stopped:  # an interrupt() with a payload: the council's human review
            nxt: tuple[str, ...] = ("review",)
        elif stopped == ():  # stopped after allocate (--no-wait)
            step = after_allocate(values)
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
        thread_id, claim = self._new_thread(thread_id, req)
        try:
            with self._ctrl_c_stops(thread_id):
                return self._start(
                    req,
                    thread_id,
                    claim,
                    wait=wait,
                    on_update=_events_to(on_event),
                    on_progress=_heard(on_progress),
                )
        except RunStopped as exc:
            if self._started(thread_id):
                raise
            raise RunStopped("nothing of the request was kept: ask again") from exc

    def start_job(
        self, job: Job, *, on_event: Callable[[Event], None] | None = None
    ) -> RequestOutcome:
        """Run a submitted job's thread from its first step (a worker holding its lease: the
        job's claim on the name is this worker's while the lease lasts). A thread that has
        started is resumed, never started again: its first step would overwrite it.
        `on_event`: as for `request`."""
        req = self.check(job.request)  # a worker runs it for whoever submitted it
        req = req.model_copy(update={"requested_by": self.identity.asker(job.request.requested_by)})
        if self._started(job.thread_id):
            raise InvalidInput(f"thread {job.thread_id!r} already exists; resume it instead")
        return self._start(req, job.thread_id, None, on_update=_events_to(on_event))

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
        with self._ctrl_c_stops(thread_id):  # also while it reads the checkpoint
            return self._resume(thread_id, decision, wait, on_event, on_progress)

    def _resume(
        self,
        thread_id: str,
        decision: HumanDecision | bool | Mapping[str, Any] | None,
        wait: bool,
        on_event: Callable[[Event], None] | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> RequestOutcome:
        snap, project = self._thread(thread_id)
        graph_input: Command[Any] | None = None
        if snap.interrupts:
            human = self._decision(_state(snap.values), project, decision)
            if human is None:
                return self._stays(thread_id)
            graph_input = Command(resume=human.model_dump())
        elif decision is not None:
            values = _state(snap.values)
            done = (
                self.services.ledger.audit_entry(audit.decision_key(values, request_of(values)))
                if "request" in values
                else None
            )
            if done is not None:
                raise InvalidInput(
                    f"this review was already decided: {done.action} by {done.who}; nothing changed"
                )
            raise InvalidInput(f"thread {thread_id!r} is not waiting for a review decision")
        elif not _to_run(snap):  # it ended; pruned where its last prune failed, or from before
            self._prune(self._config(thread_id))
            return self._stays(thread_id)
        return self._invoke(
            graph_input,
            thread_id,
            wait=wait,
            pure_first=bool(PURE_NODES & set(_to_run(snap))),
            on_update=_events_to(on_event),
            on_progress=_heard(on_progress),
        )

    def _stays(self, thread_id: str) -> RequestOutcome:
        """Where a thread that does not run here stands (it ended, or waits for a review): a
        monitor this process claimed for one of its allocations (adopting it) is given up, so
        that `status` shows who runs it, nobody, rather than a beat for nothing."""
        self.services.unwatch_thread(thread_id)
        return self.outcome(thread_id)

    def _decision(
        self, values: State, project: str, decision: HumanDecision | bool | Mapping[str, Any] | None
    ) -> HumanDecision | None:
        """The decision a waiting review gets, claimed in the ledger first so that exactly one
        decision wins: a second one (another approver, a second click) is refused with who
        decided, also the same one twice. Without a decision: the one claimed earlier and not
        yet applied (a crash between the claim and the review's checkpoint), or None."""
        request = request_of(values)
        claimed = self.services.ledger.audit_entry(audit.decision_key(values, request))
        if decision is None:
            return None if claimed is None else audit.recorded(claimed)
        human = parse_decision(dict(decision) if isinstance(decision, Mapping) else decision)
        self.identity.check_decide(project)
        if self.identity is not LOCAL:  # the decision is the caller's, whatever it says
            human = human.model_copy(update={"by": self.identity.name})
        entry = audit.decision_entry(self.services, values, request, human)
        won, held = self.services.ledger.claim(entry)
        if not won:
            raise InvalidInput(
                f"this review was already decided: {held.action} by "
                f"{held.who} (nothing changed; resume without a decision "
                "carries the thread on)"
            )
        return human

    def continue_in_background(self, thread_id: str) -> threading.Thread:
        """Carry a placed or queued thread on (monitor, release) in a background thread; a
        thread that does not exist, or that the caller may not act on, is refused here."""
        self._thread(thread_id)
        return self._spawn(lambda: self._resume_quietly(thread_id))

    def _resume_quietly(self, thread_id: str) -> None:
        try:
            self.resume(thread_id)
        except MonitoredElsewhere as exc:  # another live process runs it: nothing to do
            logging.getLogger(__name__).info("thread %s: %s", thread_id, exc)
        except Exception:  # the thread stays checkpointed: `gpu-agent resume` carries it on
            logging.getLogger(__name__).exception("background thread %s stopped", thread_id)

    def claim_orphan(self, orphan: Orphan) -> bool:
        """Become the monitor of an allocation nobody monitors (False: another process was
        quicker, its monitor came back, or it ended meanwhile). The caller then resumes its
        thread."""
        self.identity.check_project(orphan.row.project, "monitor allocations")
        try:
            self.services.watch(orphan.row.id, orphan.row.thread_id)
        except MonitoredElsewhere:
            return False
        if self.services.ledger.get(orphan.row.id).state == "released":  # ended since it
            self.services.unwatch(orphan.row.id)  # was read: nothing to adopt
            return False
        return True

    def adopt(self) -> list[tuple[Orphan, threading.Thread]]:
        """Carry on, in background threads of this process, every live allocation the caller
        may act on whose monitor died (or that nobody monitored); what it adopted, each with
        the thread that now runs it."""
        return [
            (o, self.continue_in_background(o.row.thread_id))
            for o in self.orphans()
            if o.checkpointed and self.claim_orphan(o)
        ]

    def submit(
        self, request: GPURequest | Mapping[str, Any], *, thread_id: str | None = None
    ) -> Job:
        """Queue a request for `gpu-agent worker` (any worker on the same database runs it);
        checked first, so invalid input raises InvalidInput and queues nothing. Its thread is
        claimed for its job even where the id is generated: it is shown at once, and nothing is
        checkpointed under it until a worker runs it."""
        req = self.check(request)
        thread_id, claim = self._new_thread(
            uuid.uuid4().hex if thread_id is None else thread_id, req
        )
        try:
            return JobQueue(self.services.ledger).submit(thread_id, req, claimed_by=claim)
        except BaseException:
            self._give_back(thread_id, claim)
            raise

    def outcome(self, thread_id: str) -> RequestOutcome:
        """Where a thread stands, read from its last checkpoint."""
        snap, _ = self._thread(thread_id)
        return outcome_from(thread_id, snap.values, bool(snap.interrupts), _to_run(snap))

    def _thread(self, thread_id: str) -> tuple[StateSnapshot, str]:
        """The thread's last checkpoint and its project, if it has one and the caller may act
        on it (else InvalidInput: another project's thread is as if none)."""
        snap = self.graph.get_state(self._config(thread_id))
        if not snap.values:
            raise InvalidInput(self._no_thread(thread_id))
        return snap, self._project_of(snap.values, thread_id)

    def _no_thread(self, thread_id: str) -> str:
        """Why there is no thread: a submitted request has none until a worker starts it."""
        with contextlib.suppress(InvalidInput):
            job = JobQueue(self.services.ledger).get(thread_id)
            if job.state == "pending" and self.identity.may_act_on(job.request.project):
                return (
                    f"thread {thread_id!r} is a submitted request no worker has started yet "
                    f"(`gpu-agent jobs {thread_id}`); a worker runs it"
                )
        return f"no thread {thread_id!r}"

    # ---- holding GPUs in a block ------------------------------------------------------------

    def allocate_gpu_sync(
        self,
        request: GPURequest | Mapping[str, Any],
        *,
        thread_id: str | None = None,
        withdraw: bool = True,
    ) -> AllocationHandle:
        """Place the request and return while the graph keeps monitoring in the background.

        Raises InvalidInput, Denied, NotPlaced or PendingReview when no GPUs were placed.
        Interrupted (Ctrl-C) while it waits, nothing stays placed for it (_withdraw), unless
        `withdraw` is False: the request then stays placed or queued for a later `resume`
        (a requeued `gpu-agent run`, which `run --resume` carries on)."""
        ticket = _Ticket()
        try:
            return self._held(self._placing(request, thread_id, ticket), withdraw)
        except GPUAgentError:  # the request's answer (a review stays for its human)
            raise
        except BaseException:  # Ctrl-C, wherever it came: before _held's own cleanup too
            if withdraw:
                placed = ticket.abandon()  # None: the thread still checks in, and withdraws
                if placed is not None:
                    self._withdraw(placed)
            raise

    async def allocate_gpu(
        self, request: GPURequest | Mapping[str, Any], *, thread_id: str | None = None
    ) -> AllocationHandle:
        """allocate_gpu_sync for asyncio; cancelled (a timeout) while it waits, nothing stays
        placed for it. The cleanup awaits nothing: a cancel scope that cancels again at every
        await (anyio's) would stop it halfway."""
        ticket = _Ticket()
        begun = asyncio.ensure_future(asyncio.to_thread(self._placing, request, thread_id, ticket))
        try:
            placing = await asyncio.shield(begun)
            return await asyncio.to_thread(self._held, placing, True)
        except asyncio.CancelledError:
            placed = ticket.abandon()  # None: the thread still checks in, and withdraws
            if placed is not None:
                self._withdraw(placed)
            raise

    def _placing(
        self,
        request: GPURequest | Mapping[str, Any],
        thread_id: str | None,
        ticket: _Ticket | None = None,
    ) -> _Placing:
        """The request checked, its thread claimed (a generated name too, so that it can be
        revoked) and run in the background until it is placed or ends. With a `ticket` its
        caller (allocate_gpu) may have given up meanwhile: then it is withdrawn at once."""
        req = self.check(request)
        thread_id, claim = self._new_thread(
            uuid.uuid4().hex if thread_id is None else thread_id, req
        )
        placing = _Placing(thread_id, req.request_id, threading.Event(), {})

        def on_update(node: str, update: dict[str, Any]) -> None:
            if node == "allocate" and update.get("status") == Status.ALLOCATED:
                placing.box["allocation"] = update["allocation"]
                placing.placed.set()

        def run() -> None:
            if ticket is not None and not ticket.check_in(placing):  # its caller gave up
                self._withdraw(placing)
                placing.placed.set()
                return
            try:
                placing.box["outcome"] = self._start(req, thread_id, claim, on_update=on_update)
            except BaseException as exc:  # handed to the caller, never swallowed
                placing.box["error"] = exc
            finally:
                placing.placed.set()

        placing.runner = self._spawn(run)
        return placing

    def _held(self, placing: _Placing, withdraw: bool) -> AllocationHandle:
        """The handle once placed, or the request's answer; a wait given up (Ctrl-C) or a
        run that failed leaves nothing placed where `withdraw`."""
        box, runner = placing.box, placing.runner
        assert runner is not None
        try:
            placing.placed.wait()
            if "allocation" in box:
                return AllocationHandle(self, placing.thread_id, box["allocation"], runner, box)
            runner.join()
        except BaseException:
            if withdraw:
                self._withdraw(placing)
            raise
        if "error" in box:
            if withdraw and not isinstance(box["error"], GPUAgentError):
                self._withdraw(placing)
            raise box["error"]
        outcome: RequestOutcome = box["outcome"]
        outcome.raise_for_status()
        raise GPUAgentError(f"request ended without GPUs: {outcome.reason}")

    def _withdraw(self, placing: _Placing) -> None:
        """Nothing stays placed for a caller that stopped waiting: the thread's claim is
        revoked first, so that a placement still in flight is refused in its own transaction
        (fleet.ledger.threads), then whatever was placed or queued is cancelled."""
        self.services.ledger.revoke_thread(placing.thread_id)
        with contextlib.suppress(InvalidInput):  # none was written
            self.services.release(
                allocation_id(placing.thread_id, placing.request_id), ReleaseReason.CANCELLED
            )

    def _spawn(self, fn: Callable[[], None]) -> threading.Thread:
        clock = self.services.clock
        if isinstance(clock, VirtualClock):
            return clock.spawn(fn)
        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        return thread

    def _checkpointed(self, thread_ids: list[str]) -> set[str]:
        """Through the open checkpointer (its connection or pool), not a second one."""
        return {t for t in thread_ids if self._started(t)}

    def _started(self, thread_id: str) -> bool:
        """The thread has a checkpoint (read through the open checkpointer)."""
        return self.checkpointer.get_tuple(self._config(thread_id)) is not None


def _to_run(snap: StateSnapshot) -> tuple[str, ...]:
    """The steps a resume would run. A process that died after a step's writes were saved
    but before its checkpoint leaves that step's task with its result: get_state then shows
    the step's writes applied and `next` empty, yet a resume applies them and goes on."""
    return tuple(snap.next) or tuple(t.name for t in snap.tasks if not t.interrupts)


def _heard(fn: Callable[[T], None] | None) -> Callable[[T], None] | None:
    """A caller's callback that cannot stop the run: one that raises is logged and the run
    goes on (stopped mid-run, its allocation would stay placed with nobody monitoring it)."""
    if fn is None:
        return None

    def call(arg: T) -> None:
        try:
            fn(arg)
        except Exception:
            logging.getLogger(__name__).exception("a callback raised; the run goes on")

    return call


def _events_to(
    on_event: Callable[[Event], None] | None,
) -> Callable[[str, dict[str, Any]], None] | None:
    heard = _heard(on_event)
    if heard is None:
        return None

    def on_update(node: str, update: dict[str, Any]) -> None:
        for event in update.get("events", []):
            heard(event)

    return on_update


def _state(values: dict[str, Any]) -> State:
    """A checkpoint's or a stream's values: the graph's State, which LangGraph types as a
    plain dict."""
    return cast(State, values)
