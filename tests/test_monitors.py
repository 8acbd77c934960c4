"""Who monitors each live allocation (fleet.monitors): claims, beats, stale monitors, orphans,
on SQLite and PostgreSQL. Times are passed in, so nothing here waits on the machine."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from fleet.config import FleetConfig
from fleet.ledger import Ledger
from fleet.ledger.rows import allocation_id
from fleet.models import GPURequest, ReleaseReason, RouteDecision, Status
from fleet.monitors import Heartbeat, Monitors, gone_here, this_host
from fleet.routing import route
from fleet.simulated import SimulatedFleet
from fleet.sql import Conn, SqliteDatabase
from fleet.topology import Topology
from graph.orchestrator import Orchestrator
from graph.worker import Worker

T0 = 1_800_000_000.0
REQUEST = GPURequest(project="p", count=1, duration_hours=1, gpu_type="A100")


@pytest.fixture
def ledger(database: str, config: FleetConfig) -> Iterator[Ledger]:
    led = Ledger(database, config)
    yield led
    led.close()


def place(ledger: Ledger, thread: str, renew_hours: float | None = None) -> str:
    request = GPURequest(
        project="p", count=1, duration_hours=1, gpu_type="A100", request_id=f"r-{thread}"
    )
    decision = route(request, ledger.config, None)
    assert isinstance(decision, RouteDecision)
    inventory = SimulatedFleet(ledger.config).inventory()
    placed = ledger.place(
        request,
        decision,
        thread,
        T0,
        inventory,
        Topology(ledger.config, inventory),
        renew_hours=renew_hours,
    )
    assert placed.row is not None
    return placed.row.id


def test_a_live_monitor_holds_its_claim_and_a_stale_one_loses_it(ledger: Ledger) -> None:
    mons = Monitors(ledger)
    stale = mons.stale_seconds
    aid = place(ledger, "t1")
    assert [o.row.id for o in mons.orphans(T0)] == [aid]  # nobody ever monitored it
    assert mons.orphans(T0)[0].last is None
    assert mons.claim(aid, "h:1:a:cli", T0) is None
    assert mons.claim(aid, "h:1:a:cli", T0 + 1) is None  # ours already: renewed
    holder = mons.claim(aid, "h:2:b:worker", T0 + 2)  # alive: refused, with who holds it
    assert holder is not None and holder.owner == "h:1:a:cli" and holder.kind == "cli"
    assert "cli pid 1 on h" in holder.describe(T0 + 2)
    assert mons.orphans(T0 + stale) == []
    gone = mons.orphans(T0 + 1 + stale + 1)  # silent for longer than the stale time
    assert [o.row.id for o in gone] == [aid] and gone[0].last is not None
    assert "stopped" in gone[0].describe(T0 + stale + 2)
    assert mons.claim(aid, "h:2:b:worker", T0 + stale + 2) is None  # adopted
    assert mons.beat("h:1:a:cli", {aid}, T0 + stale + 3) == {aid}  # the old one hears it lost
    assert mons.beat("h:2:b:worker", {aid}, T0 + stale + 3) == set()
    ledger.release(aid, ReleaseReason.EXPLICIT, T0 + 60)
    assert mons.orphans(T0 + 10 * stale) == []  # a released allocation needs no monitor
    assert mons.get(aid) is None  # its row went with the release


def test_a_dead_monitors_row_goes_with_the_release_whatever_releases_it(ledger: Ledger) -> None:
    """A worker that dies leaves its rows behind; the release of its allocation (by hand,
    by an adopter, or at start-up where its lease ran out unwatched) removes the row in the
    release's transaction, so nothing shows a monitor of an ended allocation. A live monitor
    whose allocation is released is not told an adopter took it; a claim undone is still
    lost."""
    mons = Monitors(ledger)
    by_hand, ran_out, live = place(ledger, "t1"), place(ledger, "t2"), place(ledger, "t3")
    for aid in (by_hand, ran_out):
        assert mons.claim(aid, "h:1:a:worker", T0) is None  # then the worker died
    assert mons.claim(live, "h:2:b:cli", T0) is None
    for aid in (by_hand, live):
        ledger.release(aid, ReleaseReason.EXPLICIT, T0 + 60)
    assert set(mons.watchers()) == {ran_out}
    assert mons.beat("h:2:b:cli", {live, "a-undone"}, T0 + 61) == {"a-undone"}
    assert [r.allocation_id for r in ledger.reconcile(T0 + 2 * 3600)] == [ran_out]
    assert mons.watchers() == {}


def test_a_claim_in_a_placement_commits_with_it_or_nothing_does(ledger: Ledger) -> None:
    """The allocate node claims the monitor in the placement's transaction (one commit for
    both): a refused claim places nothing; a placement made has its monitor."""
    mons = Monitors(ledger)
    request = GPURequest(project="p", count=1, duration_hours=1, gpu_type="A100", request_id="r-t1")
    decision = route(request, ledger.config, None)
    assert isinstance(decision, RouteDecision)
    inventory = SimulatedFleet(ledger.config).inventory()
    topology = Topology(ledger.config, inventory)
    aid = allocation_id("t1", "r-t1")
    assert mons.claim(aid, "h:1:a:cli", T0) is None  # a live monitor holds it already

    def claim(owner: str) -> Callable[[Conn], None]:
        def first(db: Conn) -> None:
            holder = mons.claim(aid, owner, T0 + 1, db=db)
            if holder is not None:
                raise RuntimeError(f"monitored by {holder.owner}")

        return first

    before = ledger.dump()
    with pytest.raises(RuntimeError, match="h:1:a:cli"):
        ledger.place(request, decision, "t1", T0 + 1, inventory, topology, first=claim("h:2:w"))
    assert ledger.dump() == before
    placed = ledger.place(
        request, decision, "t1", T0 + 1, inventory, topology, first=claim("h:1:a:cli")
    )
    assert placed.row is not None and placed.row.state == "active"
    watcher = mons.get(aid)
    assert watcher is not None and watcher.owner == "h:1:a:cli" and watcher.beat_at == T0 + 1


def test_two_adopters_at_once_one_wins(ledger: Ledger) -> None:
    mons = Monitors(ledger)
    aid = place(ledger, "t1")
    results: list[object] = []
    barrier = threading.Barrier(8)

    def adopt(i: int) -> None:
        barrier.wait()
        results.append(mons.claim(aid, f"h:{i}:x:worker", T0))

    threads = [threading.Thread(target=adopt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is None for r in results) == 1


def test_a_heartbeat_beats_and_gives_its_claims_up_on_close(ledger: Ledger) -> None:
    mons = Monitors(ledger)
    aid = place(ledger, "t1")
    beat = Heartbeat(mons, "python", period=3600)  # one beat at start, then none
    assert beat.claim(aid) is None and beat.holds(aid)
    watcher = mons.get(aid)
    assert watcher is not None and watcher.owner == beat.owner and watcher.kind == "python"
    other = Heartbeat(mons, "worker", period=3600)
    assert other.claim(aid) is not None  # alive: not adopted
    beat.close()
    assert mons.get(aid) is None  # a process that stops monitoring says so at once
    assert other.claim(aid) is None
    other.close()


def test_an_adopted_allocation_is_reported_lost_to_its_old_monitor(ledger: Ledger) -> None:
    mons = Monitors(ledger)
    aid = place(ledger, "t1")
    lost: list[str] = []
    heard = threading.Event()

    def on_lost(a: str) -> None:
        lost.append(a)
        heard.set()

    beat = Heartbeat(mons, "cli", period=0.05, lost=on_lost)
    assert beat.claim(aid) is None
    with ledger.db.lock:  # another process took it over (as after a long silence)
        ledger.db.conn().execute(
            "UPDATE monitors SET owner=? WHERE allocation_id=?", ("h:9:z:worker", aid)
        )
    assert heard.wait(30)
    assert lost == [aid] and not beat.holds(aid)
    beat.close()
    watcher = mons.get(aid)
    assert watcher is not None and watcher.owner == "h:9:z:worker"  # not dropped by the loser


# A process that claims an allocation's monitor, beats, gives the claim up and dies at once,
# closing nothing (os._exit): what it said of its liveness must be in the ledger all the same.
_GIVE_UP_AND_DIE = """
import os, sys
from fleet.ledger import Ledger
from fleet.monitors import Monitors
from tests.conftest import small_config
mons = Monitors(Ledger(sys.argv[1], small_config()))
assert mons.claim(sys.argv[2], "h:1:a:cli", 1.0) is None
assert mons.beat("h:1:a:cli", {sys.argv[2]}, 2.0) == set()
assert mons.claim(sys.argv[3], "h:1:a:cli", 1.0) is None
mons.drop(sys.argv[3], "h:1:a:cli")
os._exit(0)
"""


def test_beats_and_a_monitor_given_up_outlive_a_crash_of_their_process(
    ledger: Ledger, database: str
) -> None:
    """Beats and giving a monitor up are committed without waiting for the disk on SQLite
    (fleet.sql.Database.liveness): a crash of the process that made them still finds them."""
    kept, dropped = place(ledger, "t1"), place(ledger, "t2")
    subprocess.run(
        [sys.executable, "-c", _GIVE_UP_AND_DIE, database, kept, dropped],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    mons = Monitors(ledger)
    watcher = mons.get(kept)
    assert watcher is not None and watcher.beat_at == 2.0
    assert mons.get(dropped) is None


def test_liveness_skips_the_sync_for_its_statement_alone(tmp_path: Path) -> None:
    """Money and GPUs are written at synchronous FULL: a beat or a monitor given up is
    committed at NORMAL, for its own statement only, also when the statement fails, when an
    interrupt leaves the level changed, and not at all inside a transaction (SQLite keeps a
    transaction's level: there it commits with the transaction)."""
    db = SqliteDatabase(tmp_path / "ledger.sqlite")
    conn = cast(sqlite3.Connection, db.conn())
    conn.execute("CREATE TABLE m (a TEXT PRIMARY KEY)")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)

    def synchronous() -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    assert synchronous() == 2  # FULL
    statements.clear()
    assert db.liveness("INSERT INTO m (a) VALUES (?)", ("x",)) == 1
    assert statements == [
        "PRAGMA synchronous = NORMAL",
        "INSERT INTO m (a) VALUES ('x')",
        "PRAGMA synchronous = FULL",
    ]
    with pytest.raises(sqlite3.IntegrityError):
        db.liveness("INSERT INTO m (a) VALUES (?)", ("x",))
    assert synchronous() == 2
    with db.write() as tx:  # inside a transaction: no change of level, one commit for both
        statements.clear()
        assert db.liveness("INSERT INTO m (a) VALUES (?)", ("y",)) == 1
        tx.execute("INSERT INTO m (a) VALUES ('z')")
    assert statements == [
        "INSERT INTO m (a) VALUES ('y')",
        "INSERT INTO m (a) VALUES ('z')",
        "COMMIT",
    ]
    # what an interrupt between the two pragmas leaves: FULL again before the next write
    conn.execute("PRAGMA synchronous = NORMAL")
    db._relaxed = True
    with db.write():
        assert synchronous() == 2
    conn.set_trace_callback(None)
    db.close()


def test_a_live_monitor_in_another_pid_namespace_is_judged_by_its_beats(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Containers that share a host name and a state directory but not their PIDs (a
    Kubernetes pod's, by default): a live monitor in another PID namespace is not judged dead
    by its PID, which means another process there; only its beats going stale make it an
    orphan. One of this namespace whose PID has exited still is, at once."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    aid = place(ledger, "t1")
    ready = tmp_path / "owner"
    script = (
        "import pathlib, sys, time\n"
        "from fleet.monitors import new_owner\n"
        f"pathlib.Path({str(ready)!r}).write_text(new_owner('cli'))\n"
        "time.sleep(60)\n"
    )
    inside = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        for _ in range(600):  # the namespace and the interpreter start (up to 60 s)
            if ready.exists() and ready.read_text():
                break
            if inside.poll() is not None:
                pytest.skip("this machine does not allow new PID namespaces")
            time.sleep(0.1)
        owner = ready.read_text()
        assert owner.split(":")[0] != this_host()  # the same host, another namespace
        mons = Monitors(ledger)
        assert mons.claim(aid, owner, T0) is None
        assert not gone_here(owner)
        assert mons.alive(mons.get(aid), T0 + 1) and mons.orphans(T0 + 1) == []
        assert [o.row.id for o in mons.orphans(T0 + mons.stale_seconds + 1)] == [aid]
    finally:
        inside.kill()
        inside.wait()
    exited = subprocess.Popen(["true"])
    exited.wait()
    assert gone_here(f"{this_host()}:{exited.pid}:x:cli")


def test_an_allocation_whose_thread_does_not_run_it_is_not_beaten_for(
    make_orch: Callable[..., Orchestrator],
) -> None:
    """A live allocation whose thread has ended (its checkpoints were lost, or a version
    before named threads were claimed let two requests race on one): adopting it runs
    nothing, so the adopter gives its claim up at once (`status` then shows it unmonitored,
    not monitored for nothing), and a worker does not adopt it again and again."""
    orch = make_orch()
    ended = orch.request(REQUEST, wait=False)  # a generated thread id: never claimed
    assert ended.allocation is not None
    orch.services.release(ended.allocation.id, ReleaseReason.EXPLICIT)
    assert orch.resume(ended.thread_id).status is Status.RELEASED  # it ran to its end
    ledger = orch.services.ledger
    stray = ledger.place(
        REQUEST.model_copy(update={"request_id": "r-stray"}),
        ledger_route(orch),
        ended.thread_id,
        orch.services.clock.now(),
        orch.services.inventory,
        orch.services.topology,
    ).row
    assert stray is not None and stray.state == "active"
    mons = Monitors(ledger)
    assert [o.row.id for o in orch.orphans()] == [stray.id]
    for _, thread in orch.adopt():  # resume --orphans
        thread.join()
    assert mons.get(stray.id) is None  # given up: nothing runs it
    assert [o.row.id for o in orch.orphans()] == [stray.id]
    worker = Worker(orch, concurrency=1)
    assert worker._adopt_one() is True  # tried once ...
    assert mons.get(stray.id) is None
    assert worker._adopt_one() is False  # ... and not again
    assert ledger.get(stray.id).state == "active"  # left for `gpu-agent release`


def ledger_route(orch: Orchestrator) -> RouteDecision:
    decision = orch.services.route(REQUEST)
    assert isinstance(decision, RouteDecision)
    return decision
