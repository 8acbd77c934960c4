"""The graph's own nodes and routers, stepped through virtual time in one OS thread.

LangGraph runs one request per thread and its nodes sleep on the clock (the monitor between
ticks, the wait node between polls). For a trace of 82,247 requests that is 82,247 threads, a
checkpoint per step and a condition variable that wakes every sleeper at every step. This
engine runs the same node functions (`nodes.wiring.NODES`), the same routers (`ROUTERS`), the
same edges and the same state reducers, but a sleeping node parks its thread instead of
blocking: the engine's clock raises `Asleep`, and the node is run again from its first line
when its time comes or its wake token is set, the way LangGraph re-runs a node resumed after
`interrupt()`. This relies on the rule every node already keeps for crash-resume: no side
effect before the sleep. On the re-run the sleep returns at once, so the node goes on exactly
as if it had slept. The council's human review is answered by a reviewer function through
`nodes.review.decided`, the same code that applies a human's `Command(resume=...)`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from langgraph.graph import END, START
from langgraph.runtime import ExecutionInfo, Runtime

from fleet.clock import WakeToken
from fleet.models import GPURequest
from nodes.context import Context, LocalContext, Services, check_models
from nodes.review import decided, question
from nodes.state import State
from nodes.wiring import EDGES, NODES, ROUTERS, Node

# The state's reducers, read from its Annotated keys (events: operator.add), so the engine
# merges updates as LangGraph's channels do.
REDUCERS: dict[str, Callable[[Any, Any], Any]] = {
    key: hint.__metadata__[0]
    for key, hint in get_type_hints(State, include_extras=True).items()
    if hasattr(hint, "__metadata__") and callable(hint.__metadata__[0])
}
Reviewer = Callable[[dict[str, Any]], Any]  # the question -> an answer (see parse_decision)
Observer = Callable[["GraphThread", str, State], None]  # (thread, node, update)
Finisher = Callable[["GraphThread"], None]


class Asleep(Exception):
    """A node asked to sleep until `until` (or until `token` is set)."""

    def __init__(self, until: float, token: WakeToken | None) -> None:
        super().__init__(until)
        self.until = until
        self.token = token


class EngineToken(WakeToken):
    """A wake token that also tells the engine, so a parked thread runs again now."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    def set(self) -> None:
        super().set()
        self._engine.woken(self)


class EventClock:
    """Virtual time that only the engine moves; a sleep parks the calling graph thread."""

    def __init__(self, start: float) -> None:
        self._now = start
        self.resuming = False  # the running thread's sleep is over: its next sleep returns
        self.engine: Engine | None = None

    def now(self) -> float:
        return self._now

    def advance(self, to: float) -> None:
        self._now = max(self._now, to)

    def sleep(self, seconds: float, wake: WakeToken | None = None) -> None:
        if self.resuming:
            self.resuming = False
            if wake is not None:
                wake.clear()
            return
        if wake is not None and wake.is_set():
            wake.clear()
            return
        if seconds > 0:
            raise Asleep(self._now + seconds, wake)

    def token(self) -> WakeToken:
        assert self.engine is not None, "the clock belongs to an engine"
        return EngineToken(self.engine)


@dataclass
class GraphThread:
    id: str
    state: dict[str, Any]
    node: str
    runtime: Runtime[Context]
    tag: Any = None  # the caller's own reference (the simulator's job)
    generation: int = 0  # bumped when the thread is rescheduled: stale heap entries skip
    token: WakeToken | None = None  # the token it sleeps on
    parked: bool = False


@dataclass
class _Entry:
    generation: int
    thread: GraphThread | None
    call: Callable[[], object] | None


class Engine:
    def __init__(
        self,
        services: Services,
        clock: EventClock,
        reviewer: Reviewer,
        observer: Observer | None = None,
        finished: Finisher | None = None,
        nodes: Mapping[str, Node] = NODES,
    ) -> None:
        assert services.clock is clock
        check_models(services.config, council_given=services.chosen_council is not None)
        clock.engine = self
        self.services = services
        self.clock = clock
        self.context = LocalContext(state_dir=str(services.state_dir), services=services)
        self.observer = observer
        self.finished = finished
        self.nodes: dict[str, Node] = dict(nodes)
        self.nodes["review"] = lambda state, runtime: decided(
            state, runtime, reviewer(question(state))
        )
        self._heap: list[tuple[float, int, _Entry]] = []  # (time, sequence, what)
        self._seq = itertools.count()
        self._sleepers: dict[int, GraphThread] = {}  # id(token) -> parked thread
        self.steps: Counter[str] = Counter()  # node runs by node

    # ---- scheduling -------------------------------------------------------------------

    def submit(
        self, thread_id: str, request: GPURequest, at: float, tag: Any = None
    ) -> GraphThread:
        """A new graph thread with `request` as its input, starting at `at`."""
        runtime: Runtime[Context] = Runtime(
            context=self.context,
            execution_info=ExecutionInfo(
                checkpoint_id="", checkpoint_ns="", task_id="", thread_id=thread_id
            ),
        )
        thread = GraphThread(thread_id, {"request": request}, EDGES[START], runtime, tag)
        self._push(at, thread)
        return thread

    def call_at(self, at: float, call: Callable[[], object]) -> None:
        """Run `call` (a user's action: a release, a budget change) at virtual time `at`."""
        heapq.heappush(self._heap, (at, next(self._seq), _Entry(0, None, call)))

    def _push(self, at: float, thread: GraphThread) -> None:
        heapq.heappush(
            self._heap,
            (max(at, self.clock.now()), next(self._seq), _Entry(thread.generation, thread, None)),
        )

    def woken(self, token: WakeToken) -> None:
        thread = self._sleepers.pop(id(token), None)
        if thread is not None:
            thread.generation += 1
            self._push(self.clock.now(), thread)

    # ---- running ------------------------------------------------------------------------

    def run(self, until: float | None = None) -> None:
        """Run every event up to `until` (all of them when None)."""
        heap = self._heap
        while heap and (until is None or heap[0][0] <= until):
            at, _, entry = heapq.heappop(heap)
            self.clock.advance(at)
            if entry.call is not None:
                entry.call()
            elif entry.thread is not None and entry.generation == entry.thread.generation:
                self._advance(entry.thread)

    def _advance(self, thread: GraphThread) -> None:
        """Run the thread's nodes until it parks or ends."""
        if thread.parked:  # its sleep is over (timed out or woken): the re-run's sleep returns
            if thread.token is not None:
                self._sleepers.pop(id(thread.token), None)
                thread.token = None
            thread.parked = False
            self.clock.resuming = True
        state = thread.state
        while thread.node != END:
            node = thread.node
            try:
                update = self.nodes[node](state, thread.runtime)
            except Asleep as nap:
                self.clock.resuming = False
                thread.parked = True
                thread.token = nap.token
                if nap.token is not None:
                    self._sleepers[id(nap.token)] = thread
                self._push(nap.until, thread)
                return
            self.clock.resuming = False
            self.steps[node] += 1
            for key, value in update.items():
                reduce = REDUCERS.get(key)
                state[key] = reduce(state[key], value) if reduce and key in state else value
            if self.observer is not None:
                self.observer(thread, node, update)
            router = ROUTERS.get(node)
            thread.node = router(state) if router else EDGES[node]  # type: ignore[arg-type]
        if self.finished is not None:
            self.finished(thread)

    @property
    def pending(self) -> int:
        return len(self._heap)
