"""Running an analysis: `analyze` computes it from a history; `run_analyze` is the
`gpu-agent analyze` command (load, analyze, plot, print)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fleet.config import FleetConfig
from fleet.models import Purpose
from sim.analysis.bottlenecks import build_graph, graph_summary
from sim.analysis.history import History, load_history
from sim.analysis.plots import plots_dir, write_plots
from sim.analysis.pools import pool_stats, type_stats
from sim.analysis.projects import project_usage
from sim.analysis.recommendations import recommend
from sim.analysis.report import to_json, to_text
from sim.analysis.result import Analysis


def analyze(history: History, config: FleetConfig) -> Analysis:
    pools = {p.value: pool_stats(p, history, config) for p in Purpose}
    used = {r.gpu_type for r in history.records} | {n.gpu_type for n in config.nodes}
    types = {t: type_stats(t, history, config) for t in sorted(used)}
    names = sorted(
        {r.project for r in history.records} | set(config.quotas.projects) | set(history.budgets)
    )
    projects = [project_usage(n, history, config) for n in names]
    g = build_graph(history)
    a = Analysis(history, pools, types, projects, g, graph_summary(g))
    return replace(a, recommendations=recommend(history, config, a))


def run_analyze(
    state_dir: str | None = None,
    fleet: str | None = None,
    *,
    since: str | None = None,
    until: str | None = None,
    out: str | None = None,
    plots: bool = True,
    as_json: bool = False,
    check_plots: Callable[[Path], None] = lambda _: None,
) -> int:
    """The analysis of a state directory's ledger, printed; `check_plots` refuses the folder
    the plots go to, once the ledger is found and before any work (the CLI's check)."""
    history, config = load_history(state_dir, fleet, since=since, until=until)
    directory = plots_dir(history.ledger, out)
    if plots and history.records:
        check_plots(directory)
    result = analyze(history, config)
    if plots and history.records:
        result = replace(result, plots=write_plots(result, directory), plots_dir=str(directory))
    print(json.dumps(to_json(result)) if as_json else to_text(result))
    return 0
