"""`gpu-agent analyze` on histories with a planted bottleneck, hoarder and misrouted inference."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleet.config import FleetConfig
from fleet.ledger import Ledger
from fleet.models import GPURequest, Purpose, ReleaseReason, RouteDecision
from fleet.routing import route
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology
from graph.cli import main
from sim.analysis import (
    Analysis,
    analyze,
    load_history,
    percentile,
    series,
    sustained_excess,
    to_text,
)
from tests.conftest import SMALL_FLEET, small_config

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
H = 3600.0
EXTRA = "\n[quotas.projects]\nads = 8\n\n[budgets]\nvision = 10000\n"


def planted_config() -> FleetConfig:
    return small_config(quotas={"projects": {"ads": 8}}, budgets={"vision": 10000.0})


def iso(hours: float) -> str:
    return datetime.fromtimestamp(T0 + hours * H, UTC).isoformat()


def plant(
    ledger: Ledger,
    aid: str,
    project: str,
    purpose: str,
    gpu_type: str,
    count: int,
    enq: float,
    start: float | None = None,
    end: float | None = None,
    reason: ReleaseReason | None = None,
    util: float | None = None,
    pinned: bool = True,
) -> None:
    """One allocation as the ledger would hold it (times in hours after T0), history included."""
    price = ledger.config.catalog[gpu_type].price_per_hour
    state = "released" if end is not None else "active" if start is not None else "queued"
    held = (end - start) if start is not None and end is not None else 0.0
    cost = price * count * held if end is not None else None
    request = GPURequest.model_validate(
        {
            "project": project,
            "purpose": purpose,
            "count": count,
            "duration_hours": max(held, 1.0),
            "request_id": aid,
        }
        | ({"gpu_type": gpu_type} if pinned else {})
    )
    seen = max(t for t in (enq, start, end) if t is not None)
    ts = [None if t is None else T0 + t * H for t in (enq, start, end)]
    with ledger.transaction() as db:
        db.execute(
            "INSERT INTO allocations (id, thread_id, request_id, project, purpose, priority, "
            "gpu_type, count, price_per_hour, hours, state, enqueued_at, heartbeat_at, "
            "started_at, released_at, release_reason, cost_usd, util_sum, util_n, request) "
            "VALUES (?,?,?,?,?,'normal',?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                aid,
                f"t-{aid}",
                aid,
                project,
                purpose,
                gpu_type,
                count,
                price,
                held,
                state,
                ts[0],
                T0 + seen * H,
                ts[1],
                ts[2],
                reason.value if reason else None,
                cost,
                util or 0.0,
                0 if util is None else 1,
                request.model_dump_json(),
            ),
        )
        if start is not None and end is not None:
            assert reason is not None and cost is not None
            db.execute(
                "INSERT INTO history (allocation_id, thread_id, project, purpose, priority, "
                "gpu_type, count, gpu_ids, started_at, ended_at, hours, requested_hours, "
                "cost_usd, reason, mean_util_pct) VALUES (?,?,?,?,'normal',?,?,'[]',?,?,?,?,?,?,?)",
                (
                    aid,
                    f"t-{aid}",
                    project,
                    purpose,
                    gpu_type,
                    count,
                    ts[1],
                    ts[2],
                    held,
                    held,
                    cost,
                    reason.value,
                    util,
                ),
            )


LEASE, IDLE, CANCELLED = ReleaseReason.LEASE_EXPIRED, ReleaseReason.IDLE, ReleaseReason.CANCELLED


def plant_story(ledger: Ledger) -> None:
    """Small fleet (training 8 A100 + 2 H100, inference 2 T4, research 2 RTX4090), 8 hours.

    vision fills the training pool for 6 h; nlp queues 4 x 2 A100 at 1 h (all start at 6 h) and
    2 A100 more at 2 h (cancelled at 4 h): training demand peaks at 10 + 8 + 2 = 20 GPUs over
    [2 h, 4 h), short of 10. sandbox hoards RTX4090s; ads uses one T4 for an hour.
    """
    plant(ledger, "v1", "vision", "training", "A100", 8, 0, 0, 6, LEASE, 90)
    plant(ledger, "v2", "vision", "training", "H100", 2, 0, 0, 6, LEASE, 90)
    for i in range(4):
        plant(ledger, f"n{i}", "nlp", "training", "A100", 2, 1, 6, 8, LEASE, 80)
    plant(ledger, "n9", "nlp", "training", "A100", 2, 2, None, 4, CANCELLED)
    plant(ledger, "s1", "sandbox", "research", "RTX4090", 2, 0, 0, 1, IDLE, 2)
    plant(ledger, "s2", "sandbox", "research", "RTX4090", 1, 2, 2, 2.5, IDLE, 0)
    plant(ledger, "s3", "sandbox", "research", "RTX4090", 2, 3, 3, 7, LEASE, 1)
    plant(ledger, "a1", "ads", "inference", "T4", 1, 0, 0, 1, LEASE, 60)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory holding the planted story and the fleet it ran on."""
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "fleet.toml").write_text(SMALL_FLEET + EXTRA)
    ledger = Ledger(directory / "ledger.sqlite", planted_config())
    plant_story(ledger)
    ledger.close()
    return directory


def run(state: Path, **kwargs: str) -> Analysis:
    history, config = load_history(state, **kwargs)
    return analyze(history, config)


def recs(a: Analysis, kind: str) -> dict[str, dict[str, object]]:
    return {r.subject: r.evidence for r in a.recommendations if r.kind == kind}


def test_the_fleet_the_history_ran_on_is_read(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPU_AGENT_FLEET", raising=False)
    history, config = load_history(state)
    assert history.fleet == str(state / "fleet.toml") and config.quotas.projects == {"ads": 8}
    assert len(history.records) == 11 and history.end == T0 + 8 * H


def test_a_fleet_smaller_than_the_history_is_named(state: Path, tmp_path: Path) -> None:
    """--fleet with another fleet: the history held 8 A100s at once (vision's 8 end at 6 h as
    nlp's 4 x 2 start: 8, not 16), and a fleet of 4 gets a warning; the state's own has none."""
    assert load_history(state)[0].warnings == []
    small = tmp_path / "four.toml"
    text = SMALL_FLEET.replace('gpu_type = "A100"\ngpus = 4', 'gpu_type = "A100"\ngpus = 2')
    assert text.count('gpu_type = "A100"\ngpus = 2') == 2
    small.write_text(text)
    history, config = load_history(state, str(small))
    assert history.warnings == [
        f"the history held up to 8 A100 GPUs at once and this fleet has 4: is {small} the "
        "fleet it ran on?"
    ]
    assert f"warning: {history.warnings[0]}" in to_text(analyze(history, config))


def test_planted_bottleneck(state: Path) -> None:
    a = run(state)
    training = a.pools["training"]
    assert training.capacity_gpus == 10
    assert training.peak_demand_gpus == 20 and training.peak_at == T0 + 2 * H
    assert (training.peak_held_gpus, training.peak_waiting_gpus) == (10, 10)
    assert training.sustained_shortfall_gpus == 10 == training.peak_shortfall_gpus
    assert training.hours_over_capacity == pytest.approx(5.0)  # from 1 h to 6 h
    assert training.mean_held_gpus == pytest.approx((10 * 6 + 8 * 2) / 8)
    assert training.wait.p90_h == pytest.approx(5.0) and training.wait.started == 6
    assert training.wait.cancelled == 1 and training.wait.cancelled_waited_h == pytest.approx(2)
    short = recs(a, "pool-short")
    assert set(short) == {"training"}
    assert short["training"]["sustained_shortfall_gpus"] == 10
    assert short["training"]["p90_wait_hours"] == pytest.approx(5.0)
    assert short["training"]["peak_at"] == "2027-01-15T10:00:00Z"
    assert short["training"]["top_waiting_project"] == "nlp"
    [top_edge, *_] = a.bottlenecks["top_edges"]
    assert (top_edge["source"], top_edge["target"]) == ("project:nlp", "pool:training")
    assert top_edge["wait_hours"] == pytest.approx(4 * 5 + 2) and top_edge["requests"] == 5
    [top_node, *_] = a.bottlenecks["bottleneck_nodes"]
    assert top_node["node"] == "pool:training"
    assert top_node["gpu_hours"] == pytest.approx(8 * 6 + 2 * 6 + 4 * 2 * 2)
    # the idle inference pool (1 T4-hour of 16) is named too; research is not
    idle = recs(a, "idle-pool")
    assert set(idle) == {"inference"} and idle["inference"]["never_requested_gpus"] == 1


def test_planted_hoarder(state: Path) -> None:
    a = run(state)
    sandbox = next(u for u in a.projects if u.project == "sandbox")
    # s1: max(idle floor 2 x 0.5 h, Markov 2 GPU-h x (1 - 2/5)) = 1.2; s2: 0.5 h x 1 GPU = 0.5
    # (both bounds); s3 ran to its lease at 1 %: 8 GPU-h x (1 - 1/5) = 6.4
    assert sandbox.hoarded_gpu_hours == pytest.approx(1.2 + 0.5 + 6.4)
    assert sandbox.gpu_hours == pytest.approx(10.5) and sandbox.idle_releases == 2
    assert sandbox.idle_gpu_hours == pytest.approx(2 * 0.98 + 0.5 + 8 * 0.99)
    hoarders = recs(a, "hoarder")
    assert set(hoarders) == {"sandbox"}
    assert hoarders["sandbox"]["hoarded_gpu_hours"] == pytest.approx(8.1)
    assert hoarders["sandbox"]["hoarded_share"] == pytest.approx(8.1 / 10.5, abs=1e-3)
    assert all(u.hoarded_gpu_hours == 0 for u in a.projects if u.project != "sandbox")


def test_the_project_table_keeps_its_columns_apart_for_large_values(state: Path) -> None:
    a = run(state)
    big = dataclasses.replace(
        a.projects[0],
        project="p" * 40,
        allocations=12_345_678,
        gpu_hours=23_908.73,
        cost_usd=186_157.69,
        idle_gpu_hours=1_234_567.89,
        hoarded_gpu_hours=123_456.78,
        idle_releases=12_345_678,
    )
    text = to_text(dataclasses.replace(a, projects=[big, *a.projects[1:]]))
    table = text.split("Idle and hoarded GPU-hours per project")[1].split("\n\n")[0]
    head, *rows = table.splitlines()[1:]
    row = next(r for r in rows if r.strip().startswith("p" * 40))
    assert row.split() == [
        "p" * 40,
        "12345678",
        "23908.73",
        "$186,157.69",
        *row.split()[4:5],
        "1234567.89",
        "123456.78",
        *row.split()[7:8],
        "12345678",
    ]
    # the header and every row line up: each value ends where its column's name ends
    assert len({len(r) for r in [head, *rows]}) == 1
    assert head.index("cost") + len("cost") == row.index("$186,157.69") + len("$186,157.69")


def test_unused_quota_and_budget(state: Path) -> None:
    a = run(state)
    unused = [r for r in a.recommendations if r.kind == "quota-unused"]
    assert {(r.subject, *sorted(r.evidence)[:1]) for r in unused} == {
        ("ads", "peak_demand_gpus"),
        ("vision", "budget_usd"),
    }
    ads = next(r for r in unused if r.subject == "ads")
    assert ads.evidence == {"quota_gpus": 8, "peak_demand_gpus": 1, "peak_held_gpus": 1}
    vision = next(r for r in unused if r.subject == "vision")
    assert vision.evidence["spent_usd"] == pytest.approx(8 * 5.12 * 6 + 2 * 8.0 * 6)
    assert not recs(a, "inference-on-training-gpus")
    assert [r.kind for r in a.recommendations] == [
        "pool-short",
        "hoarder",
        "quota-unused",
        "quota-unused",
        "idle-pool",
    ]


def test_inference_on_training_gpus_from_a_real_ledger(tmp_path: Path, config: FleetConfig) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", config)
    inventory = SimulatedFleet(config).inventory()
    topology = Topology(config, inventory)

    def place(thread: str, gpu_type: str, hours: float) -> None:
        request = GPURequest.model_validate(
            {
                "project": "ads",
                "purpose": "inference",
                "count": 2,
                "duration_hours": hours,
                "gpu_type": gpu_type,
                "request_id": thread,
            }
        )
        decision = route(request, config, None)
        assert isinstance(decision, RouteDecision) and decision.gpu_type == gpu_type
        row = ledger.place(request, decision, thread, T0, inventory, topology).row
        assert row is not None and row.state == "active"
        ledger.release(row.id, ReleaseReason.EXPLICIT, T0 + hours * H)

    place("serve-a100", "A100", 3)
    place("serve-t4", "T4", 3)
    ledger.close()
    (tmp_path / "fleet.toml").write_text(SMALL_FLEET)
    a = run(tmp_path)
    assert a.history.records[0].pool is Purpose.TRAINING  # it used training capacity
    [rec] = [r for r in a.recommendations if r.kind == "inference-on-training-gpus"]
    assert rec.subject == "ads" and rec.evidence["gpu_types"] == ["A100"]
    assert rec.evidence["gpu_hours"] == pytest.approx(6.0)
    assert rec.evidence["cost_usd"] == pytest.approx(2 * 5.12 * 3)
    # the same work on T4 (0.15 of an A100): 3 h / 0.15 = 20 h x 2 GPUs x $0.526
    assert rec.evidence["alternative_cost_usd"] == pytest.approx(20 * 2 * 0.526)
    assert rec.evidence["saving_usd"] == pytest.approx(2 * 5.12 * 3 - 20 * 2 * 0.526)


def test_a_type_short_while_its_pool_is_not(tmp_path: Path) -> None:
    """Routing sends nlp to the H100s (cheapest per unit of work) while 8 A100s sit idle."""
    ledger = Ledger(tmp_path / "ledger.sqlite", small_config())
    plant(ledger, "v1", "vision", "training", "H100", 2, 0, 0, 4, LEASE, 90, pinned=False)
    plant(ledger, "n1", "nlp", "training", "H100", 2, 0.5, 4, 6, LEASE, 90, pinned=False)
    ledger.close()
    (tmp_path / "fleet.toml").write_text(SMALL_FLEET)
    a = run(tmp_path)
    assert a.pools["training"].sustained_shortfall_gpus == 0 and not recs(a, "pool-short")
    h100 = a.gpu_types["H100"]
    assert (h100.peak_demand_gpus, h100.capacity_gpus, h100.sustained_shortfall_gpus) == (4, 2, 2)
    assert h100.hours_over_capacity == pytest.approx(3.5)
    evidence = recs(a, "type-short")["H100"]
    assert evidence["sustained_shortfall_gpus"] == 2 and evidence["pinned_requests"] == 0
    assert evidence["sibling_mean_held_gpus"] == {"A100": 0.0}
    assert a.bottlenecks["bottleneck_nodes"][0]["node"] in {"pool:training", "gpu:H100"}


def test_since_and_until_filter_by_enqueue_time(state: Path) -> None:
    late = run(state, since=iso(1.5))
    assert sorted(r.id for r in late.history.records) == ["n9", "s2", "s3"]
    assert not recs(late, "pool-short")
    early = run(state, until=iso(1.5))
    assert sorted(r.id for r in early.history.records) == [
        "a1",
        "n0",
        "n1",
        "n2",
        "n3",
        "s1",
        "v1",
        "v2",
    ]
    assert recs(early, "pool-short")["training"]["sustained_shortfall_gpus"] == 8
    nothing = run(state, since="2027-01-16")
    assert not nothing.history.records and not nothing.recommendations


def test_a_short_spike_is_no_shortage() -> None:
    spike = series([(0, H, 10, 0), (1000, 1300, 4, 1)], H)  # 5 minutes 4 over capacity
    assert max(spike.demand()) == 14 and sustained_excess(spike, 10) == 0
    assert sustained_excess(series([(0, H, 10, 0), (0, 0.25 * H, 3, 1)], H), 10) == 3
    assert percentile([0, 0, 5, 5, 5, 5], 0.9) == 5 and percentile([], 0.5) is None
    assert percentile([1, 2], 0.5) == 1.5


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_json_plots_and_read_only(
    state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPU_AGENT_FLEET", raising=False)
    before = sha(state / "ledger.sqlite")
    assert main(["analyze", "--state-dir", str(state), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {
        "ledger",
        "fleet",
        "window",
        "allocations",
        "pools",
        "projects",
        "graph",
        "recommendations",
        "plots",
        "plots_dir",
    } <= set(out)
    assert out["allocations"] == {
        "total": 11,
        "queued": 0,
        "active": 0,
        "released": 11,
        "cancelled": 1,
    }
    assert {r["kind"] for r in out["recommendations"]} == {
        "pool-short",
        "idle-pool",
        "hoarder",
        "quota-unused",
    }
    assert all(
        {"kind", "subject", "text", "evidence"} <= set(r) and r["evidence"]
        for r in out["recommendations"]
    )
    assert out["plots_dir"] == str(state / "analysis")
    assert set(out["plots"]) == {
        "demand_vs_capacity",
        "demand_by_gpu_type",
        "queueing_delay",
        "idle_hoarded",
        "project_pool_graph",
    }
    for path in out["plots"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sha(state / "ledger.sqlite") == before

    assert main(["analyze", "--state-dir", str(state), "--no-plots", "--since", "2027-01-15"]) == 0
    text = capsys.readouterr().out
    assert "pool training is short of 10 GPUs at peak" in text and "No plots written" in text


def test_cli_bad_input(tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--state-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ledger at" in err
    assert not (tmp_path / "nowhere").exists()
    for flags in (
        ["--since", "yesterday"],
        ["--until", "2027-13-01"],
        ["--since", "2027-01-16", "--until", "2027-01-15"],
    ):
        assert main(["analyze", "--state-dir", str(state), *flags]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.out == ""
    assert not (state / "analysis").exists()
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "ledger.sqlite").execute("CREATE TABLE t (x)").connection.close()
    assert main(["analyze", "--state-dir", str(other)]) == 2
    assert "not a gpu-agent ledger" in capsys.readouterr().err


def test_an_empty_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Ledger(tmp_path / "ledger.sqlite", small_config()).close()
    assert (
        main(["analyze", "--state-dir", str(tmp_path), "--fleet", str(write_fleet(tmp_path))]) == 0
    )
    assert "no allocations in the window" in capsys.readouterr().out
    assert main(["analyze", "--state-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allocations"]["total"] == 0 and out["recommendations"] == [] and not out["plots"]
    assert not (tmp_path / "analysis").exists()


def write_fleet(directory: Path) -> Path:
    path = directory / "small.toml"
    path.write_text(SMALL_FLEET)
    return path


def test_dates_are_iso_whatever_the_year() -> None:
    """`--since 0001-01-01` echoed as an ISO date (the C library's %Y writes year 1 as "1")."""
    from sim.analysis.history import _iso

    assert _iso(datetime(1, 1, 1, tzinfo=UTC).timestamp()) == "0001-01-01T00:00:00Z"
    assert _iso(datetime(2026, 1, 1, 0, 0, 0, 700000, tzinfo=UTC).timestamp()) == (
        "2026-01-01T00:00:00Z"
    )
