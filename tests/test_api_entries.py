"""The Python API checks what it is given, and a caller who stops waiting, or whose callback
fails, leaves nothing placed without a monitor (found by an attacker's pass, session 24)."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from fleet.access import LOCAL, Identity, add_identity
from fleet.clock import VirtualClock, WallClock
from fleet.errors import Forbidden, InvalidInput
from fleet.jobs import Job
from fleet.models import GPURequest, ReleaseReason, Status
from graph.orchestrator import Orchestrator
from graph.subgraph import gpu_request_node
from tests.conftest import OrchFactory, small_config
from tests.test_graph_e2e import split_config


def req(**fields: Any) -> dict[str, Any]:
    return {"project": "p", "purpose": "training", "count": 1, "duration_hours": 1} | fields


def test_the_constructor_checks_the_project_and_the_monitor_kind(make_orch: OrchFactory) -> None:
    with pytest.raises(InvalidInput, match="project 'bad name!'"):
        make_orch(project="bad name!")
    with pytest.raises(InvalidInput, match="monitor_kind must be one of"):
        make_orch(monitor_kind="evil\nkind")


@pytest.mark.parametrize(
    ("argument", "value", "said"),
    [
        ("clock", "now", "clock must be a Clock (fleet.clock), not 'now'"),
        ("council", 5, "council must be a Council (council.voting), not of type int"),
        ("create", "yes", "create must be true or false, not 'yes'"),
        ("pool_size", "8", "pool_size must be a whole number of connections, at least 1"),
        ("pool_size", 0, "pool_size must be a whole number of connections, at least 1"),
        ("token", 5, "token must be a token (text), not of type int"),
        ("identity", "root", "identity must be an Identity (fleet.access), not 'root'"),
        ("backend", 5, "backend must be a backend's name, a BackendChoice or a FleetBackend"),
        ("fleet", 5, "fleet must be a fleet file's path or a FleetConfig, not of type int"),
        (
            "fleet",
            GPURequest(duration_hours=1),  # a pydantic model, but no FleetConfig
            "fleet must be a fleet file's path or a FleetConfig, not of type GPURequest",
        ),
        (
            "identity",
            Identity("ev il\nname", "p", "member"),
            "identity 'ev il\\nname': 1-64 letters",
        ),
    ],
)
def test_wrong_typed_constructor_arguments_are_one_line_and_create_nothing(
    tmp_path: Path, argument: str, value: object, said: str
) -> None:
    given = {"fleet": small_config(), "clock": VirtualClock()} | {argument: value}
    with pytest.raises(InvalidInput) as exc:
        Orchestrator(tmp_path / "state", **given)  # type: ignore[arg-type]
    assert str(exc.value).startswith(said) and "\n" not in str(exc.value)
    assert not (tmp_path / "state").exists()


def test_release_preempt_and_audit_check_their_arguments(make_orch: OrchFactory) -> None:
    orch = make_orch()
    out = orch.request(req(gpu_type="A100", duration_hours=5), thread_id="t", wait=False)
    assert out.allocation is not None
    aid = out.allocation.id
    before = orch.services.ledger.dump()
    for reason in (ReleaseReason.UNHEALTHY, ReleaseReason.BUDGET, "bogus", None):
        with pytest.raises(InvalidInput, match="a release's reason is one of explicit"):
            orch.release(aid, reason)  # type: ignore[arg-type]
    for why in (None, 5, "a\rb", "evil\u202eoops", "x" * 501):
        with pytest.raises(InvalidInput, match="--why"):
            orch.preempt(aid, why)  # type: ignore[arg-type]
    for limit in (0, -1, True, 2.0, "2"):
        with pytest.raises(InvalidInput, match="limit must be a whole number"):
            orch.audit(limit=limit)  # type: ignore[arg-type]
    assert orch.services.ledger.dump() == before
    assert orch.release(aid, "explicit").reason is ReleaseReason.EXPLICIT  # type: ignore[arg-type]
    assert len(orch.audit(limit=1)) == 1


def test_a_misspelt_review_key_is_refused_not_dropped(make_orch: OrchFactory) -> None:
    orch = make_orch(split_config())
    out = orch.request(req(), thread_id="r")
    assert out.status is Status.PENDING_REVIEW
    with pytest.raises(InvalidInput, match="a review decision must be"):
        orch.resume("r", {"approve": True, "guardrail": False})
    assert orch.outcome("r").status is Status.PENDING_REVIEW


def test_start_job_never_overwrites_a_thread(make_orch: OrchFactory) -> None:
    """A job whose thread already runs is resumed, not started again (its first step would
    overwrite the thread and strand the allocation it placed)."""
    orch = make_orch()
    out = orch.request(req(gpu_type="A100"), thread_id="t", wait=False)
    assert out.allocation is not None
    other = GPURequest.model_validate(req(project="q"))
    with pytest.raises(InvalidInput, match="thread 't' already exists; resume it instead"):
        orch.start_job(Job("t", other, "pending", 0.0, None, None, None, 0, None, None, None))
    kept = orch.outcome("t").request
    assert kept is not None and kept.project == "p"
    assert orch.resume("t").status is Status.RELEASED


def test_continue_in_background_refuses_what_it_cannot_run(make_orch: OrchFactory) -> None:
    orch = make_orch()
    with pytest.raises(InvalidInput, match="no thread 'no-such-thread'"):
        orch.continue_in_background("no-such-thread")
    with pytest.raises(InvalidInput, match="thread id 'bad id!'"):
        orch.continue_in_background("bad id!")


def test_a_callback_that_raises_does_not_stop_the_run(
    make_orch: OrchFactory, caplog: pytest.LogCaptureFixture
) -> None:
    orch = make_orch()

    def fails(_: object) -> None:
        raise RuntimeError("callback bug")

    out = orch.request(req(gpu_type="A100"), thread_id="cb", on_event=fails, on_progress=fails)
    assert out.status is Status.RELEASED and out.release is not None
    assert out.release.reason is ReleaseReason.LEASE_EXPIRED  # monitored to its end
    assert orch.services.ledger.live() == []
    assert "a callback raised; the run goes on" in caplog.text


def _full_then_waiting(make_orch: OrchFactory) -> tuple[Orchestrator, str]:
    """Every H100 held (on the wall clock, half an hour), so that the next request queues."""
    orch = make_orch(small_config(monitor={"tick_seconds": 1}), clock=WallClock())
    held = orch.request(
        req(gpu_type="H100", count=2, duration_hours=0.5), thread_id="a", wait=False
    )
    assert held.allocation is not None
    orch.continue_in_background("a")
    return orch, held.allocation.id


def _queued(orch: Orchestrator, project: str) -> threading.Event:
    """Set once `project` has a queued allocation (a watcher thread polls the ledger)."""
    seen = threading.Event()

    def watch() -> None:
        while not seen.is_set():
            if any(r.project == project for r in orch.services.ledger.allocations("queued")):
                seen.set()
                return
            threading.Event().wait(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def _nothing_left_for(orch: Orchestrator, project: str, first: str) -> None:
    """Once the GPUs come back, nothing of `project` is placed: it was cancelled."""
    orch.release(first)
    rows = [r for r in orch.services.ledger.allocations() if r.project == project]
    assert [(r.state, r.release_reason) for r in rows] == [("released", ReleaseReason.CANCELLED)]


def test_ctrl_c_while_allocate_gpu_sync_waits_leaves_nothing_placed(
    make_orch: OrchFactory,
) -> None:
    orch, first = _full_then_waiting(make_orch)
    queued = _queued(orch, "q")
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        queued.wait(30)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        orch.allocate_gpu_sync(req(gpu_type="H100", count=2, project="q"), thread_id="qq")
    assert queued.is_set()
    _nothing_left_for(orch, "q", first)


def test_ctrl_c_before_the_wait_begins_leaves_nothing_placed(
    make_orch: OrchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the request's thread was spawned, before the wait's own cleanup could
    run (between `_placing` and `_held`): the caller still withdraws it."""
    orch, first = _full_then_waiting(make_orch)
    queued = _queued(orch, "q")
    spawn, runners = orch._spawn, []

    def recorded(fn: Any) -> threading.Thread:
        runners.append(spawn(fn))
        return runners[-1]

    def interrupted(placing: Any, withdraw: bool) -> Any:
        assert queued.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(orch, "_spawn", recorded)
    monkeypatch.setattr(orch, "_held", interrupted)
    with pytest.raises(KeyboardInterrupt):
        orch.allocate_gpu_sync(req(gpu_type="H100", count=2, project="q"), thread_id="qq")
    for runner in runners:
        runner.join(30)
    _nothing_left_for(orch, "q", first)


def test_a_cancelled_allocate_gpu_leaves_nothing_placed(make_orch: OrchFactory) -> None:
    orch, first = _full_then_waiting(make_orch)

    async def main() -> None:
        task = asyncio.ensure_future(orch.allocate_gpu(req(gpu_type="H100", count=2, project="q")))
        while not any(r.project == "q" for r in orch.services.ledger.allocations("queued")):
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _nothing_left_for(orch, "q", first)


class Parent(TypedDict, total=False):
    gpu_request: Any
    gpu_result: Any


def test_the_graph_in_a_parent_requests_only_as_its_caller(make_orch: OrchFactory) -> None:
    """With an Orchestrator's context, the graph run inside another (or invoked directly)
    requests GPUs only for a project its caller may act on, and as that caller."""
    state_dir = make_orch().services.state_dir
    add_identity(state_dir, "boss", "admin", None)
    token = add_identity(state_dir, "vic", "member", "vision")
    vic = make_orch(token=token)
    assert vic.services.state_dir == state_dir
    get_gpus: Any = gpu_request_node()  # a plain-dict node, as other graphs embed it
    builder = StateGraph(Parent)
    builder.add_node("gpus", get_gpus)
    builder.add_edge(START, "gpus")
    builder.add_edge("gpus", END)
    parent: Any = builder.compile(checkpointer=InMemorySaver())

    def run(request: dict[str, Any], thread: str) -> dict[str, Any]:
        out = parent.invoke(
            {"gpu_request": request}, {"configurable": {"thread_id": thread}}, context=vic.context
        )
        return dict(out["gpu_result"])

    denied = run(req(project="nlp", gpu_type="T4", requested_by="boss"), "x1")
    assert denied["status"] == "denied"
    assert denied["reason"] == "vic (member of vision) may not request GPUs of project nlp"
    with pytest.raises(Forbidden):
        vic.request(req(project="nlp"))
    assert run(req(project="vision", gpu_type="T4", requested_by="boss"), "x2")["status"] == (
        "released"
    )
    [record] = vic.history()
    assert record.request is not None and record.request.requested_by == "vic"
    missing = parent.invoke({}, {"configurable": {"thread_id": "x3"}}, context=vic.context)
    assert missing["gpu_result"]["reason"] == "the state has no 'gpu_request'"


def test_a_worker_runs_a_job_as_its_submitter(make_orch: OrchFactory) -> None:
    """Who asked stays the submitter's name, not the worker's (an admin acting for them)."""
    from fleet.jobs import JobQueue
    from graph.worker import Worker

    state_dir = make_orch().services.state_dir
    boss = add_identity(state_dir, "boss", "admin", None)
    vic = add_identity(state_dir, "vic", "member", "vision")
    job = make_orch(token=vic).submit(req(project="vision", gpu_type="T4"))
    worker = Worker(make_orch(token=boss), concurrency=1)
    claimed = JobQueue(worker.orch.services.ledger).claim(worker.worker_id, 30.0)
    assert claimed is not None and claimed.thread_id == job.thread_id
    worker._run(claimed)
    [record] = worker.orch.history()
    assert record.request is not None and record.request.requested_by == "vic"


def test_an_adoption_that_fails_once_lets_go_and_is_tried_again(
    make_orch: OrchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient error while adopting gives the monitor's claim back (another process may
    adopt it) and this worker tries again; it leaves the allocation only after max_attempts."""
    from fleet.monitors import Monitors
    from graph.worker import Worker

    orch = make_orch()
    out = orch.request(req(gpu_type="A100"), thread_id="orphan", wait=False)
    assert out.allocation is not None  # nobody monitors it once the call returned
    resume = orch.resume
    calls: list[str] = []

    def flaky(thread_id: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(thread_id)
        if len(calls) == 1:
            raise RuntimeError("the database went away for a moment")
        return resume(thread_id, *args, **kwargs)

    monkeypatch.setattr(orch, "resume", flaky)
    worker = Worker(orch, concurrency=1)
    assert worker._adopt_one() is True
    assert Monitors(orch.services.ledger).get(out.allocation.id) is None  # let go
    assert worker._adopt_one() is True  # again, and now to its end
    assert calls == ["orphan", "orphan"]
    assert orch.services.ledger.get(out.allocation.id).state == "released"


def test_a_cancel_scope_that_cancels_again_still_withdraws(
    make_orch: OrchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """anyio cancels again at every await in a cancelled scope: the cleanup awaits nothing,
    so a request whose caller gave up while it was being checked is still withdrawn."""
    import time

    import anyio

    orch = make_orch(small_config(monitor={"tick_seconds": 1}), clock=WallClock())
    check = orch.check

    def slow(request: Any) -> GPURequest:
        time.sleep(0.5)  # database round trips, slowed
        return check(request)

    monkeypatch.setattr(orch, "check", slow)
    spawn, runs = orch._spawn, []

    def spawned(fn: Any) -> threading.Thread:
        runs.append(spawn(fn))
        return runs[-1]

    monkeypatch.setattr(orch, "_spawn", spawned)

    async def main() -> None:
        with anyio.move_on_after(0.1):
            await orch.allocate_gpu(req(gpu_type="A100", project="q"))

    asyncio.run(main())  # waits for the thread that was placing it
    [run] = runs
    run.join(30)  # refused (its thread revoked): it ends; placed, it would hold an hour
    assert not run.is_alive()
    rows = [r for r in orch.services.ledger.allocations() if r.project == "q"]
    assert all(r.state == "released" for r in rows), rows


class _MyRequest(GPURequest):
    """A caller's own request type, with a field the graph knows nothing of."""

    note: str = "mine"


_BASE = GPURequest(project="p", count=1, duration_hours=1)


@pytest.mark.parametrize(
    ("request_", "said"),
    [
        (_BASE.model_copy(update={"project": "vi sion\n"}), "invalid request: project"),
        (_BASE.model_copy(update={"duration_hours": float("nan")}), "duration_hours: Input"),
        (_BASE.model_copy(update={"count": 0}), "count: Input should be greater than"),
        (_BASE.model_copy(update={"count": "x"}), "count: Input should be a valid integer"),
        (_MyRequest(project="p", count=1, duration_hours=1), "note: Extra inputs"),
    ],
)
def test_a_request_instance_is_checked_again_and_a_bad_one_leaves_nothing(
    make_orch: OrchFactory, request_: GPURequest, said: str
) -> None:
    """model_copy(update=...) skips a model's checks and a subclass adds fields: such a
    request is refused in one line, with no thread, ledger row or claim on its name left."""
    orch = make_orch()
    before = orch.services.ledger.dump()
    with pytest.raises(InvalidInput, match=said) as exc:
        orch.request(request_, thread_id="t", wait=False)
    assert "\n" not in str(exc.value)
    assert orch.services.ledger.dump() == before
    with pytest.raises(InvalidInput, match="no thread 't'"):
        orch.outcome("t")
    assert orch.request(_BASE, thread_id="t", wait=False).status is Status.ALLOCATED


def test_a_checked_request_keeps_the_fields_its_caller_set(make_orch: OrchFactory) -> None:
    """Only a request that names no project is given the Orchestrator's project."""
    orch = make_orch(project="vision")
    named = orch.check(GPURequest(project="p", duration_hours=1).model_copy(update={"count": 2}))
    assert (named.project, named.count) == ("p", 2)
    unnamed = GPURequest(duration_hours=1)
    checked = orch.check(unnamed)
    assert checked.project == "vision" and checked.request_id == unnamed.request_id


@pytest.mark.parametrize(
    ("identity", "said"),
    [
        ("root", "identity must be an Identity (fleet.access), not 'root'"),
        ({"name": "x"}, "identity must be an Identity (fleet.access), not of type dict"),
        (None, "identity must be an Identity (fleet.access), not of type NoneType"),
        (Identity("ev il\nname", "p", "member"), "identity 'ev il\\nname': 1-64"),
        (Identity("eve", "p", "boss"), "role must be one of member, approver, admin"),  # type: ignore[arg-type]
        (Identity("eve", None, "member"), "a member belongs to a project"),
        (Identity("eve", "p q", "approver"), "project 'p q'"),
        (Identity("local", "p", "member"), "identity name 'local' is reserved"),
    ],
)
def test_acting_as_checks_the_identity_as_the_constructor_does(
    make_orch: OrchFactory, identity: object, said: str
) -> None:
    """A server acting for its users gets one line for an identity nobody may act as (its
    name would be stamped as who asked), not an AttributeError later; nothing is changed."""
    orch = make_orch()
    before = orch.services.ledger.dump()
    with pytest.raises(InvalidInput) as exc:
        orch.acting_as(identity)  # type: ignore[arg-type]
    assert str(exc.value).startswith(said) and "\n" not in str(exc.value)
    assert orch.services.ledger.dump() == before
    alice = orch.acting_as(Identity("alice", "p", "member"))
    asked = alice.request(req(), thread_id="t", wait=False).request
    assert asked is not None and asked.requested_by == "alice"
    assert orch.acting_as(LOCAL).context.identity is LOCAL


def test_a_budget_past_a_floats_range_is_invalid_input(make_orch: OrchFactory) -> None:
    """An int too large for a float is refused as any other amount out of range."""
    orch = make_orch()
    before = orch.services.ledger.dump()
    for usd in (10**400, -(10**5000)):
        with pytest.raises(
            InvalidInput, match=r"budget must be an amount from \$0 to .*, not about"
        ):
            orch.set_budget("p", usd)
    assert orch.services.ledger.dump() == before
