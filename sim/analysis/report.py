"""An analysis as text (the report) or as one JSON object."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from sim.analysis.history import Record, _iso
from sim.analysis.pools import PoolStats
from sim.analysis.result import Analysis


def _counts(records: list[Record]) -> dict[str, int]:
    return {
        "total": len(records),
        **{s: sum(1 for r in records if r.state == s) for s in ("queued", "active", "released")},
        "cancelled": sum(1 for r in records if r.cancelled),
    }


def _pool_json(p: PoolStats, key: str) -> dict[str, Any]:
    d = {key: p.name} | {k: v for k, v in asdict(p).items() if k not in ("name", "series")}
    d["peak_at"] = _iso(p.peak_at)
    d["series"] = [
        [_iso(t), h, w] for t, (h, w) in zip(p.series.times, p.series.levels, strict=True)
    ]
    return d


def to_json(a: Analysis) -> dict[str, Any]:
    h = a.history
    return {
        "ledger": h.ledger,
        "fleet": h.fleet,
        "warnings": h.warnings,
        "window": {
            "start": _iso(h.start if h.records else None),
            "end": _iso(h.end if h.records else None),
            "hours": (h.end - h.start) / 3600.0 if h.records else 0.0,
            "since": _iso(h.since),
            "until": _iso(h.until),
        },
        "allocations": _counts(h.records),
        "pools": [_pool_json(p, "pool") for p in a.pools.values()],
        "gpu_types": [_pool_json(t, "gpu_type") for t in a.gpu_types.values()],
        "projects": [asdict(u) for u in a.projects],
        "graph": a.bottlenecks,
        "recommendations": [asdict(r) for r in a.recommendations],
        "plots_dir": a.plots_dir,
        "plots": a.plots,
    }


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _capacity_row(p: PoolStats) -> str:
    return (
        f"  {p.name:<10}{p.capacity_gpus:>9}{p.mean_held_gpus:>10.2f}{p.utilisation:>6.0%}"
        f"{p.peak_demand_gpus:>12}  {_iso(p.peak_at) or '-':<21}"
        f"{p.sustained_shortfall_gpus:>6}{p.hours_over_capacity:>8.2f}"
    )


def _pool_lines(a: Analysis) -> list[str]:
    lines = [
        "Demand against capacity per pool (demand = GPUs held + GPUs waiting)",
        f"  {'pool':<10}{'capacity':>9}{'mean held':>10}{'util':>6}{'peak demand':>12}"
        f"  {'at':<21}{'short':>6}{'h over':>8}",
    ]
    lines += [_capacity_row(p) for p in a.pools.values()]
    lines += ["  by GPU type:", *(_capacity_row(t) for t in a.gpu_types.values())]
    lines += [
        "",
        "Queueing delay per pool (hours; started requests, then the others)",
        f"  {'pool':<10}{'n':>5}{'mean':>7}{'p50':>7}{'p90':>7}{'max':>7}"
        f"{'still queued (h)':>19}{'cancelled (h)':>16}",
    ]
    for p in a.pools.values():
        w = p.wait
        lines.append(
            f"  {p.name:<10}{w.started:>5}{_h(w.mean_h):>7}{_h(w.p50_h):>7}"
            f"{_h(w.p90_h):>7}{_h(w.max_h):>7}"
            f"{f'{w.queued} ({w.queued_waited_h:.2f})':>19}"
            f"{f'{w.cancelled} ({w.cancelled_waited_h:.2f})':>16}"
        )
    return lines


_PROJECT_COLUMNS = (
    ("project", "<", 16),
    ("allocs", ">", 7),
    ("GPU-h", ">", 9),
    ("cost", ">", 11),
    ("util", ">", 7),
    ("idle GPU-h", ">", 11),
    ("hoarded", ">", 9),
    ("share", ">", 7),
    ("idle rel.", ">", 10),
)


def _project_lines(a: Analysis) -> list[str]:
    rows = [
        [
            u.project,
            str(u.allocations),
            f"{u.gpu_hours:.2f}",
            f"${u.cost_usd:,.2f}",
            "-" if u.mean_util_pct is None else f"{u.mean_util_pct:.0f}%",
            f"{u.idle_gpu_hours:.2f}",
            f"{u.hoarded_gpu_hours:.2f}",
            f"{u.hoarded_share:.0%}",
            str(u.idle_releases),
        ]
        for u in a.projects
    ]
    # each column at least as wide as its default, and a space wider than its widest value,
    # so that columns never run together (a cost of $100,000 or a long project name)
    widths = [
        max(width, len(name) + 1, *(len(row[i]) + 1 for row in rows))
        for i, (name, _, width) in enumerate(_PROJECT_COLUMNS)
    ]

    def line(cells: list[str]) -> str:
        return "  " + "".join(
            f"{cell:{align}{width}}"
            for cell, (_, align, _), width in zip(cells, _PROJECT_COLUMNS, widths, strict=True)
        )

    return [
        "Idle and hoarded GPU-hours per project (hoarded: a lower bound)",
        line([name for name, _, _ in _PROJECT_COLUMNS]),
        *(line(row) for row in rows),
    ]


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
        lines.append(
            f"    {_name(e['source'])} -> {_name(e['target'])}: "
            f"{e['wait_hours']:.2f} h waited over {e['requests']} request(s) "
            f"(mean {e['mean_wait_hours']:.2f} h), {e['gpu_hours']:.2f} GPU-h"
        )
    lines.append("  pools and GPU types by waiting flow:")
    for n in b["bottleneck_nodes"]:
        lines.append(
            f"    {_name(n['node'])}: {n['wait_hours']:.2f} h waited, {n['gpu_hours']:.2f} GPU-h"
        )
    return lines


def to_text(a: Analysis) -> str:
    h = a.history
    c = _counts(h.records)
    head = [f"Usage-pattern analysis of {h.ledger} (fleet: {h.fleet})"]
    head += [f"warning: {w}" for w in h.warnings]
    if not h.records:
        return "\n".join([*head, "no allocations in the window"])
    head.append(
        f"window {_iso(h.start)} to {_iso(h.end)} ({(h.end - h.start) / 3600:.1f} h): "
        f"{c['total']} allocations ({c['queued']} queued, {c['active']} active, "
        f"{c['released']} released, of which {c['cancelled']} cancelled)"
    )
    recs = ["Recommendations"] + (
        [f"  {i}. [{r.kind}] {r.text}" for i, r in enumerate(a.recommendations, 1)] or ["  none"]
    )
    plots = (
        [f"Plots in {a.plots_dir}: {', '.join(Path(p).name for p in a.plots.values())}"]
        if a.plots
        else ["No plots written"]
    )
    parts = [head, _pool_lines(a), _project_lines(a), _graph_lines(a), recs, plots]
    return "\n\n".join("\n".join(p) for p in parts)
