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
  means): per allocation the larger of two bounds. (1) What the ledger counted as hoarded at
  the release: the hours held idle at the end with no work left (since the command exited,
  or since every GPU went idle), times the GPUs; on a ledger from before that count (schema
  version 3), an allocation released for `idle` counts count x `idle_timeout_minutes`.
  (2) Any allocation with a mean utilisation u: by Markov's inequality at most
  u / idle_util_pct of its GPU-ticks were at or above the idle threshold, so at least
  GPU-hours x (1 - u / idle_util_pct) were idle (zero when u >= idle_util_pct). An
  allocation that ran to its lease end nearly idle is thus counted almost whole.
- The graph (networkx DiGraph) has edges project -> pool and pool -> GPU type with
  `gpu_hours`, `wait_hours` (hours waited by every request: started, still queued or
  cancelled) and `requests`. Edges are ranked by waiting; a node's load is the flow through
  it (weighted in-degree; out-degree for a project); pools and GPU types ranked by waiting
  flow are the bottlenecks.

Recommendations each carry the figures that justify them; the thresholds are the named
constants below.

Modules: `history` (reading the ledger and the fleet), `timeseries` (step functions of GPUs
held and waiting), `pools` (per pool and GPU type), `projects` (per project), `bottlenecks`
(the graph), `thresholds`, `recommendations`, `result` (the `Analysis`), `report` (text and
JSON), `plots`, and `run` (`analyze` and the command, `run_analyze`).
"""

from __future__ import annotations

from sim.analysis.bottlenecks import (
    build_graph,
    graph_summary,
)
from sim.analysis.history import (
    History,
    Record,
    load_history,
    parse_date,
    pool_of,
    resolve_fleet,
)
from sim.analysis.plots import (
    PLOTS,
    write_plots,
)
from sim.analysis.pools import (
    PoolStats,
    WaitStats,
    capacity_stats,
    pool_stats,
    type_stats,
    wait_stats,
)
from sim.analysis.projects import (
    ProjectUsage,
    cost_of,
    hoarded_gpu_hours,
    project_usage,
)
from sim.analysis.recommendations import (
    KIND_ORDER,
    hoarder,
    idle_pool,
    inference_on_training,
    pool_short,
    quota_unused,
    recommend,
    type_short,
    type_shortages,
)
from sim.analysis.report import (
    to_json,
    to_text,
)
from sim.analysis.result import (
    Analysis,
    Recommendation,
)
from sim.analysis.run import (
    analyze,
    run_analyze,
)
from sim.analysis.thresholds import (
    HOARD_SHARE,
    IDLE_POOL_SHARE,
    MIN_EVIDENCE_GPU_HOURS,
    SUSTAINED_HOURS,
    TOP_N,
    UNUSED_SHARE,
)
from sim.analysis.timeseries import (
    Series,
    Span,
    held_hours,
    mean_level,
    percentile,
    series,
    spans,
    sustained_excess,
    wait_hours,
)

__all__ = [
    "HOARD_SHARE",
    "IDLE_POOL_SHARE",
    "KIND_ORDER",
    "MIN_EVIDENCE_GPU_HOURS",
    "PLOTS",
    "SUSTAINED_HOURS",
    "TOP_N",
    "UNUSED_SHARE",
    "Analysis",
    "History",
    "PoolStats",
    "ProjectUsage",
    "Recommendation",
    "Record",
    "Series",
    "Span",
    "WaitStats",
    "analyze",
    "build_graph",
    "capacity_stats",
    "cost_of",
    "graph_summary",
    "held_hours",
    "hoarded_gpu_hours",
    "hoarder",
    "idle_pool",
    "inference_on_training",
    "load_history",
    "mean_level",
    "parse_date",
    "percentile",
    "pool_of",
    "pool_short",
    "pool_stats",
    "project_usage",
    "quota_unused",
    "recommend",
    "resolve_fleet",
    "run_analyze",
    "series",
    "spans",
    "sustained_excess",
    "to_json",
    "to_text",
    "type_short",
    "type_shortages",
    "type_stats",
    "wait_hours",
    "wait_stats",
    "write_plots",
]
