"""A thread run by gpu-agent keeps its latest checkpoint, not one a monitor tick: what it
shows, a resume after a crash mid-run or before its release, runs cut short one after
another, a prune interrupted, a review, PostgreSQL, and `keep = "all"`."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import pytest
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.types import Command

from fleet.clock import VirtualClock
from fleet.config import CheckpointSettings, FleetConfig
from fleet.errors import InvalidInput
from fleet.models import EventKind, GPURequest, ReleaseReason, Status
from graph.builder import build_graph
from graph.checkpoint import PRUNE_EVERY, PrunedOnPut, prune, serializer
from graph.orchestrator import Orchestrator
from graph.server import _postgres, _PrunedSqliteSaver, checkpointer
from nodes.state import InputState
from tests.conftest import OrchFactory, fleet_toml, run_cli, small_config
from tests.test_graph_e2e import split_config  # every request stops for a review

TEN_HOURS = {"project": "p", "purpose": "training", "count": 1, "duration_hours": 10}


def checkpoints(orch: Orchestrator, thread_id: str) -> int:
    return len(list(orch.checkpointer.list({"configurable": {"thread_id": thread_id}})))


def charged_once(orch: Orchestrator, allocation_id: str) -> float:
    rows = orch.services.ledger.query(
        "SELECT amount_usd FROM charges WHERE allocation_id = ?", (allocation_id,)
    )
    assert len(rows) == 1, rows
    return float(rows[0][0])


def keeping(keep: Literal["latest", "all"]) -> FleetConfig:
    return small_config().model_copy(update={"checkpoints": CheckpointSettings(keep=keep)})


def test_a_monitored_run_keeps_its_latest_checkpoint(make_orch: OrchFactory) -> None:
    """Ten hours at a 60-second tick wrote 303 checkpoints (2.3 MB); now one, from which
    the thread says all it said before, and a resume of the ended thread changes nothing."""
    orch = make_orch()
    out = orch.request(TEN_HOURS, thread_id="t")
    assert out.status is Status.RELEASED and out.release is not None and out.allocation
    assert out.release.reason is ReleaseReason.LEASE_EXPIRED
    assert checkpoints(orch, "t") == 1
    snap = orch.graph.get_state({"configurable": {"thread_id": "t"}})
    assert snap.next == () and snap.parent_config is None
    later = orch.outcome("t")
    assert later.status is Status.RELEASED and later.release == out.release
    assert later.council == out.council and later.route == out.route
    assert [e.kind for e in later.events] == [e.kind for e in out.events]
    assert orch.resume("t").release == out.release
    assert charged_once(orch, out.allocation.id) == pytest.approx(out.release.cost_usd)


def test_keep_all_keeps_every_step(make_orch: OrchFactory) -> None:
    orch = make_orch(keeping("all"))
    out = orch.request(TEN_HOURS, thread_id="t")
    assert out.status is Status.RELEASED
    assert checkpoints(orch, "t") > 300


def test_a_crash_after_a_prune_resumes_from_the_latest_tick(
    make_orch: OrchFactory, tmp_path: Path
) -> None:
    """The state directory as a SIGKILL leaves it some ticks after a prune mid-run: the
    thread holds the ticks since, and a resume carries the allocation on to its end, the
    ticks counted on from where they were, released and charged once."""
    clock = VirtualClock()
    orch = make_orch(clock=clock)
    crash, at = tmp_path / "crash", []
    ticks = PRUNE_EVERY + 8

    def copy_at_tick(line: dict[str, Any]) -> None:
        if line.get("node") == "monitor" and not crash.exists():
            at.append(clock.now())
            if len(at) == ticks:
                shutil.copytree(orch.services.state_dir, crash)

    done = orch.request(TEN_HOURS, thread_id="t", on_progress=copy_at_tick)
    assert done.release is not None and done.allocation is not None
    orch.close()
    with sqlite3.connect(crash / "ledger.sqlite") as db:
        db.execute("DELETE FROM monitors")  # its process is gone
        [(ticks_then,)] = db.execute("SELECT ticks FROM allocations").fetchall()
    again = make_orch(clock=VirtualClock(start=at[-1]), name="crash")
    kept = checkpoints(again, "t")
    assert 1 <= kept <= ticks - PRUNE_EVERY + 2, kept
    out = again.resume("t")
    assert out.status is Status.RELEASED and out.release is not None
    assert out.release.reason is ReleaseReason.LEASE_EXPIRED
    assert out.release.hours == pytest.approx(done.release.hours)
    assert charged_once(again, done.allocation.id) == pytest.approx(done.release.cost_usd)
    [(ticks_after,)] = again.services.ledger.query("SELECT ticks FROM allocations", ())
    assert int(ticks_after) > int(ticks_then) >= PRUNE_EVERY
    assert checkpoints(again, "t") == 1


def test_a_review_is_kept_through_the_prune(make_orch: OrchFactory) -> None:
    """A thread that stops for a review is not pruned (nothing ticked); approved, it runs,
    and the one checkpoint left still says who decided."""
    orch = make_orch(split_config())
    asked = orch.request(TEN_HOURS | {"count": 2}, thread_id="r")
    assert asked.status is Status.PENDING_REVIEW
    assert checkpoints(orch, "r") == 1  # durability "exit": one at the interrupt
    done = orch.resume("r", {"approve": True, "by": "ana", "comment": "deadline"})
    assert done.status is Status.RELEASED and checkpoints(orch, "r") == 1
    later = orch.outcome("r")
    assert EventKind.HUMAN_DECISION in [e.kind for e in later.events]
    assert later.human is not None and later.human.by == "ana"


def test_postgres_keeps_the_latest_too(tmp_path: Path, pg_url: str) -> None:
    orch = Orchestrator(tmp_path / "s", small_config(), clock=VirtualClock(), database=pg_url)
    try:
        out = orch.request(TEN_HOURS, thread_id="t")
        assert out.status is Status.RELEASED and out.allocation is not None
        assert checkpoints(orch, "t") == 1
        assert orch.outcome("t").release == out.release
        assert orch.resume("t").release == out.release
        assert charged_once(orch, out.allocation.id) == pytest.approx(out.cost_usd)
    finally:
        orch.close()


def test_a_fork_from_a_pruned_checkpoint_is_refused(make_orch: OrchFactory) -> None:
    """A checkpoint id noted before a prune (the review's) no longer exists: reading or
    forking from it is refused with one line, and nothing changes (LangGraph would run the
    graph from its start, moving the thread's head to an invalid state)."""
    orch = make_orch(split_config())
    asked = orch.request(TEN_HOURS | {"count": 2}, thread_id="r")
    assert asked.status is Status.PENDING_REVIEW
    review = orch.graph.get_state({"configurable": {"thread_id": "r"}}).config
    done = orch.resume("r", {"approve": True, "by": "ana"})
    assert done.status is Status.RELEASED and done.allocation is not None
    for read in (
        lambda: orch.graph.get_state(review),
        lambda: orch.graph.invoke(Command(resume={"approve": False, "by": "bo"}), review),
    ):
        with pytest.raises(InvalidInput, match=r"has no checkpoint .* keep = .all."):
            read()
    assert checkpoints(orch, "r") == 1 and orch.outcome("r").release == done.release
    assert [a.id for a in orch.services.ledger.allocations()] == [done.allocation.id]
    assert charged_once(orch, done.allocation.id) == pytest.approx(done.cost_usd)


class _Stop(BaseException):
    """Stops a run from its progress hook, as Ctrl-C would."""


def test_runs_cut_short_one_after_another_do_not_pile_up(make_orch: OrchFactory) -> None:
    """Each run prunes at its first tick, so runs stopped before their 32nd tick (Ctrl-C, a
    worker giving a job back) leave no more than one run's ticks."""
    orch = make_orch()

    def stop_at(n: int) -> Any:
        seen = [0]

        def hook(line: dict[str, Any]) -> None:
            seen[0] += line.get("node") == "monitor"
            if seen[0] == n:
                raise _Stop

        return hook

    with pytest.raises(_Stop):
        orch.request(TEN_HOURS, thread_id="t", on_progress=stop_at(PRUNE_EVERY - 1))
    for _ in range(3):
        with pytest.raises(_Stop):
            orch.resume("t", on_progress=stop_at(PRUNE_EVERY - 1))
        assert checkpoints(orch, "t") <= PRUNE_EVERY + 1
    assert orch.resume("t").status is Status.RELEASED and checkpoints(orch, "t") == 1


def test_an_ended_thread_is_pruned_when_resumed(make_orch: OrchFactory, tmp_path: Path) -> None:
    """A thread that ended with every step kept (`keep = "all"`, a version before pruning,
    or an end whose prune failed) is pruned by a `resume`, which changes nothing else."""
    orch = make_orch(keeping("all"))
    out = orch.request(TEN_HOURS, thread_id="t")
    assert checkpoints(orch, "t") > 300
    orch.close()
    again = make_orch()  # the same state directory, keeping the latest
    assert again.resume("t").release == out.release and checkpoints(again, "t") == 1
    assert again.outcome("t").release == out.release


def test_an_interrupted_prune_deletes_nothing(make_orch: OrchFactory) -> None:
    """Ctrl-C between its statements rolls the whole prune back: one transaction."""
    orch = make_orch(keeping("all"))
    orch.request(TEN_HOURS, thread_id="t")
    saver = orch.checkpointer
    assert isinstance(saver, SqliteSaver)
    before = checkpoints(orch, "t")
    real = saver.conn

    class Interrupted:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql.startswith("DELETE FROM checkpoints"):
                raise KeyboardInterrupt
            return real.execute(sql, *args)

    saver.conn = Interrupted()  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            prune(saver, "t")
    finally:
        saver.conn = real
    assert not real.in_transaction
    assert checkpoints(orch, "t") == before
    [(writes,)] = real.execute("SELECT count(*) FROM writes WHERE thread_id = 't'").fetchall()
    assert writes > 3  # the writes of every step, not only the latest's
    prune(saver, "t")
    assert checkpoints(orch, "t") == 1


def test_a_crash_before_the_release_then_resume_leaves_one(tmp_path: Path) -> None:
    """A real `gpu-agent request` killed (SIGKILL) just before deallocate, after its ticks;
    the `resume` that releases it ticks no more and still leaves one checkpoint."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 600}, monitor={"tick_seconds": 30}))
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]
    ask = ["request", "--project", "p", "--purpose", "training", "--count", "2", "--hours", "1"]
    killed = run_cli(
        *ask, "--gpu-type", "A100", "--thread-id", "t", *opts,
        cwd=tmp_path, env={"GPU_AGENT_FAULT": "before:deallocate"},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr

    def left() -> int:
        with sqlite3.connect(tmp_path / "state" / "checkpoints.sqlite") as db:
            return int(
                db.execute("SELECT count(*) FROM checkpoints WHERE thread_id = 't'").fetchone()[0]
            )

    # the last prune kept one and the last tick wrote one: two at least, however many ticks
    # this machine ran before the lease ended
    assert left() >= 2
    done = run_cli("resume", "t", "--json", *opts, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "released" and left() == 1


def _server_run(orch: Orchestrator, saver: Any) -> tuple[Any, list[int]]:
    """TEN_HOURS through our graph on an asynchronous saver, as the LangGraph server runs
    it (one checkpoint a step, durability "async"): its final state, and how many
    checkpoints the thread held after each write (on SQLite counted by a query: listing them
    deserialises each, which cost the saver that keeps every step two minutes)."""
    live: list[int] = []
    real = saver.aput
    config: Any = {"configurable": {"thread_id": "t"}}

    async def held() -> int:
        if isinstance(saver, AsyncSqliteSaver):
            sql = "SELECT count(*) FROM checkpoints WHERE thread_id = ?"
            async with saver.conn.execute(sql, ("t",)) as cursor:
                row = await cursor.fetchone()
            assert row is not None
            return int(row[0])
        return len([c async for c in saver.alist(config)])

    async def counted(*args: Any) -> Any:
        saved = await real(*args)
        live.append(await held())
        return saved

    saver.aput = counted
    graph = build_graph(saver)
    ask = InputState(request=GPURequest.model_validate(TEN_HOURS))
    final = asyncio.run(graph.ainvoke(ask, config, context=orch.context))
    return final, live


async def _sqlite_saver(path: Path, keep_latest: bool) -> Any:
    kind = _PrunedSqliteSaver if keep_latest else AsyncSqliteSaver
    saver = kind(await aiosqlite.connect(str(path)), serde=serializer())
    await saver.setup()
    return saver


def test_the_servers_saver_keeps_the_latest(make_orch: OrchFactory, tmp_path: Path) -> None:
    """The LangGraph server's runs write a checkpoint a step and no Orchestrator prunes
    them: its saver prunes at every PRUNE_EVERY-th step and at the release, so a thread holds
    at most PRUNE_EVERY + 1 while it runs and one at its end, with the same outcome as
    a saver that keeps every step."""
    orch = make_orch()
    pruned = asyncio.run(_sqlite_saver(tmp_path / "pruned.sqlite", True))
    out, live = _server_run(orch, pruned)
    asyncio.run(pruned.conn.close())
    kept = asyncio.run(_sqlite_saver(tmp_path / "all.sqlite", False))
    everything, all_live = _server_run(orch, kept)
    asyncio.run(kept.conn.close())
    assert out["status"] is Status.RELEASED and everything["status"] is Status.RELEASED
    assert out["release"].reason is everything["release"].reason is ReleaseReason.LEASE_EXPIRED
    assert out["release"].cost_usd == everything["release"].cost_usd
    assert len(live) == len(all_live) > 300  # a put a step, ticks included
    assert max(live) == PRUNE_EVERY + 1 and live[-1] == 1
    assert all_live[-1] == len(all_live)
    assert charged_once(orch, out["allocation"].id) == pytest.approx(out["release"].cost_usd)


def test_the_servers_postgres_saver_keeps_the_latest(make_orch: OrchFactory, pg_url: str) -> None:
    async def run() -> tuple[Any, list[int]]:
        async with _postgres(pg_url, keep_latest=True) as saver:
            return await asyncio.to_thread(_server_run, make_orch(), saver)

    out, live = asyncio.run(run())
    assert out["status"] is Status.RELEASED
    assert max(live) == PRUNE_EVERY + 1 and live[-1] == 1


@pytest.mark.parametrize("keep", ["latest", "all"])
def test_the_servers_checkpointer_follows_the_fleet(
    keep: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(checkpoints={"keep": keep}))
    monkeypatch.setenv("GPU_AGENT_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("GPU_AGENT_FLEET", str(fleet))
    monkeypatch.delenv("GPU_AGENT_DATABASE", raising=False)

    async def kind() -> type:
        async with checkpointer() as saver:
            return type(saver)

    assert issubclass(asyncio.run(kind()), PrunedOnPut) is (keep == "latest")
