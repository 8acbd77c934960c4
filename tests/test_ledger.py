"""The ledger: atomic placement, exactly-once release, budgets, reconciliation, corruption."""

from __future__ import annotations

import contextlib
import functools
import random
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from council.record import past_jobs, rates
from fleet.budget import RECORDS
from fleet.config import FleetConfig
from fleet.errors import InvalidInput, StateDirError
from fleet.fleet_backend import SchedulerJob
from fleet.ledger import Ledger
from fleet.ledger.schema import SCHEMA_VERSION
from fleet.models import GPURequest, ReleaseReason, RouteDecision, utc
from fleet.placement import Kind
from fleet.routing import route
from fleet.scheduler import summarise
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology

T0 = 1_800_000_000.0


class Fixture:
    def __init__(self, path: Path | str, config: FleetConfig, *, durable: bool = True) -> None:
        self.config = config
        self.ledger = Ledger(path, config, durable=durable)
        self.inventory = SimulatedFleet(config).inventory()
        self.topology = Topology(config, self.inventory)

    def place(  # type: ignore[no-untyped-def]
        self, thread: str, now: float = T0, renew_hours: float | None = None, **fields: object
    ):
        base: dict[str, object] = {
            "project": "p",
            "purpose": "training",
            "count": 2,
            "duration_hours": 2,
            "gpu_type": "A100",
            "request_id": f"r-{thread}",
        }
        request = GPURequest.model_validate(base | fields)
        decision = route(request, self.config, None)
        assert isinstance(decision, RouteDecision)
        return self.ledger.place(
            request, decision, thread, now, self.inventory, self.topology, renew_hours=renew_hours
        )


@pytest.fixture
def fx(database: str, config: FleetConfig) -> Iterator[Fixture]:
    """A ledger on SQLite, and the same on PostgreSQL."""
    f = Fixture(database, config)
    yield f
    f.ledger.close()


@pytest.fixture
def sqlite_fx(tmp_path: Path, config: FleetConfig) -> Fixture:
    return Fixture(tmp_path / "ledger.sqlite", config)


def counts(ledger: Ledger) -> tuple[int, int, int]:
    rows = ledger.dump()
    return tuple(
        sum(r.startswith(f"{t}: ") for r in rows)  # type: ignore[return-value]
        for t in ("holds", "charges", "history")
    )


def test_place_is_idempotent(fx: Fixture) -> None:
    first = fx.place("t1")
    again = fx.place("t1", now=T0 + 100)
    assert first.decision.kind is Kind.PLACE and again.decision.kind is Kind.PLACE
    assert first.row is not None and again.row is not None
    assert again.row.gpu_ids == first.row.gpu_ids and again.row.started_at == T0
    assert counts(fx.ledger) == (2, 0, 0)


def test_no_gpu_is_held_twice(fx: Fixture) -> None:
    held: set[str] = set()
    for i in range(4):
        res = fx.place(f"t{i}")
        assert res.decision.kind is Kind.PLACE and res.row is not None
        assert not held & set(res.row.gpu_ids)
        held |= set(res.row.gpu_ids)
    assert fx.place("t9").decision.kind is Kind.QUEUE  # 8 A100 in the fleet


def test_release_charges_and_records_once(fx: Fixture) -> None:
    row = fx.place("t1").row
    assert row is not None
    first = fx.ledger.release(row.id, ReleaseReason.EXPLICIT, T0 + 1800)
    second = fx.ledger.release(row.id, ReleaseReason.IDLE, T0 + 3600)
    assert first == second
    assert first.cost_usd == pytest.approx(2 * 5.12 * 0.5)
    assert first.reason is ReleaseReason.EXPLICIT
    assert counts(fx.ledger) == (0, 1, 1)
    [record] = fx.ledger.history()
    assert record.allocation_id == row.id and record.hours == pytest.approx(0.5)
    assert fx.place("t2").decision.kind is Kind.PLACE  # the freed GPUs are placeable again


def test_release_never_charges_past_the_deadline(fx: Fixture) -> None:
    row = fx.place("t1").row
    assert row is not None
    release = fx.ledger.release(row.id, ReleaseReason.LEASE_EXPIRED, T0 + 99 * 3600)
    assert release.hours == pytest.approx(2.0) and release.cost_usd == pytest.approx(20.48)


def test_unknown_allocation(fx: Fixture) -> None:
    with pytest.raises(InvalidInput, match="no allocation"):
        fx.ledger.release("a-nope", ReleaseReason.EXPLICIT, T0)


def test_cancel_a_queued_request(fx: Fixture) -> None:
    for i in range(4):
        fx.place(f"t{i}")
    queued = fx.place("tq").row
    assert queued is not None and queued.state == "queued"
    release = fx.ledger.release(queued.id, ReleaseReason.EXPLICIT, T0 + 60)
    assert release.reason is ReleaseReason.CANCELLED and release.cost_usd == 0
    assert fx.place("tq").decision.kind is Kind.GONE
    assert counts(fx.ledger) == (8, 0, 0)


def test_budget_waits_for_what_is_committed_and_denies_past_the_spend(fx: Fixture) -> None:
    fx.ledger.set_budget("p", 25.0, T0)
    assert fx.place("t1").decision.kind is Kind.PLACE  # worst case 20.48
    waits = fx.place("t2")
    assert waits.decision.kind is Kind.QUEUE and waits.row is not None
    assert waits.row.state == "queued"
    assert fx.ledger.remaining_usd("p") == pytest.approx(25 - 20.48)
    denied = fx.place("t3", duration_hours=5)  # $51.20: not half of it fits $25
    assert denied.decision.kind is Kind.DENY and denied.row is None


def test_lowering_a_budget_moves_deadlines(fx: Fixture) -> None:
    row = fx.place("t1").row  # 10.24 $/h, until T0 + 2 h
    assert row is not None
    moved = fx.ledger.set_budget("p", 5.12, T0 + 600)
    assert [m.id for m in moved] == [row.id]
    after = fx.ledger.get(row.id)
    assert after.deadline == pytest.approx(T0 + 1800)
    assert after.deadline_reason is ReleaseReason.BUDGET
    release = fx.ledger.release(row.id, ReleaseReason.BUDGET, T0 + 7200)
    assert release.cost_usd == pytest.approx(5.12)
    with pytest.raises(InvalidInput, match="below what it has already spent"):
        fx.ledger.set_budget("p", 1.0, T0 + 7200)


def test_a_budget_below_the_spend_is_refused_in_amounts_that_read_apart(fx: Fixture) -> None:
    """The release hint only where an allocation still accrues (a release stops that, never
    lowers what was charged); the budget and the floor with the decimals that tell them apart."""
    row = fx.place("t1").row  # 10.24 $/h: $0.0028 a second
    assert row is not None
    with pytest.raises(InvalidInput) as running:
        fx.ledger.set_budget("p", 0.001, T0 + 1)
    assert str(running.value) == (
        "budget $0.001 for p is below what it has already spent or accrued ($0.003); "
        "its running allocation adds to it until released"
    )
    fx.ledger.set_budget("p", 0.01, T0 + 1)  # its deadline: about T0 + 3.5 s
    with pytest.raises(InvalidInput) as ended:  # past its deadline: it accrues no more
        fx.ledger.set_budget("p", 0.0099, T0 + 60)
    assert str(ended.value) == (
        "budget $0.0099 for p is below what it has already spent or accrued ($0.0100)"
    )
    fx.ledger.release(row.id, ReleaseReason.BUDGET, T0 + 60)
    with pytest.raises(InvalidInput) as spent:
        fx.ledger.set_budget("p", 0, T0 + 60)
    assert str(spent.value) == "budget $0.00 for p is below what it has already spent ($0.01)"


def test_raising_the_budget_restores_the_lease(fx: Fixture) -> None:
    row = fx.place("t1").row
    assert row is not None
    fx.ledger.set_budget("p", 5.12, T0 + 60)
    fx.ledger.set_budget("p", 1000.0, T0 + 120)
    after = fx.ledger.get(row.id)
    assert after.deadline == after.lease_end
    assert after.deadline_reason is ReleaseReason.LEASE_EXPIRED


def test_reconcile_releases_expired_leases_of_dead_monitors(fx: Fixture) -> None:
    row = fx.place("t1").row
    assert row is not None
    assert fx.ledger.reconcile(T0 + 3600) == []  # not yet expired
    [release] = fx.ledger.reconcile(T0 + 10 * 3600)
    assert release.reason is ReleaseReason.EXPIRED_WHILE_DOWN
    assert release.hours == pytest.approx(2.0) and release.cost_usd == pytest.approx(20.48)
    assert fx.ledger.reconcile(T0 + 20 * 3600) == []
    assert counts(fx.ledger) == (0, 1, 1)


def test_heartbeat_counts_a_tick_once(fx: Fixture) -> None:
    row = fx.place("t1").row
    assert row is not None
    fx.ledger.heartbeat(row.id, T0 + 60, 1, 80.0, 1, 80.0)
    fx.ledger.heartbeat(row.id, T0 + 60, 1, 80.0, 1, 80.0)  # a resumed monitor re-runs tick 1
    fx.ledger.heartbeat(row.id, T0 + 120, 2, 120.0, 2, 40.0)
    assert fx.ledger.get(row.id).mean_util == pytest.approx(60.0)


def test_release_counts_the_ticks_a_monitor_slept_through(fx: Fixture) -> None:
    """A monitor that skipped steady ticks: the ticks before the release count at the last
    reading (ticks every 60 s; last heartbeat at T0+120; released at T0+330: ticks at 180,
    240 and 300 were slept through)."""
    row = fx.place("t1").row
    assert row is not None
    fx.ledger.heartbeat(row.id, T0 + 120, 2, 160.0, 2, 80.0)
    release = fx.ledger.release(row.id, ReleaseReason.EXPLICIT, T0 + 330)
    assert release.mean_util_pct == pytest.approx((160.0 + 3 * 80.0) / 5)
    [record] = fx.ledger.history()
    assert record.mean_util_pct == pytest.approx(80.0)


def test_truncated_or_foreign_files(tmp_path: Path, config: FleetConfig) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StateDirError, match="move it aside"):
        Ledger(junk, config)
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StateDirError, match="not a gpu-agent ledger"):
        Ledger(foreign, config)


def test_truncated_ledger(sqlite_fx: Fixture, tmp_path: Path, config: FleetConfig) -> None:
    sqlite_fx.place("t1")
    sqlite_fx.ledger.close()
    data = Path(sqlite_fx.ledger.name).read_bytes()
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(StateDirError):
        ledger = Ledger(cut, config)
        ledger.allocations()


def test_newer_schema_is_refused(fx: Fixture, database: str, config: FleetConfig) -> None:
    fx.place("t1")
    with fx.ledger.transaction() as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    fx.ledger.close()
    with pytest.raises(
        StateDirError, match="schema version 99, newer than this gpu-agent understands"
    ):
        Ledger(database, config)
    with pytest.raises(StateDirError, match="newer than this"):  # and it changed nothing
        Ledger(database, config)


def test_an_older_schema_is_migrated(fx: Fixture, database: str, config: FleetConfig) -> None:
    """An early version-1 ledger (before spend, records, unhealthy, util_last, busy_at_start
    and the version-2 job queue, version 3's monitors, version 4's commands, version 5's
    index, version 6's scheduler jobs, version 8's thread claims, version 9's terms and
    version 10's beats) opens as the current version with its money and history intact."""
    row = fx.place("t1").row
    assert row is not None
    fx.ledger.release(row.id, ReleaseReason.EXPLICIT, T0 + 3600)
    fx.place("t2")
    before = [
        r for r in fx.ledger.dump() if r.split(":")[0] in ("holds", "charges", "history", "budgets")
    ]
    spent = fx.ledger.costs(T0)[0].spent_usd
    with fx.ledger.transaction() as db:
        for table in (
            "jobs",
            "freed",
            "spend",
            "records",
            "unhealthy",
            "monitors",
            "commands",
            "scheduler_jobs",
            "threads",
        ):
            db.execute(f"DROP TABLE {table}")
        db.execute("DROP INDEX history_by_resumer")  # version 5's
        for column in ("util_last", "busy_at_start", "idle_since", "resumes", "renew_hours"):
            db.execute(f"ALTER TABLE allocations DROP COLUMN {column}")
        for column in ("hoarded_hours", "resumed_by", "pause_s"):
            db.execute(f"ALTER TABLE history DROP COLUMN {column}")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    fx.ledger.close()

    ledger = Ledger(database, config)
    try:
        with ledger.reading() as db:
            assert db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
            assert ledger.db.tables(db) >= {
                "jobs",
                "freed",
                "spend",
                "records",
                "unhealthy",
                "monitors",
                "commands",
                "scheduler_jobs",
                "threads",
            }
        assert [
            r
            for r in ledger.dump()
            if r.split(":")[0] in ("holds", "charges", "history", "budgets")
        ] == before
        assert ledger.costs(T0)[0].spent_usd == pytest.approx(spent) == pytest.approx(5.12 * 2)
        stats = ledger.project_stats("p", T0 + 7200, recent=5)
        assert stats.spent_usd == pytest.approx(spent) and len(stats.recent) == 1
    finally:
        ledger.close()


def test_a_version_9_ledger_gains_the_runs_beats(
    fx: Fixture, database: str, config: FleetConfig
) -> None:
    """Version 10 adds commands.beat_at (a `run`'s beats, read from other hosts); a command
    recorded before it has none, which counts as a run not known to live."""
    aid = fx.place("t1").row.id
    with fx.ledger.transaction() as db:
        db.execute(
            "INSERT INTO commands (allocation_id, owner, started_at) VALUES (?, ?, ?)",
            (aid, "h:1:x:run", T0),
        )
    with reopened_at(fx, database, config, 9, "commands", "beat_at") as ledger:
        lease = ledger.lease(aid)
        assert lease.command_owner == "h:1:x:run" and lease.command_beat_at is None


@contextlib.contextmanager
def reopened_at(
    fx: Fixture, database: str, config: FleetConfig, version: int, table: str, column: str
) -> Iterator[Ledger]:
    """The fixture's ledger as schema `version` left it (without `table.column`, which the
    next version added), opened again: it has gained the column and the current version."""
    with fx.ledger.transaction() as db:
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    fx.ledger.close()
    ledger = Ledger(database, config)
    try:
        with ledger.reading() as db:
            assert column in ledger.db.columns(db, table)
            assert db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
        yield ledger
    finally:
        ledger.close()


def test_a_version_10_ledger_gains_the_given_runs(
    fx: Fixture, database: str, config: FleetConfig
) -> None:
    """Version 11 adds runs.given (`run --allocation` is recorded too); a run recorded before
    it was one that requested its allocation."""
    aid, other = fx.place("t1").row.id, fx.place("t2").row.id
    fx.ledger.record_run(aid, "h:1:x:run", {"argv": ["true"]}, 0)
    with reopened_at(fx, database, config, 10, "runs", "given") as ledger:
        record = ledger.run_record(aid)
        assert record is not None and record.given is False
        assert ledger.record_given(other, "h:2:y:run", {"argv": ["true"]}, None)
        assert ledger.record_given(other, "h:3:z:run", {"argv": ["true"]}, None) is False
        given = ledger.run_record(other)
        assert given is not None and given.given and given.owner == "h:2:y:run"
        assert ledger.record_given(aid, "h:3:z:run", {}, "h:1:x:run") is False  # requested


def test_a_given_record_whose_command_never_started_is_put_back(fx: Fixture) -> None:
    """`run --allocation` records its command, then fails to start it: the record another
    given run held is back as it was, and a record it made alone is gone."""
    aid, fresh = fx.place("t1").row.id, fx.place("t2").row.id
    assert fx.ledger.record_given(aid, "h:1:a:run", {"argv": ["true"]}, None)
    fx.ledger.command_started(aid, "h:1:a:run", 4242)
    was = fx.ledger.run_record(aid)
    assert fx.ledger.record_given(aid, "h:2:b:run", {"argv": ["false"]}, "h:1:a:run")
    fx.ledger.restore_run(aid, "h:2:b:run", was)
    assert fx.ledger.run_record(aid) == was
    assert fx.ledger.record_given(fresh, "h:2:b:run", {"argv": ["false"]}, None)
    fx.ledger.restore_run(fresh, "h:2:b:run", None)
    assert fx.ledger.run_record(fresh) is None


def test_a_scheduler_job_is_recorded_once_per_allocation(fx: Fixture) -> None:
    row = fx.place("t1").row
    assert row is not None and fx.ledger.scheduler_job(row.id) is None
    job = SchedulerJob("17", "gn1", "4-5", T0 + 1)
    fx.ledger.record_job(row.id, "slurm", job)
    fx.ledger.record_job(row.id, "slurm", job)  # a re-run after a crash records it again
    assert fx.ledger.scheduler_job(row.id) == job
    assert fx.ledger.scheduler_jobs() == {row.id: job}


def test_a_database_with_other_tables_is_refused(pg_url: str, config: FleetConfig) -> None:
    """Checkpoint tables beside the ledger are fine; a table of the ledger's without its
    version is someone else's data."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE checkpoints (x int)")
        conn.execute("CREATE TABLE allocations (x int)")
    with pytest.raises(StateDirError, match="not a gpu-agent ledger"):
        Ledger(pg_url, config)


def test_an_unreachable_database_is_one_clear_error(config: FleetConfig) -> None:
    with pytest.raises(
        StateDirError,
        match=r"cannot reach the database "
        r"postgresql://u:\*\*\*@127.0.0.1:9/x",
    ):
        Ledger("postgresql://u:secret@127.0.0.1:9/x", config)


def test_an_allocation_never_starts_before_its_gpus_were_freed(fx: Fixture) -> None:
    """A placement whose clock was read before it waited for the lock (another worker
    released the GPUs meanwhile) starts when they were freed, not before."""
    rows = [fx.place(f"t{i}", count=4).row for i in range(2)]  # all 8 A100
    assert all(r is not None for r in rows)
    first = rows[0]
    assert first is not None
    fx.ledger.release(first.id, ReleaseReason.EXPLICIT, T0 + 600)
    late = fx.place("t9", now=T0 + 300, count=4).row  # its clock read before that release
    assert late is not None and set(late.gpu_ids) == set(first.gpu_ids)
    assert late.started_at == T0 + 600 and late.lease_end == T0 + 600 + 2 * 3600


def test_starts_in_hours_reads_the_deadlines_unless_others_wait(fx: Fixture) -> None:
    """8 A100s held by four 2-hour leases of 2 GPUs, placed half an hour apart: at 1.5 h, a
    request for 2 could start when the first lease ends (0.5 h), one for 6 when the third
    does (1.5 h); while a request waits for A100s, no bound holds."""
    for i in range(4):
        assert fx.place(f"t{i}", now=T0 + i * 1800).decision.kind is Kind.PLACE
    now = T0 + 1.5 * 3600

    def starts(count: int) -> dict[str, float]:
        return fx.ledger.starts_in_hours(["A100", "H100"], count, now, fx.inventory)

    assert starts(2) == {"A100": pytest.approx(0.5), "H100": 0.0}
    assert starts(6)["A100"] == pytest.approx(1.5)
    assert starts(9)["A100"] == float("inf")
    assert fx.place("t4", now=now).decision.kind is Kind.QUEUE
    assert starts(2)["A100"] == float("inf")


def test_what_the_ledger_keeps_between_reads_follows_every_change(
    tmp_path: Path, config: FleetConfig
) -> None:
    """On SQLite the ledger keeps each type's line, the running allocations, the fleet's
    newest shares and a project's record in memory between reads. They follow this
    connection's own changes, forget a transaction that was undone, and are dropped when
    another connection commits: at every step they are what a ledger opened afresh reads."""
    path = tmp_path / "ledger.sqlite"
    fx = Fixture(path, config)
    other = Ledger(path, config)

    def seen(ledger: Ledger) -> tuple[object, ...]:
        with ledger.reading() as db:
            snap = ledger._line(db, "A100", "p", T0 + 60, fx.inventory, count=1)
            endings = sorted(snap.endings, key=lambda e: (e.at, e.gpus))
            kept = (
                snap.waiting,
                endings,
                snap.free,
                ledger._fleet_share(db),
                ledger._actives(db, "p"),
            )
        return (*kept, ledger.project_stats("p", T0 + 60, 4), ledger.usage_factor("p"))

    def check() -> None:
        kept = seen(fx.ledger)  # before the fresh ledger's own transaction
        fresh = Ledger(path, config)
        try:
            assert kept == seen(fresh)
        finally:
            fresh.close()

    rows = {
        t: fx.place(t, T0 + i, duration_hours=1 + i).row
        for i, t in enumerate(["a", "b", "c", "d", "e", "f", "g"])
    }  # four run, three wait
    check()
    fx.ledger.release(rows["a"].id, ReleaseReason.EXPLICIT, T0 + 1800)  # this connection
    check()
    fx.place("e", T0 + 1900)  # a waiting request polls again: its place in line is kept
    check()
    other.heartbeat(rows["b"].id, T0 + 1500, 1, 0.0, 1, 0.0, idle_since=T0 + 1000)
    other.release(rows["b"].id, ReleaseReason.IDLE, T0 + 2000)  # another connection
    check()
    fx.ledger.resume(rows["b"].id, rows["e"].id, T0 + 2050, T0 + 2050)  # b's record mended
    check()
    with pytest.raises(RuntimeError), fx.ledger.transaction() as db:  # undone
        fx.ledger._close(db, rows["c"].id, ReleaseReason.EXPLICIT, T0 + 2100, 0.0)
        assert rows["c"].id not in [a.id for a in fx.ledger._actives(db, "p")]
        raise RuntimeError("undone")
    check()
    fx.ledger.release(rows["f"].id, ReleaseReason.CANCELLED, T0 + 2200)  # a waiting one
    check()
    other.close()
    fx.ledger.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_a_kept_project_record_and_shares_follow_releases_as_a_fresh_read_finds_them(
    tmp_path: Path, config: FleetConfig, seed: int
) -> None:
    """A project's record (project_stats) and its shares (usage_factor) are kept between
    reads and follow this connection's releases without reading them again: releases at the
    same time, back in time, of both projects, by another connection, with utilisation and
    idling, and records mended by a resume. After each, they are what a ledger opened afresh
    reads, the record for several windows."""
    path = tmp_path / "ledger.sqlite"
    fx = Fixture(path, config)
    other = Ledger(path, config)
    rng = random.Random(seed)

    def check(now: float) -> None:
        fresh = Ledger(path, config)
        try:
            for project in ("p0", "p1"):
                assert fx.ledger.usage_factor(project) == fresh.usage_factor(project), project
                with fx.ledger.reading() as db, fresh.reading() as fresh_db:
                    shares = fx.ledger._kept(  # as kept (or read, where it is not kept)
                        db,
                        ("shares", project),
                        fx.ledger._finished_of[project],
                        functools.partial(fx.ledger._shares, db, project, RECORDS),
                    )
                    assert shares == fresh._shares(fresh_db, project, RECORDS), project
                for recent in (1, 3, 8):
                    kept = fx.ledger.project_stats(project, now, recent)
                    assert kept == fresh.project_stats(project, now, recent), (project, recent)
        finally:
            fresh.close()

    live: list[str] = []
    released: list[str] = []
    t = T0
    for i in range(120):
        t += rng.choice([0.0, rng.uniform(0, 3600)])
        placed = fx.place(
            f"t{i}", t, project=f"p{rng.randrange(2)}", count=rng.choice([1, 2]), duration_hours=1
        )
        if placed.row is not None and placed.row.state == "active":
            live.append(placed.row.id)
        while live and (len(live) > 3 or rng.random() < 0.5):
            aid = live.pop(rng.randrange(len(live)))
            when = t + rng.choice([0.0, rng.uniform(-3600, 1800)])
            by = fx.ledger if rng.random() < 0.8 else other
            if rng.random() < 0.5:
                idle = when - 500 if rng.random() < 0.4 else None
                by.heartbeat(aid, when, 3, rng.uniform(0, 300), 3, 50.0, idle_since=idle)
            by.release(aid, rng.choice(list(ReleaseReason)), when)
            if rng.random() < 0.1 and released:
                fx.ledger.resume(released[-1], aid, when, when)
            released.append(aid)
            check(t + 1)
    other.close()
    fx.ledger.close()


def test_a_scratch_ledger_holds_its_file_and_writes_it_when_closed(
    tmp_path: Path, config: FleetConfig
) -> None:
    """The simulator's ledger (durable=False) works in memory: while it is open no other
    process can read its file half-way, and what it holds is in the file once it is closed,
    also a ledger that was already there and went on."""
    path = tmp_path / "ledger.sqlite"
    for run, thread in enumerate(("t1", "t2"), start=1):
        fx = Fixture(path, config, durable=False)
        assert fx.place(thread).decision.kind is Kind.PLACE
        other = sqlite3.connect(path, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT count(*) FROM allocations").fetchone()
        other.close()
        fx.ledger.close()
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM allocations").fetchone()[0] == run


@pytest.mark.parametrize("reason", list(ReleaseReason))
def test_what_a_release_counts_against_its_project_is_a_property_of_its_reason(
    sqlite_fx: Fixture, reason: ReleaseReason
) -> None:
    """Half an hour of a 2-hour lease, ended for `reason`: the project's used share, its
    record's budget-cut hours (as the ledger keeps them and as the scheduler sums history)
    and the council's overrun rate all follow `reason.cut_by_budget`, and nothing else."""
    row = sqlite_fx.place("t1", duration_hours=2).row
    assert row is not None and row.state == "active"
    sqlite_fx.ledger.release(row.id, reason, T0 + 1800)
    cut = reason.cut_by_budget
    with sqlite_fx.ledger.reading() as db:
        assert [s for *_, s in sqlite_fx.ledger._shares(db, "p", 10)] == [1.0 if cut else 0.25]
        kept = db.execute("SELECT gpu_hours, budget_gpu_hours FROM records").fetchone()
    assert (kept["budget_gpu_hours"] == kept["gpu_hours"] > 0) is cut
    assert kept["budget_gpu_hours"] == (kept["gpu_hours"] if cut else 0.0)
    [record] = sqlite_fx.ledger.history("p")
    summed = summarise(
        [
            (
                record.count,
                record.hours,
                record.hoarded_hours,
                record.ended_at.timestamp(),
                record.reason,
                record.mean_util_pct,
            )
        ],
        T0 + 1800,
        24.0,
    )
    assert (summed.budget_gpu_hours > 0) is cut
    stats = sqlite_fx.ledger.project_stats("p", T0 + 1800, 4)
    overrun = rates(past_jobs(stats), None, T0 + 1800, 30.0, 0.0).overrun
    assert (overrun == 1.0) is cut and (overrun == 0.0) is not cut


def test_routing_reads_no_usage_factor_that_the_budget_check_just_read(
    tmp_path: Path, config: FleetConfig
) -> None:
    """validate and the council ask what a budgeted project's budget admits once its running
    work has ended, which reads its usage factor; routing asks that factor next, and on
    SQLite finds it kept (no statement) while nothing was written, and what a fresh ledger
    reads."""
    path = tmp_path / "ledger.sqlite"
    fx = Fixture(path, config)
    fx.ledger.set_budget("p", 500.0, T0)
    placed = fx.place("a", T0)
    assert placed.row is not None
    fx.ledger.release(placed.row.id, ReleaseReason.EXPLICIT, T0 + 1800)
    assert fx.ledger.remaining_usd("p", running=False) is not None
    statements: list[str] = []
    fx.ledger.db.conn().set_trace_callback(statements.append)  # type: ignore[attr-defined]
    factor = fx.ledger.usage_factor("p")
    fx.ledger.db.conn().set_trace_callback(None)  # type: ignore[attr-defined]
    assert [s for s in statements if not s.startswith("PRAGMA data_version")] == []
    fresh = Ledger(path, config)
    assert factor == fresh.usage_factor("p") < 1.0
    fresh.close()
    fx.ledger.close()


def lease_of(fx: Fixture, aid: str) -> tuple[float, float, str, float | None]:
    (row,) = fx.ledger.query(
        "SELECT lease_end, deadline, deadline_reason, renew_hours FROM allocations WHERE id=?",
        (aid,),
    )
    return tuple(row)


def test_a_lease_held_a_term_at_a_time_is_renewed_once_per_term_up_to_the_lease_asked(
    fx: Fixture,
) -> None:
    row = fx.place("t1", renew_hours=0.75).row  # 2 h asked
    assert row is not None and row.hours == 2.0
    h = 3600.0
    assert lease_of(fx, row.id) == (T0 + 0.75 * h, T0 + 0.75 * h, "lease-expired", 0.75)
    assert fx.ledger.renew(row.id, T0 + h, T0 + 0.7 * h, "x") is None  # not its term's end
    first = fx.ledger.renew(row.id, T0 + 0.75 * h, T0 + 0.7 * h, "its GPUs work")
    assert first is not None and first.lease_end == first.deadline == T0 + 1.5 * h
    assert fx.ledger.renew(row.id, T0 + 0.75 * h, T0 + 0.7 * h, "again") is None  # once
    last = fx.ledger.renew(row.id, T0 + 1.5 * h, T0 + 1.4 * h, "its GPUs work")
    assert last is not None and last.lease_end == T0 + 2 * h  # no further than asked
    assert lease_of(fx, row.id) == (T0 + 2 * h, T0 + 2 * h, "lease-expired", None)
    assert fx.ledger.renew(row.id, T0 + 2 * h, T0 + 1.9 * h, "x") is None
    audit = [e for e in fx.ledger.audit_log("p") if e.action == "renew"]
    assert [e.detail for e in audit] == [
        f"lease renewed to {utc(T0 + 1.5 * h):%Y-%m-%d %H:%M:%S} UTC: its GPUs work",
        f"lease renewed to {utc(T0 + 2 * h):%Y-%m-%d %H:%M:%S} UTC: its GPUs work",
    ]
    whole = fx.place("t2", renew_hours=3.0).row  # a term no shorter than the lease: whole
    assert whole is not None and lease_of(fx, whole.id)[3] is None
    assert fx.ledger.renew(whole.id, T0 + 2 * h, T0, "x") is None


def test_a_term_declined_stays_declined_when_a_restarted_monitor_decides_it_again(
    fx: Fixture,
) -> None:
    """A monitor that declined a term and died before the checkpoint that remembers it
    decides the term again: however its GPUs look now, the term ends as declined (its job
    had its notice), and the audit holds one decision."""
    h = 3600.0
    row = fx.place("t1", renew_hours=0.75).row
    assert row is not None
    assert fx.ledger.decline(row.id, T0 + 0.75 * h, T0 + 0.7 * h, "every GPU idle")
    assert fx.ledger.renew(row.id, T0 + 0.75 * h, T0 + 0.71 * h, "its GPUs work") is None
    assert lease_of(fx, row.id) == (T0 + 0.75 * h, T0 + 0.75 * h, "lease-expired", 0.75)
    actions = [e.action for e in fx.ledger.audit_log("p")]
    assert actions.count("not-renewed") == 1 and "renew" not in actions


def test_a_term_whose_end_was_set_meanwhile_is_not_declined(fx: Fixture) -> None:
    """A release, a budget or a preemption that lands between the monitor's read of the
    lease and its decision ends the allocation, not a declined term: a decline then records
    nothing (it did, and so spared the work that resumed a release and refused a requeue)."""
    h = 3600.0
    released, cut = (fx.place(t, renew_hours=0.75).row for t in ("t1", "t2"))
    assert released is not None and cut is not None
    fx.ledger.release(released.id, ReleaseReason.EXPLICIT, T0 + 0.7 * h)
    assert not fx.ledger.decline(released.id, T0 + 0.75 * h, T0 + 0.7 * h, "every GPU idle")
    assert not fx.ledger.declined(released.id)
    fx.ledger.set_budget("p", 14.0, T0 + 0.6 * h)  # its budget ends it sooner
    assert lease_of(fx, cut.id)[2] == "budget"
    assert not fx.ledger.decline(cut.id, T0 + 0.75 * h, T0 + 0.7 * h, "every GPU idle")
    assert not fx.ledger.declined(cut.id)
    assert "not-renewed" not in [e.action for e in fx.ledger.audit_log("p")]


def test_a_budget_commits_one_term_and_cuts_a_renewal_it_cannot_pay_for(fx: Fixture) -> None:
    """2 x A100 at $10.24 an hour, a 0.75 h term ($7.68) of 2 h, then a $12 budget: it
    commits the term, which fits whole; renewed, the budget cuts it at $12 (reason budget),
    and it is renewed no more. A budget raised again gives it back its term's end as a
    lease's, not a yield's."""
    h = 3600.0
    row = fx.place("t1", renew_hours=0.75).row
    assert row is not None
    assert fx.ledger.set_budget("p", 12.0, T0) == []
    assert lease_of(fx, row.id)[:3] == (T0 + 0.75 * h, T0 + 0.75 * h, "lease-expired")
    renewed = fx.ledger.renew(row.id, T0 + 0.75 * h, T0 + 0.7 * h, "its GPUs work")
    assert renewed is not None and renewed.lease_end == T0 + 1.5 * h
    assert renewed.deadline == pytest.approx(T0 + 12.0 / 10.24 * h)
    assert lease_of(fx, row.id)[2] == "budget"
    assert fx.ledger.renew(row.id, T0 + 1.5 * h, T0 + h, "x") is None
    fx.ledger.set_budget("p", 100.0, T0 + 0.8 * h)
    assert lease_of(fx, row.id)[1:3] == (T0 + 1.5 * h, "lease-expired")


def test_a_preempted_term_is_renewed_no_more(fx: Fixture) -> None:
    row = fx.place("t1", renew_hours=1.5, duration_hours=4, notice_seconds=60).row
    assert row is not None
    moved = fx.ledger.preempt(row.id, T0 + 600, "admin", "the pool takes it back")
    end, deadline, reason, term = lease_of(fx, row.id)
    assert reason == "preempted" and term is None and end == deadline == moved.after
    assert fx.ledger.renew(row.id, end, T0 + 600, "x") is None
