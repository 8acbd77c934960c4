"""The PNG plots of an analysis, drawn with matplotlib's Agg backend (imported when drawing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from fleet.errors import InvalidInput
from fleet.models import Purpose
from sim.analysis.history import _iso
from sim.analysis.result import Analysis
from sim.analysis.timeseries import wait_hours

PLOTS = {
    "demand_vs_capacity": "demand_vs_capacity.png",
    "demand_by_gpu_type": "demand_by_gpu_type.png",
    "queueing_delay": "queueing_delay.png",
    "idle_hoarded": "idle_hoarded.png",
    "project_pool_graph": "project_pool_graph.png",
}


def plots_dir(ledger: str | Path, out: str | Path | None) -> Path:
    """Where `analyze` draws: `out`, else the analysis/ folder beside the ledger read."""
    return Path(out) if out else Path(ledger).parent / "analysis"


def write_plots(a: Analysis, out: Path) -> dict[str, str]:
    """The four PNGs under `out`, drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot write plots to {out}: {exc.strerror}") from None
    drawers = {
        "demand_vs_capacity": lambda a, plt: _plot_demand(a, plt, "pool"),
        "demand_by_gpu_type": lambda a, plt: _plot_demand(a, plt, "GPU type"),
        "queueing_delay": _plot_waits,
        "idle_hoarded": _plot_projects,
        "project_pool_graph": _plot_graph,
    }
    written = {}
    for name, draw in drawers.items():
        fig = draw(a, plt)
        path = out / PLOTS[name]
        try:  # checked before the analysis: only a place changed since fails here
            fig.savefig(path, dpi=100, bbox_inches="tight")
        except OSError as exc:
            raise InvalidInput(f"cannot write plot {path}: {exc.strerror or exc}") from None
        finally:
            plt.close(fig)
        written[name] = str(path)
    return written


def _plot_demand(a: Analysis, plt: Any, kind: str) -> Any:
    pools = list((a.pools if kind == "pool" else a.gpu_types).values())
    fig, axes = plt.subplots(
        len(pools), 1, figsize=(9, 2.6 * len(pools)), sharex=True, squeeze=False
    )
    start = a.history.start
    for ax, p in zip(axes[:, 0], pools, strict=True):
        xs = [(t - start) / 3600 for t in p.series.times]
        ax.fill_between(xs, [h for h, _ in p.series.levels], step="post", alpha=0.4, label="held")
        ax.step(xs, p.series.demand(), where="post", color="black", label="demand (held + waiting)")
        ax.axhline(p.capacity_gpus, color="red", linestyle="--", label="capacity")
        ax.set_title(
            f"{kind} {p.name}" + (f" ({'/'.join(p.gpu_types)})" if p.gpu_types != [p.name] else "")
        )
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
        others = [
            (wait_hours(r, end), "x" if r.cancelled else "^") for r in mine if r.started_at is None
        ]
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
    for offset, label, values in (
        (-0.27, "GPU-hours", [u.gpu_hours for u in used]),
        (0.0, "idle GPU-hours", [u.idle_gpu_hours for u in used]),
        (0.27, "hoarded GPU-hours (lower bound)", [u.hoarded_gpu_hours for u in used]),
    ):
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
    nx.draw_networkx_labels(
        g, pos, ax=ax, labels={n: d["name"] for n, d in g.nodes(data=True)}, font_size=8
    )
    nx.draw_networkx_edges(
        g,
        pos,
        ax=ax,
        edge_color=[cmap(norm(w)) for w in waits],
        width=[1 + 7 * e["gpu_hours"] / top for _, _, e in edges],
        arrows=True,
        node_size=900,
    )
    nx.draw_networkx_edge_labels(
        g,
        pos,
        ax=ax,
        font_size=7,
        edge_labels={
            (u, v): f"{e['gpu_hours']:.0f} GPU-h, wait {e['mean_wait_hours']:.1f} h"
            for u, v, e in edges
        },
    )
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
