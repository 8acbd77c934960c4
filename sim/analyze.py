"""`gpu-agent analyze`: usage patterns of an allocation history, with plots and recommendations.

It reads a state directory's ledger (`ledger.sqlite`, opened read-only: the ledger file is
never written; SQLite may leave the empty `-wal`/`-shm` side files any reader of a WAL
database leaves) together with the fleet the history ran on, and reports per pool, per
project and on a project -> pool -> GPU type graph. Definitions:

- An allocation's *pool* is the pool whose GPUs it used or waited for: its purpose's pool when
  that pool lists its GPU type, else the first pool (training, inference, research) listing
  the type. So inference on A100s counts against the training pool's capacity, which it
  consumed, and is flagged by its own recommendation.
- The *window* runs from the first kept allocation's enqueue to the latest time the ledger
  recorded for the kept allocations (enqueue, start, release, heartbeat); allocations still
  queued or active are counted up to its end. `--since` / `--until` keep allocations enqueued
  at or after / before a date (UTC).
- *Demand* of a pool at time t: GPUs held plus GPUs waiting (queued, not yet started; a
  cancelled request waits until it is cancelled) by the allocations of that pool. *Capacity*:
  the GPUs of the pool's types in the fleet. *Short at peak*: the largest excess of demand
  over capacity that lasted at least SUSTAINED_HOURS in all (a shorter excess is polling
  latency); the instantaneous peak excess is reported too. The same figures per GPU type
  (a queued request waits for the one type it was routed to) show a type short while its
  pool is not, e.g. every job routed to H100 while the A100s sit idle.
- *Queueing delay*: started_at - enqueued_at for started allocations; the time waited so far
  (still queued) and until cancelled (cancelled) are reported separately.
- *GPU-hours*: count x hours held (an active allocation up to the window's end).
- *Idle GPU-hours*: GPU-hours x (1 - mean utilisation) for allocations with a reading.
- *Hoarded GPU-hours* (held while idle, a lower bound from the ledger's per-allocation
  means): per allocation the larger of two bounds. (1) Released for `idle`: the monitor
  releases only after every GPU sat under `monitor.idle_util_pct` for `idle_timeout_minutes`,
  so at least count x idle_timeout hours were hoarded. (2) Any allocation with a mean
  utilisation u: by Markov's inequality at most u / idle_util_pct of its GPU-ticks were at or
  above the idle threshold, so at least GPU-hours x (1 - u / idle_util_pct) were idle (zero
  when u >= idle_util_pct). An allocation that ran to its lease end nearly idle is thus
  counted almost whole.
- The graph (networkx DiGraph) has edges project -> pool and pool -> GPU type with
  `gpu_hours`, `wait_hours` (hours waited by every request: started, still queued or
  cancelled) and `requests`. Edges are ranked by waiting; a node's load is the flow through
  it (weighted in-degree; out-degree for a project); pools and GPU types ranked by waiting
  flow are the bottlenecks.

Recommendations each carry the figures that justify them; the thresholds are the named
constants below.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any

import networkx as nx

from fleet.config import FleetConfig, load_fleet
from fleet.errors import InvalidInput
from fleet.models import Purpose
from fleet.statedir import LEDGER, default_state_dir

# A demand excess shorter than a quarter hour in all is the scheduler's polling latency (a
# poll every minute by default), not a shortage worth buying GPUs for.
SUSTAINED_HOURS = 0.25
# A project is a hoarder when at least a quarter of its GPU-hours were provably idle: above
# the share a well-behaved job loses to start-up, checkpoints and evaluation.
HOARD_SHARE = 0.25
# Below one GPU-hour (about $5 on an A100) a pattern is noise, not worth a change of habit.
MIN_EVIDENCE_GPU_HOURS = 1.0
# A quota or budget whose busiest use stayed under a quarter of it could be cut by three
# quarters without ever having refused anything.
UNUSED_SHARE = 0.25
# A pool holding under a quarter of its capacity on average has GPUs that mostly sit unused.
IDLE_POOL_SHARE = 0.25
# How many edges and nodes the report names as bottlenecks.
TOP_N = 5

PLOTS = {
    "demand_vs_capacity": "demand_vs_capacity.png",
    "demand_by_gpu_type": "demand_by_gpu_type.png",
    "queueing_delay": "queueing_delay.png",
    "idle_hoarded": "idle_hoarded.png",
    "project_pool_graph": "project_pool_graph.png",
}

KIND_ORDER = ["pool-short", "type-short", "inference-on-training-gpus", "hoarder", "quota-unused",
              "idle-pool"]


# ---- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One allocation as the analysis sees it."""

    id: str
    project: str
    purpose: Purpose
    pool: Purpose
    gpu_type: str
    count: int
    state: str  # queued | active | released
    enqueued_at: float
    started_at: float | None
    ended_at: float | None  # released_at: end of the hold, or the cancellation
    last_seen: float
    reason: str | None
    price_per_hour: float
    cost_usd: float | None
    mean_util: float | None  # percent
    min_memory_gb: float | None
    pinned: bool  # the request named its GPU type (else routing chose it)

    @property
    def cancelled(self) -> bool:
        return self.state == "released" and self.started_at is None


@dataclass(frozen=True)
class History:
    ledger: str
    fleet: str
    records: list[Record]
    budgets: dict[str, float]
    since: float | None = None
    until: float | None = None
    warnings: list[str] = field(default_factory=list)

    @cached_property
    def start(self) -> float:
        return min((r.enqueued_at for r in self.records), default=0.0)

    @cached_property
    def end(self) -> float:
        return max((r.last_seen for r in self.records), default=0.0)


def parse_date(value: str | None, flag: str) -> float | None:
    """An ISO date or datetime (naive means UTC) as POSIX seconds."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"{flag}: {value!r} is not an ISO date or datetime "
                           "(e.g. 2026-01-01 or 2026-01-01T12:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def resolve_fleet(state_dir: Path, explicit: str | None) -> tuple[FleetConfig, str]:
    """--fleet, else the state directory's fleet.toml, else env GPU_AGENT_FLEET, else built-in."""
    if explicit:
        return load_fleet(explicit), explicit
    copy = state_dir / "fleet.toml"
    if copy.is_file():
        return load_fleet(copy), str(copy)
    env = os.environ.get("GPU_AGENT_FLEET")
    if env:
        return load_fleet(env), env
    return load_fleet(None), "built-in default fleet"


def pool_of(purpose: Purpose, gpu_type: str, config: FleetConfig) -> Purpose:
    if gpu_type in config.pools.get(purpose, []):
        return purpose
    return next((p for p in Purpose if gpu_type in config.pools.get(p, [])), purpose)


def _open(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise InvalidInput(f"no ledger at {path} (pass --state-dir, or run gpu-agent first)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    tables = {r["name"] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"allocations", "history", "budgets"} <= tables:
        db.close()
        raise InvalidInput(f"{path} is not a gpu-agent ledger")
    return db


def _request(text: str) -> tuple[float | None, bool]:
    """(min_memory_gb, whether it named a GPU type) of a stored request."""
    try:
        raw = json.loads(text)
    except ValueError:
        return None, False
    if not isinstance(raw, dict):
        return None, False
    memory = raw.get("min_memory_gb")
    return (float(memory) if isinstance(memory, int | float) else None,
            bool(raw.get("gpu_type") or raw.get("type")))


def _record(r: sqlite3.Row, config: FleetConfig) -> Record:
    purpose = Purpose(r["purpose"])
    memory, pinned = _request(r["request"])
    util = r["util_sum"] / r["util_n"] if r["util_n"] else r["h_util"]
    seen = max(t for t in (r["enqueued_at"], r["heartbeat_at"], r["started_at"],
                           r["released_at"]) if t is not None)
    return Record(
        id=r["id"], project=r["project"], purpose=purpose,
        pool=pool_of(purpose, r["gpu_type"], config), gpu_type=r["gpu_type"],
        count=int(r["count"]), state=r["state"], enqueued_at=float(r["enqueued_at"]),
        started_at=r["started_at"], ended_at=r["released_at"], last_seen=float(seen),
        reason=r["release_reason"], price_per_hour=float(r["price_per_hour"]),
        cost_usd=r["cost_usd"], mean_util=util, min_memory_gb=memory, pinned=pinned,
    )


def load_history(state_dir: str | Path | None, fleet: str | None = None, *,
                 since: str | None = None, until: str | None = None) -> tuple[History,
                                                                             FleetConfig]:
    """The kept allocations of a state directory's ledger, read-only, and the fleet."""
    lo, hi = parse_date(since, "--since"), parse_date(until, "--until")
    if lo is not None and hi is not None and lo >= hi:
        raise InvalidInput(f"--since {since} is not before --until {until}")
    directory = Path(state_dir) if state_dir else default_state_dir()
    path = directory / LEDGER
    db = _open(path)
    try:
        config, source = resolve_fleet(directory, fleet)
        rows = db.execute(
            "SELECT a.*, h.mean_util_pct AS h_util FROM allocations a "
            "LEFT JOIN history h ON h.allocation_id = a.id "
            "WHERE a.enqueued_at >= ? AND a.enqueued_at < ? ORDER BY a.enqueued_at, a.id",
            (-math.inf if lo is None else lo, math.inf if hi is None else hi),
        ).fetchall()
        budgets = dict(config.budgets) | {
            r["project"]: float(r["budget_usd"]) for r in db.execute("SELECT * FROM budgets")}
    finally:
        db.close()
    records = [_record(r, config) for r in rows]
    unknown = sorted({r.gpu_type for r in records} - set(config.catalog))
    warnings = [f"the history names GPU types this fleet lacks ({', '.join(unknown)}): "
                f"is {source} the fleet it ran on?"] if unknown else []
    return History(str(path), source, records, budgets, lo, hi, warnings), config


# ---- time series --------------------------------------------------------------------------

Span = tuple[float, float, int, int]  # start, end, GPUs, which level (0 held, 1 waiting)


@dataclass(frozen=True)
class Series:
    """A step function: from times[i] on, the levels are levels[i] (held, waiting)."""

    times: list[float]
    levels: list[tuple[int, int]]
    end: float

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.times, [*self.times[1:], self.end], strict=False)]

    def demand(self) -> list[int]:
        return [h + w for h, w in self.levels]


def series(spans: Iterable[Span], end: float) -> Series:
    delta: dict[float, list[int]] = defaultdict(lambda: [0, 0])
    for start, stop, n, which in spans:
        if stop > start:
            delta[start][which] += n
            delta[stop][which] -= n
    times, levels, held, waiting = [], [], 0, 0
    for t in sorted(delta):
        held, waiting = held + delta[t][0], waiting + delta[t][1]
        times.append(t)
        levels.append((held, waiting))
    return Series(times, levels, end)


def spans(r: Record, end: float) -> list[Span]:
    waited_until = r.started_at if r.started_at is not None else (r.ended_at or end)
    out: list[Span] = [(r.enqueued_at, waited_until, r.count, 1)]
    if r.started_at is not None:
        out.append((r.started_at, r.ended_at if r.ended_at is not None else end, r.count, 0))
    return out


def held_hours(r: Record, end: float) -> float:
    if r.started_at is None:
        return 0.0
    return max(0.0, (r.ended_at if r.ended_at is not None else end) - r.started_at) / 3600.0


def wait_hours(r: Record, end: float) -> float:
    stop = r.started_at if r.started_at is not None else (r.ended_at or end)
    return max(0.0, stop - r.enqueued_at) / 3600.0


def mean_level(s: Series, start: float, values: Sequence[int]) -> float:
    width = s.end - start
    if width <= 0:
        return 0.0
    return sum(v * d for v, d in zip(values, s.durations(), strict=True)) / width


def sustained_excess(s: Series, capacity: int) -> int:
    """The largest excess of demand over capacity that lasted SUSTAINED_HOURS in all."""
    pieces = sorted(zip(s.demand(), s.durations(), strict=True), reverse=True)
    total = 0.0
    for demand, duration in pieces:
        if demand <= capacity:
            return 0
        total += duration
        if total >= SUSTAINED_HOURS * 3600.0:
            return demand - capacity
    return 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---- per pool ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitStats:
    started: int
    mean_h: float | None
    p50_h: float | None
    p90_h: float | None
    max_h: float | None
    queued: int
    queued_waited_h: float  # total so far
    cancelled: int
    cancelled_waited_h: float  # total until cancelled


@dataclass(frozen=True)
class PoolStats:
    """Demand against capacity and queueing of a pool, or of one GPU type (`name`)."""

    name: str
    gpu_types: list[str]
    capacity_gpus: int
    mean_held_gpus: float
    mean_demand_gpus: float
    utilisation: float
    peak_demand_gpus: int
    peak_at: float | None
    peak_held_gpus: int
    peak_waiting_gpus: int
    peak_shortfall_gpus: int
    sustained_shortfall_gpus: int
    hours_over_capacity: float
    wait: WaitStats
    series: Series = field(repr=False)


def wait_stats(records: list[Record], end: float) -> WaitStats:
    started = [wait_hours(r, end) for r in records if r.started_at is not None]
    queued = [wait_hours(r, end) for r in records if r.state == "queued"]
    cancelled = [wait_hours(r, end) for r in records if r.cancelled]
    return WaitStats(
        started=len(started), mean_h=sum(started) / len(started) if started else None,
        p50_h=percentile(started, 0.5), p90_h=percentile(started, 0.9),
        max_h=max(started, default=None), queued=len(queued), queued_waited_h=sum(queued),
        cancelled=len(cancelled), cancelled_waited_h=sum(cancelled),
    )


def pool_stats(pool: Purpose, history: History, config: FleetConfig) -> PoolStats:
    mine = [r for r in history.records if r.pool is pool]
    return capacity_stats(pool.value, list(config.pools[pool]), mine, history, config)


def type_stats(gpu_type: str, history: History, config: FleetConfig) -> PoolStats:
    mine = [r for r in history.records if r.gpu_type == gpu_type]
    return capacity_stats(gpu_type, [gpu_type], mine, history, config)


def capacity_stats(name: str, types: list[str], mine: list[Record], history: History,
                   config: FleetConfig) -> PoolStats:
    end, start = history.end, history.start
    s = series((sp for r in mine for sp in spans(r, end)), end)
    capacity = sum(config.gpus_of_type(t) for t in types)
    demand = s.demand()
    peak = max(demand, default=0)
    i = demand.index(peak) if demand else None
    mean_held = mean_level(s, start, [h for h, _ in s.levels])
    return PoolStats(
        name=name, gpu_types=types, capacity_gpus=capacity,
        mean_held_gpus=mean_held, mean_demand_gpus=mean_level(s, start, demand),
        utilisation=mean_held / capacity if capacity else 0.0, peak_demand_gpus=peak,
        peak_at=s.times[i] if i is not None else None,
        peak_held_gpus=s.levels[i][0] if i is not None else 0,
        peak_waiting_gpus=s.levels[i][1] if i is not None else 0,
        peak_shortfall_gpus=max(0, peak - capacity),
        sustained_shortfall_gpus=sustained_excess(s, capacity),
        hours_over_capacity=sum(d for v, d in zip(demand, s.durations(), strict=True)
                                if v > capacity) / 3600.0,
        wait=wait_stats(mine, end), series=s,
    )


# ---- per project -------------------------------------------------------------------------


def hoarded_gpu_hours(r: Record, end: float, config: FleetConfig) -> float:
    """A lower bound on the GPU-hours this allocation held idle (see the module docstring)."""
    gpu_h = r.count * held_hours(r, end)
    floor = 0.0
    if r.reason == "idle":
        floor = min(gpu_h, r.count * config.monitor.idle_timeout_minutes / 60.0)
    threshold = config.monitor.idle_util_pct
    if r.mean_util is not None and threshold > 0:
        floor = max(floor, gpu_h * max(0.0, 1.0 - r.mean_util / threshold))
    return floor


@dataclass(frozen=True)
class ProjectUsage:
    project: str
    allocations: int
    gpu_hours: float
    cost_usd: float
    mean_util_pct: float | None  # GPU-hour weighted, over allocations with a reading
    idle_gpu_hours: float
    hoarded_gpu_hours: float
    hoarded_share: float
    idle_releases: int
    peak_held_gpus: int
    peak_demand_gpus: int
    quota_gpus: int | None
    budget_usd: float | None


def cost_of(r: Record, end: float) -> float:
    if r.state == "active":
        return r.price_per_hour * r.count * held_hours(r, end)
    return r.cost_usd or 0.0


def project_usage(project: str, history: History, config: FleetConfig) -> ProjectUsage:
    end = history.end
    mine = [r for r in history.records if r.project == project]
    gpu_h = {r.id: r.count * held_hours(r, end) for r in mine}
    rated = [r for r in mine if r.mean_util is not None and gpu_h[r.id] > 0]
    rated_h = sum(gpu_h[r.id] for r in rated)
    hoarded = sum(hoarded_gpu_hours(r, end, config) for r in mine)
    total = sum(gpu_h.values())
    s = series((sp for r in mine for sp in spans(r, end)), end)
    return ProjectUsage(
        project=project, allocations=len(mine), gpu_hours=total,
        cost_usd=sum(cost_of(r, end) for r in mine),
        mean_util_pct=sum(gpu_h[r.id] * (r.mean_util or 0.0) for r in rated) / rated_h
        if rated_h else None,
        idle_gpu_hours=sum(gpu_h[r.id] * (1 - (r.mean_util or 0.0) / 100) for r in rated),
        hoarded_gpu_hours=hoarded, hoarded_share=hoarded / total if total else 0.0,
        idle_releases=sum(1 for r in mine if r.reason == "idle"),
        peak_held_gpus=max((h for h, _ in s.levels), default=0),
        peak_demand_gpus=max(s.demand(), default=0),
        quota_gpus=config.quotas.projects.get(project),
        budget_usd=history.budgets.get(project),
    )


# ---- the graph ---------------------------------------------------------------------------


def build_graph(history: History) -> Any:
    """A networkx DiGraph project -> pool -> GPU type weighted by GPU-hours and waiting."""
    g = nx.DiGraph()
    end = history.end
    for r in history.records:
        chain = [("project", r.project), ("pool", r.pool.value), ("gpu", r.gpu_type)]
        for layer, (kind, name) in enumerate(chain):
            g.add_node(f"{kind}:{name}", kind=kind, name=name, layer=layer)
        for a, b in pairwise(f"{kind}:{name}" for kind, name in chain):
            if not g.has_edge(a, b):
                g.add_edge(a, b, gpu_hours=0.0, wait_hours=0.0, requests=0)
            e = g.edges[a, b]
            e["gpu_hours"] += r.count * held_hours(r, end)
            e["wait_hours"] += wait_hours(r, end)
            e["requests"] += 1
    for _, _, e in g.edges(data=True):
        e["mean_wait_hours"] = e["wait_hours"] / e["requests"]
    return g


def _flow(g: Any, node: str, weight: str) -> float:
    degree = g.out_degree if g.nodes[node]["kind"] == "project" else g.in_degree
    return float(degree(node, weight=weight))


def graph_summary(g: Any) -> dict[str, Any]:
    nodes = [{"node": n, "kind": d["kind"], "name": d["name"],
              "gpu_hours": _flow(g, n, "gpu_hours"), "wait_hours": _flow(g, n, "wait_hours")}
             for n, d in g.nodes(data=True)]
    edges = [{"source": u, "target": v, **{k: e[k] for k in
              ("gpu_hours", "wait_hours", "mean_wait_hours", "requests")}}
             for u, v, e in g.edges(data=True)]
    by_wait = sorted((e for e in edges if g.nodes[e["source"]]["kind"] == "project"),
                     key=lambda e: (-e["wait_hours"], -e["gpu_hours"], e["source"]))
    resources = sorted((n for n in nodes if n["kind"] != "project"),
                       key=lambda n: (-n["wait_hours"], -n["gpu_hours"], n["kind"] != "pool",
                                      n["node"]))
    return {"nodes": nodes, "edges": edges,
            "top_edges": [e for e in by_wait if e["wait_hours"] > 0][:TOP_N],
            "bottleneck_nodes": [n for n in resources if n["wait_hours"] > 0][:TOP_N],
            "most_loaded_nodes": sorted(nodes, key=lambda n: (-n["gpu_hours"], n["node"]))
            [:TOP_N]}


# ---- recommendations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    kind: str
    subject: str
    text: str
    evidence: dict[str, Any]
    plot: str | None = None


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _waiters(p: PoolStats, graph: dict[str, Any]) -> tuple[str | None, float, float]:
    """The project that waited longest for the pool (graph edge), its hours and the pool's."""
    edges = [e for e in graph["edges"] if e["target"] == f"pool:{p.name}"]
    total = sum(e["wait_hours"] for e in edges)
    top = max(edges, key=lambda e: (e["wait_hours"], e["source"]), default=None)
    if top is None or top["wait_hours"] <= 0:
        return None, 0.0, total
    return str(top["source"]).removeprefix("project:"), float(top["wait_hours"]), total


def pool_short(p: PoolStats, graph: dict[str, Any]) -> Recommendation | None:
    n = p.sustained_shortfall_gpus
    if n <= 0:
        return None
    who, hours, total = _waiters(p, graph)
    most = f"; {who} did {hours:.1f} of the pool's {total:.1f} hours of waiting" if who else ""
    peak = f" (momentarily {p.peak_shortfall_gpus})" if p.peak_shortfall_gpus != n else ""
    p90 = "no request has started yet" if p.wait.p90_h is None else \
        f"the p90 wait of started requests was {p.wait.p90_h:.1f} h"
    if p.wait.queued:
        p90 += f", {p.wait.queued} still waiting ({p.wait.queued_waited_h:.1f} h so far)"
    if p.wait.cancelled:
        p90 += (f", {p.wait.cancelled} cancelled while waiting (after "
                f"{p.wait.cancelled_waited_h:.1f} h in all)")
    text = (f"pool {p.name} is short of {n} GPUs at peak{peak}: demand reached "
            f"{p.peak_demand_gpus} GPUs ({p.peak_held_gpus} held + {p.peak_waiting_gpus} waiting) "
            f"at {_iso(p.peak_at)} against a capacity of {p.capacity_gpus} "
            f"({'/'.join(p.gpu_types)}); demand exceeded capacity for "
            f"{p.hours_over_capacity:.1f} h and {p90}{most}: add {n} GPUs or move work "
            "off-peak")
    return Recommendation("pool-short", p.name, text, {
        "pool_wait_hours": _r(total), "top_waiting_project": who,
        "top_waiting_project_hours": _r(hours),
        "sustained_shortfall_gpus": n, "peak_shortfall_gpus": p.peak_shortfall_gpus,
        "peak_demand_gpus": p.peak_demand_gpus, "capacity_gpus": p.capacity_gpus,
        "peak_at": _iso(p.peak_at), "hours_over_capacity": _r(p.hours_over_capacity),
        "p90_wait_hours": _r(p.wait.p90_h), "waiting_now": p.wait.queued,
        "cancelled_while_waiting": p.wait.cancelled}, PLOTS["demand_vs_capacity"])


def type_short(t: PoolStats, pool: PoolStats, siblings: list[PoolStats],
               waited: list[Record]) -> Recommendation | None:
    """A GPU type short at peak beyond what its pool is: the shortage is the type's.
    `waited`: the requests for the type that waited."""
    n = t.sustained_shortfall_gpus
    if n <= pool.sustained_shortfall_gpus:
        return None
    pinned = sum(1 for r in waited if r.pinned)
    if pinned * 2 > len(waited):
        fix = f"let them run on the pool's other types (do not pin --gpu-type {t.name})"
    else:
        fix = (f"routing sent them to {t.name} (cheapest per unit of work) however busy it "
               "was: let a request fall back to the pool's other types")
    spare = [f"{s.name} held {s.mean_held_gpus:.1f} of {s.capacity_gpus} on average"
             for s in siblings if s.capacity_gpus]
    meanwhile = f"; meanwhile {', '.join(spare)}" if spare else ""
    p90 = "" if t.wait.p90_h is None else f", p90 wait {t.wait.p90_h:.1f} h"
    text = (f"GPU type {t.name} (pool {pool.name}) is short of {n} GPUs at peak, more than the "
            f"pool ({pool.sustained_shortfall_gpus}): demand reached {t.peak_demand_gpus} "
            f"against {t.capacity_gpus} at {_iso(t.peak_at)}{p90}{meanwhile}; of the "
            f"{len(waited)} requests that waited, {pinned} named {t.name}: {fix}, or add {n} "
            f"{t.name}")
    return Recommendation("type-short", t.name, text, {
        "sustained_shortfall_gpus": n, "pool": pool.name,
        "pool_sustained_shortfall_gpus": pool.sustained_shortfall_gpus,
        "peak_demand_gpus": t.peak_demand_gpus, "capacity_gpus": t.capacity_gpus,
        "peak_at": _iso(t.peak_at), "p90_wait_hours": _r(t.wait.p90_h),
        "waited_requests": len(waited), "pinned_requests": pinned,
        "sibling_mean_held_gpus": {s.name: _r(s.mean_held_gpus) for s in siblings}},
        PLOTS["demand_by_gpu_type"])


def type_shortages(history: History, config: FleetConfig, pools: dict[str, PoolStats],
                   types: dict[str, PoolStats]) -> list[Recommendation]:
    out = []
    for t in types.values():
        home = next((p for p in Purpose if t.name in config.pools[p]), None)
        if home is None:
            continue
        siblings = [types[s] for s in config.pools[home] if s != t.name and s in types]
        end = history.end
        waited = [r for r in history.records if r.gpu_type == t.name and wait_hours(r, end) > 0]
        rec = type_short(t, pools[home.value], siblings, waited)
        if rec is not None:
            out.append(rec)
    return out


def hoarder(u: ProjectUsage) -> Recommendation | None:
    if u.hoarded_gpu_hours < MIN_EVIDENCE_GPU_HOURS or u.hoarded_share < HOARD_SHARE:
        return None
    util = "no reading" if u.mean_util_pct is None else f"{u.mean_util_pct:.1f}%"
    text = (f"project {u.project} held at least {u.hoarded_gpu_hours:.1f} of its "
            f"{u.gpu_hours:.1f} GPU-hours idle ({u.hoarded_share:.0%}); {u.idle_releases} "
            f"allocation(s) were released for idling; mean utilisation {util}: release GPUs "
            "when the work is done, or ask for shorter leases")
    return Recommendation("hoarder", u.project, text, {
        "hoarded_gpu_hours": _r(u.hoarded_gpu_hours), "gpu_hours": _r(u.gpu_hours),
        "hoarded_share": _r(u.hoarded_share), "idle_gpu_hours": _r(u.idle_gpu_hours),
        "idle_releases": u.idle_releases, "mean_util_pct": _r(u.mean_util_pct, 1)},
        PLOTS["idle_hoarded"])


def _cheapest_inference(config: FleetConfig, memory: float | None) -> str | None:
    types = [t for t in config.pools[Purpose.INFERENCE]
             if memory is None or config.catalog[t].memory_gb >= memory]
    return min(types, key=lambda t: (config.catalog[t].price_per_hour
                                     / config.catalog[t].relative_throughput, t), default=None)


def _alternative_cost(r: Record, end: float, config: FleetConfig) -> tuple[str, float] | None:
    """The same work on the inference pool's cheapest type per unit of work (routing's rule)."""
    alt = _cheapest_inference(config, r.min_memory_gb)
    if alt is None or r.gpu_type not in config.catalog:
        return None
    spec, used = config.catalog[alt], config.catalog[r.gpu_type]
    hours = held_hours(r, end) * used.relative_throughput / spec.relative_throughput
    return alt, spec.price_per_hour * r.count * hours


def inference_on_training(history: History, config: FleetConfig,
                          pools: dict[str, PoolStats]) -> list[Recommendation]:
    end = history.end
    training, inference = config.pools[Purpose.TRAINING], config.pools[Purpose.INFERENCE]
    found: dict[str, list[Record]] = defaultdict(list)
    for r in history.records:
        if (r.purpose is Purpose.INFERENCE and r.gpu_type in training
                and r.gpu_type not in inference and r.started_at is not None):
            found[r.project].append(r)
    out = []
    for project, rows in sorted(found.items()):
        rec = _inference_rec(project, rows, end, config, pools[Purpose.TRAINING.value])
        if rec is not None:
            out.append(rec)
    return out


def _inference_rec(project: str, rows: list[Record], end: float, config: FleetConfig,
                   training: PoolStats) -> Recommendation | None:
    gpu_h = sum(r.count * held_hours(r, end) for r in rows)
    if gpu_h < MIN_EVIDENCE_GPU_HOURS:
        return None
    cost = sum(cost_of(r, end) for r in rows)
    alts = [_alternative_cost(r, end, config) for r in rows]
    movable = [a for a in alts if a is not None]
    types = sorted({r.gpu_type for r in rows})
    evidence: dict[str, Any] = {"gpu_hours": _r(gpu_h), "cost_usd": _r(cost, 2),
                                "gpu_types": types, "allocations": len(rows),
                                "training_pool_p90_wait_hours": _r(training.wait.p90_h)}
    text = (f"project {project}'s inference ran on training GPUs ({'/'.join(types)}): "
            f"{gpu_h:.1f} GPU-hours costing ${cost:.2f}")
    if len(movable) == len(rows):
        alt_cost = sum(c for _, c in movable)
        alt_types = sorted({t for t, _ in movable})
        evidence |= {"alternative_gpu_types": alt_types, "alternative_cost_usd": _r(alt_cost, 2),
                     "saving_usd": _r(cost - alt_cost, 2)}
        text += (f"; the same work on {'/'.join(alt_types)} (the inference pool's cheapest per "
                 f"unit of work) would cost ${alt_cost:.2f} (${cost - alt_cost:.2f} less)")
    else:
        text += f"; {len(rows) - len(movable)} of them need more memory than the inference pool has"
    if training.wait.p90_h:
        text += f", while training requests waited (p90 {training.wait.p90_h:.1f} h)"
    return Recommendation("inference-on-training-gpus", project, text + ": route it to the "
                          "inference pool (drop --gpu-type)", evidence,
                          PLOTS["project_pool_graph"])


def quota_unused(u: ProjectUsage) -> list[Recommendation]:
    out = []
    if u.quota_gpus and u.peak_demand_gpus <= UNUSED_SHARE * u.quota_gpus:
        out.append(Recommendation("quota-unused", u.project, (
            f"project {u.project}'s quota of {u.quota_gpus} GPUs is never used: its demand "
            f"peaked at {u.peak_demand_gpus} GPU(s) ({u.peak_demand_gpus / u.quota_gpus:.0%}); "
            f"lower it to {max(1, u.peak_demand_gpus)} or give the room to another project"),
            {"quota_gpus": u.quota_gpus, "peak_demand_gpus": u.peak_demand_gpus,
             "peak_held_gpus": u.peak_held_gpus}))
    if u.budget_usd and u.cost_usd <= UNUSED_SHARE * u.budget_usd:
        out.append(Recommendation("quota-unused", u.project, (
            f"project {u.project} spent ${u.cost_usd:.2f} of its ${u.budget_usd:.2f} budget "
            f"({u.cost_usd / u.budget_usd:.0%}) in this window: the budget is far above its "
            "use"), {"budget_usd": _r(u.budget_usd, 2), "spent_usd": _r(u.cost_usd, 2)}))
    return out


def idle_pool(p: PoolStats) -> Recommendation | None:
    if p.capacity_gpus <= 0 or p.utilisation > IDLE_POOL_SHARE:
        return None
    spare = p.capacity_gpus - p.peak_demand_gpus
    never = f"; {spare} of its GPUs were never asked for, even at peak" if spare > 0 else ""
    text = (f"pool {p.name} held {p.mean_held_gpus:.2f} of its {p.capacity_gpus} GPUs on "
            f"average ({p.utilisation:.0%}){never}: shrink it or lend its GPUs out")
    return Recommendation("idle-pool", p.name, text, {
        "mean_held_gpus": _r(p.mean_held_gpus), "capacity_gpus": p.capacity_gpus,
        "utilisation": _r(p.utilisation), "peak_demand_gpus": p.peak_demand_gpus,
        "never_requested_gpus": max(0, spare)}, PLOTS["demand_vs_capacity"])


def recommend(history: History, config: FleetConfig, a: Analysis) -> list[Recommendation]:
    if not history.records:
        return []
    pools = a.pools
    recs = [r for p in pools.values() for r in (pool_short(p, a.bottlenecks), idle_pool(p))
            if r is not None]
    recs += type_shortages(history, config, pools, a.gpu_types)
    recs += inference_on_training(history, config, pools)
    recs += [r for u in a.projects if (r := hoarder(u)) is not None]
    recs += [r for u in a.projects for r in quota_unused(u)]
    return sorted(recs, key=lambda r: KIND_ORDER.index(r.kind))


# ---- the analysis ------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    history: History
    pools: dict[str, PoolStats]
    gpu_types: dict[str, PoolStats]
    projects: list[ProjectUsage]
    graph: Any
    bottlenecks: dict[str, Any]
    recommendations: list[Recommendation] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    plots_dir: str | None = None


def analyze(history: History, config: FleetConfig) -> Analysis:
    pools = {p.value: pool_stats(p, history, config) for p in Purpose}
    used = {r.gpu_type for r in history.records} | {n.gpu_type for n in config.nodes}
    types = {t: type_stats(t, history, config) for t in sorted(used)}
    names = sorted({r.project for r in history.records} | set(config.quotas.projects)
                   | set(history.budgets))
    projects = [project_usage(n, history, config) for n in names]
    g = build_graph(history)
    a = Analysis(history, pools, types, projects, g, graph_summary(g))
    return replace(a, recommendations=recommend(history, config, a))


def _counts(records: list[Record]) -> dict[str, int]:
    return {"total": len(records),
            **{s: sum(1 for r in records if r.state == s) for s in ("queued", "active",
                                                                    "released")},
            "cancelled": sum(1 for r in records if r.cancelled)}


def _pool_json(p: PoolStats, key: str) -> dict[str, Any]:
    d = {key: p.name} | {k: v for k, v in asdict(p).items() if k not in ("name", "series")}
    d["peak_at"] = _iso(p.peak_at)
    d["series"] = [[_iso(t), h, w] for t, (h, w) in zip(p.series.times, p.series.levels,
                                                        strict=True)]
    return d


def to_json(a: Analysis) -> dict[str, Any]:
    h = a.history
    return {
        "ledger": h.ledger, "fleet": h.fleet, "warnings": h.warnings,
        "window": {"start": _iso(h.start if h.records else None),
                   "end": _iso(h.end if h.records else None),
                   "hours": (h.end - h.start) / 3600.0 if h.records else 0.0,
                   "since": _iso(h.since), "until": _iso(h.until)},
        "allocations": _counts(h.records),
        "pools": [_pool_json(p, "pool") for p in a.pools.values()],
        "gpu_types": [_pool_json(t, "gpu_type") for t in a.gpu_types.values()],
        "projects": [asdict(u) for u in a.projects],
        "graph": a.bottlenecks,
        "recommendations": [asdict(r) for r in a.recommendations],
        "plots_dir": a.plots_dir, "plots": a.plots,
    }


# ---- text --------------------------------------------------------------------------------


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _capacity_row(p: PoolStats) -> str:
    return (f"  {p.name:<10}{p.capacity_gpus:>9}{p.mean_held_gpus:>10.2f}{p.utilisation:>6.0%}"
            f"{p.peak_demand_gpus:>12}  {_iso(p.peak_at) or '-':<21}"
            f"{p.sustained_shortfall_gpus:>6}{p.hours_over_capacity:>8.2f}")


def _pool_lines(a: Analysis) -> list[str]:
    lines = ["Demand against capacity per pool (demand = GPUs held + GPUs waiting)",
             f"  {'pool':<10}{'capacity':>9}{'mean held':>10}{'util':>6}{'peak demand':>12}"
             f"  {'at':<21}{'short':>6}{'h over':>8}"]
    lines += [_capacity_row(p) for p in a.pools.values()]
    lines += ["  by GPU type:", *(_capacity_row(t) for t in a.gpu_types.values())]
    lines += ["", "Queueing delay per pool (hours; started requests, then the others)",
              f"  {'pool':<10}{'n':>5}{'mean':>7}{'p50':>7}{'p90':>7}{'max':>7}"
              f"{'still queued (h)':>19}{'cancelled (h)':>16}"]
    for p in a.pools.values():
        w = p.wait
        lines.append(f"  {p.name:<10}{w.started:>5}{_h(w.mean_h):>7}{_h(w.p50_h):>7}"
                     f"{_h(w.p90_h):>7}{_h(w.max_h):>7}"
                     f"{f'{w.queued} ({w.queued_waited_h:.2f})':>19}"
                     f"{f'{w.cancelled} ({w.cancelled_waited_h:.2f})':>16}")
    return lines


def _project_lines(a: Analysis) -> list[str]:
    lines = ["Idle and hoarded GPU-hours per project (hoarded: a lower bound)",
             f"  {'project':<16}{'allocs':>7}{'GPU-h':>9}{'cost':>11}{'util':>7}{'idle GPU-h':>11}"
             f"{'hoarded':>9}{'share':>7}{'idle rel.':>10}"]
    for u in a.projects:
        util = "-" if u.mean_util_pct is None else f"{u.mean_util_pct:.0f}%"
        lines.append(f"  {u.project:<16}{u.allocations:>7}{u.gpu_hours:>9.2f}"
                     f"{f'${u.cost_usd:,.2f}':>11}{util:>7}{u.idle_gpu_hours:>11.2f}"
                     f"{u.hoarded_gpu_hours:>9.2f}{u.hoarded_share:>7.0%}{u.idle_releases:>10}")
    return lines


def _name(node: str) -> str:
    kind, _, name = node.partition(":")
    return f"{'GPU type' if kind == 'gpu' else kind} {name}"


def _graph_lines(a: Analysis) -> list[str]:
    b = a.bottlenecks
    lines = ["Bottlenecks (project -> pool -> GPU type graph)"]
    if not b["top_edges"]:
        return [*lines, "  no request waited"]
    lines.append("  edges by waiting:")
    for e in b["top_edges"]:
        lines.append(f"    {_name(e['source'])} -> {_name(e['target'])}: "
                     f"{e['wait_hours']:.2f} h waited over {e['requests']} request(s) "
                     f"(mean {e['mean_wait_hours']:.2f} h), {e['gpu_hours']:.2f} GPU-h")
    lines.append("  pools and GPU types by waiting flow:")
    for n in b["bottleneck_nodes"]:
        lines.append(f"    {_name(n['node'])}: {n['wait_hours']:.2f} h waited, "
                     f"{n['gpu_hours']:.2f} GPU-h")
    return lines


def to_text(a: Analysis) -> str:
    h = a.history
    c = _counts(h.records)
    head = [f"Usage-pattern analysis of {h.ledger} (fleet: {h.fleet})"]
    head += [f"warning: {w}" for w in h.warnings]
    if not h.records:
        return "\n".join([*head, "no allocations in the window"])
    head.append(f"window {_iso(h.start)} to {_iso(h.end)} ({(h.end - h.start) / 3600:.1f} h): "
                f"{c['total']} allocations ({c['queued']} queued, {c['active']} active, "
                f"{c['released']} released, of which {c['cancelled']} cancelled)")
    recs = ["Recommendations"] + ([f"  {i}. [{r.kind}] {r.text}"
                                   for i, r in enumerate(a.recommendations, 1)] or ["  none"])
    plots = [f"Plots in {a.plots_dir}: {', '.join(Path(p).name for p in a.plots.values())}"] \
        if a.plots else ["No plots written"]
    parts = [head, _pool_lines(a), _project_lines(a), _graph_lines(a), recs, plots]
    return "\n\n".join("\n".join(p) for p in parts)


# ---- plots -------------------------------------------------------------------------------


def write_plots(a: Analysis, out: Path) -> dict[str, str]:
    """The four PNGs under `out`, drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot write plots to {out}: {exc.strerror}") from None
    drawers = {"demand_vs_capacity": lambda a, plt: _plot_demand(a, plt, "pool"),
               "demand_by_gpu_type": lambda a, plt: _plot_demand(a, plt, "GPU type"),
               "queueing_delay": _plot_waits,
               "idle_hoarded": _plot_projects, "project_pool_graph": _plot_graph}
    written = {}
    for name, draw in drawers.items():
        fig = draw(a, plt)
        path = out / PLOTS[name]
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written[name] = str(path)
    return written


def _plot_demand(a: Analysis, plt: Any, kind: str) -> Any:
    pools = list((a.pools if kind == "pool" else a.gpu_types).values())
    fig, axes = plt.subplots(len(pools), 1, figsize=(9, 2.6 * len(pools)), sharex=True,
                             squeeze=False)
    start = a.history.start
    for ax, p in zip(axes[:, 0], pools, strict=True):
        xs = [(t - start) / 3600 for t in p.series.times]
        ax.fill_between(xs, [h for h, _ in p.series.levels], step="post", alpha=0.4,
                        label="held")
        ax.step(xs, p.series.demand(), where="post", color="black",
                label="demand (held + waiting)")
        ax.axhline(p.capacity_gpus, color="red", linestyle="--", label="capacity")
        ax.set_title(f"{kind} {p.name}" + (f" ({'/'.join(p.gpu_types)})"
                                           if p.gpu_types != [p.name] else ""))
        ax.set_ylabel("GPUs")
        ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel(f"hours since {_iso(start)}")
    fig.tight_layout()
    return fig


def _plot_waits(a: Analysis, plt: Any) -> Any:
    end = a.history.end
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(a.pools)
    for i, name in enumerate(names, 1):
        mine = [r for r in a.history.records if r.pool.value == name]
        started = [wait_hours(r, end) for r in mine if r.started_at is not None]
        if started:
            ax.boxplot([started], positions=[i], widths=0.5)
        others = [(wait_hours(r, end), "x" if r.cancelled else "^") for r in mine
                  if r.started_at is None]
        for w, marker in others:
            ax.scatter([i + 0.3], [w], marker=marker, color="red")
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("hours waited")
    ax.set_title("queueing delay per pool (box: started; ^ still queued, x cancelled)")
    return fig


def _plot_projects(a: Analysis, plt: Any) -> Any:
    used = [u for u in a.projects if u.allocations]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(used)), 4))
    xs = range(len(used))
    for offset, label, values in ((-0.27, "GPU-hours", [u.gpu_hours for u in used]),
                                  (0.0, "idle GPU-hours", [u.idle_gpu_hours for u in used]),
                                  (0.27, "hoarded GPU-hours (lower bound)",
                                   [u.hoarded_gpu_hours for u in used])):
        ax.bar([x + offset for x in xs], values, width=0.27, label=label)
    ax.set_xticks(list(xs), [u.project for u in used], rotation=30, ha="right")
    ax.set_ylabel("GPU-hours")
    ax.set_title("idle and hoarded GPU-hours per project")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _plot_graph(a: Analysis, plt: Any) -> Any:
    g = a.graph
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.set_title("projects -> pools -> GPU types (width: GPU-hours, colour: mean wait, h)")
    ax.axis("off")
    if g.number_of_nodes() == 0:
        return fig
    pos = _layout(g)
    edges = list(g.edges(data=True))
    top = max(e["gpu_hours"] for _, _, e in edges) or 1.0
    waits = [e["mean_wait_hours"] for _, _, e in edges]
    cmap = plt.get_cmap("coolwarm")
    norm = plt.Normalize(vmin=0.0, vmax=max(max(waits), 1e-9))
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color="lightgrey", node_size=900)
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: d["name"] for n, d in g.nodes(data=True)},
                            font_size=8)
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color=[cmap(norm(w)) for w in waits],
                           width=[1 + 7 * e["gpu_hours"] / top for _, _, e in edges],
                           arrows=True, node_size=900)
    nx.draw_networkx_edge_labels(g, pos, ax=ax, font_size=7, edge_labels={
        (u, v): f"{e['gpu_hours']:.0f} GPU-h, wait {e['mean_wait_hours']:.1f} h"
        for u, v, e in edges})
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="mean wait (h)")
    return fig


def _layout(g: Any) -> dict[str, tuple[float, float]]:
    """Three columns, pools in their usual order and each project and GPU type beside the
    pool it uses most, so that few edges cross."""
    order = {f"pool:{p.value}": i for i, p in enumerate(Purpose)}

    def rank(n: str) -> tuple[float, str]:
        if n in order:
            return order[n], n
        links = list(g.out_edges(n, data=True)) or list(g.in_edges(n, data=True))
        heaviest = max(links, key=lambda e: e[2]["gpu_hours"] + e[2]["wait_hours"])
        pool = heaviest[1] if n.startswith("project:") else heaviest[0]
        return order.get(pool, len(order)), n

    pos: dict[str, tuple[float, float]] = {}
    for layer in range(3):
        column = sorted((n for n, d in g.nodes(data=True) if d["layer"] == layer), key=rank)
        for i, n in enumerate(column):
            pos[n] = (float(layer), -i + (len(column) - 1) / 2)
    return pos


# ---- the command -------------------------------------------------------------------------


def run_analyze(state_dir: str | None = None, fleet: str | None = None, *,
                since: str | None = None, until: str | None = None, out: str | None = None,
                plots: bool = True, as_json: bool = False) -> int:
    history, config = load_history(state_dir, fleet, since=since, until=until)
    result = analyze(history, config)
    if plots and history.records:
        directory = Path(out) if out else Path(history.ledger).parent / "analysis"
        result = replace(result, plots=write_plots(result, directory), plots_dir=str(directory))
    print(json.dumps(to_json(result)) if as_json else to_text(result))
    return 0
