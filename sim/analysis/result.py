"""What an analysis produces: its figures, graph, recommendations and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sim.analysis.history import History
from sim.analysis.pools import PoolStats
from sim.analysis.projects import ProjectUsage


@dataclass(frozen=True)
class Recommendation:
    kind: str
    subject: str
    text: str
    evidence: dict[str, Any]
    plot: str | None = None


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
