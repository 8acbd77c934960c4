"""The simulator's results as a text table, a JSON file, a Markdown report and four plots.

`results` maps a policy name (in display order, e.g. naive, slurm-like, gpu-agent) to its
`sim.metrics.metrics()` dict. `write_report` writes `metrics.json` (sorted keys, no clock
reads: byte-identical for identical inputs), `report.md` and PNG plots drawn with matplotlib's
Agg backend (no display needed; the PNGs need not be byte-identical).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sim import accounting as metrics_accounting
from sim import metrics as metrics_module

Row = tuple[str, Callable[[Mapping[str, Any]], str]]
BASELINE = "naive"
PHILLY_IDLE_SHARE = 0.32  # share of Philly's GPU samples at 0 % (Jeon et al., ATC'19)
PHILLY_MEAN_UTIL = "47-52 %"  # Philly's published mean GPU utilisation
PLOTS = ("cost_over_time.png", "utilisation.png", "jct.png", "project_share.png")
METRICS, REPORT = "metrics.json", "report.md"


def _get(m: Mapping[str, Any], path: str) -> Any:
    """m["a"]["b"] for path "a.b"; None when any step is missing."""
    value: Any = m
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _num(path: str, fmt: str = "{:,.1f}") -> Callable[[Mapping[str, Any]], str]:
    def cell(m: Mapping[str, Any]) -> str:
        v = _get(m, path)
        return "n/a" if v is None else fmt.format(v)

    return cell


def _pct(path: str) -> Callable[[Mapping[str, Any]], str]:
    return _num(path, "{:.1%}")


def _pair(a: str, b: str, fa: str, fb: str) -> Callable[[Mapping[str, Any]], str]:
    left, right = _num(a, fa), _num(b, fb)
    return lambda m: f"{left(m)} / {right(m)}"


def _jobs(m: Mapping[str, Any]) -> str:
    parts = [_num(f"jobs.{k}", "{:,}")(m) for k in ("completed", "failed", "denied")]
    return " / ".join(parts)


ROWS: tuple[Row, ...] = (
    ("Total cost (USD)", _num("total_cost_usd", "{:,.2f}")),
    ("GPU-hours held", _num("gpu_hours_held")),
    ("Useful GPU-hours", _num("useful_gpu_hours")),
    ("Cost per useful GPU-hour (USD)", _num("cost_per_useful_gpu_hour", "{:,.3f}")),
    ("Work done (unit-hours)", _num("work_units_completed")),
    ("Work share (of the trace's)", _num("work_share", "{:.2%}")),
    ("Work share within budgets", _num("work_share_in_budget", "{:.2%}")),
    ("Cost per unit of work (USD)", _num("cost_per_work_unit", "{:,.3f}")),
    ("Cost against the floor", _num("cost_vs_floor", "{:.3f}x")),
    ("Allocation utilisation", _pct("allocation_util")),
    ("SM utilisation (of held)", _pct("sm_util")),
    ("SM utilisation (of fleet)", _pct("sm_util_fleet")),
    ("JCT mean (h)", _num("jct_hours.mean", "{:,.2f}")),
    ("JCT p50 (h)", _num("jct_hours.p50", "{:,.2f}")),
    ("JCT p99 (h)", _num("jct_hours.p99", "{:,.2f}")),
    ("Slowdown mean", _num("slowdown_mean", "{:,.2f}")),
    ("Queue mean (h)", _num("queue_hours.mean", "{:,.2f}")),
    ("Queue p50 (h)", _num("queue_hours.p50", "{:,.2f}")),
    ("Queue p99 (h)", _num("queue_hours.p99", "{:,.2f}")),
    ("Jain's index (finish, refusals 0)", _num("jain_fairness", "{:.3f}")),
    ("Jain's index (work share)", _num("jain_work_share", "{:.3f}")),
    (
        "Budget violations (count / USD)",
        _pair("budget_violations.count", "budget_violations.usd", "{:,}", "{:,.2f}"),
    ),
    ("Hoarded GPU-hours", _num("hoarded_gpu_hours")),
    ("Paused GPU-hours (idle mid-job)", _num("paused_gpu_hours")),
    ("Jobs completed / failed / denied", _jobs),
    ("Unplaced jobs", _num("jobs.unplaced", "{:,}")),
    ("Lost work (unit-hours)", _num("work.lost_work_units")),
    ("Killed attempts", _num("work.killed_attempts", "{:,}")),
    ("Preempted attempts (work kept)", _num("work.preempted_attempts", "{:,}")),
    ("Wasted cost (USD)", _num("work.wasted_cost_usd", "{:,.2f}")),
    ("Council denials / human reviews", _pair("council.denied", "reviews", "{:,}", "{:,}")),
)


def _cells(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    header = ["Metric", *results]
    return [header, *([label, *(cell(m) for m in results.values())] for label, cell in ROWS)]


def _change(new: Any, old: Any) -> str:
    if new is None or not old:
        return "n/a"
    return f"{(new - old) / old:+.1%}"


def strongest(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The baseline a user would pick instead of gpu-agent: of the policies that are not
    gpu-agent's, those that did the most work (within 0.1 % of the work), the cheapest
    against the floor."""
    base = {n: m for n, m in results.items() if not n.startswith("gpu-agent")}
    if not base:
        return None
    most = max(m.get("work_share") or 0.0 for m in base.values())
    fair = [n for n, m in base.items() if (m.get("work_share") or 0.0) >= most - 1e-3]

    def cost(name: str) -> float:
        value = base[name].get("cost_vs_floor")
        return float("inf") if value is None else value  # a real 0.0 is the cheapest

    return min(fair, key=cost)


def versus(results: Mapping[str, Mapping[str, Any]], baseline: str = BASELINE) -> list[str]:
    """One line per other policy: its cost, the work it did and its cost per unit of work
    against the baseline's."""
    if baseline not in results:
        return []
    base = results[baseline]
    return [
        f"{name} versus {baseline}: cost "
        f"{_change(m.get('total_cost_usd'), base.get('total_cost_usd'))}, work done "
        f"{_num('work_share', '{:.2%}')(m)} against {_num('work_share', '{:.2%}')(base)}, "
        f"cost per unit of work "
        f"{_change(m.get('cost_per_work_unit'), base.get('cost_per_work_unit'))}"
        for name, m in results.items()
        if name != baseline
    ]


def _usd(v: float) -> str:
    return f"-${-v:,.0f}" if v < 0 else f"${v:,.0f}"


def judged(results: Mapping[str, Mapping[str, Any]], across: Mapping[str, Any]) -> list[str]:
    """The floor, the same-work comparison, and where each saving against naive and the
    strongest baseline comes from (sim.accounting.savings)."""
    if not across:
        return []
    f, same = across["floor"], across["same_work"]
    lines = [
        f"floor: ${f['usd']:,.2f} for {f['work_units']:,.1f} {f['unit']}-hours of work "
        f"(all of the trace's work at the cheapest type each job may use)",
        f"same work ({same['jobs']:,} jobs every policy completed, floor "
        f"${same['floor_usd']:,.2f}): "
        + ", ".join(
            f"{n} {_num('cost_vs_floor', '{:.3f}x')(v)}" for n, v in same["policies"].items()
        ),
    ]
    lines += _worst_projects(across.get("worst_project_slowdown"))
    best = across.get("strongest_baseline")
    if best is not None:
        lines.append(
            f"strongest baseline: {best} (the most work done, then the cheapest against the floor)"
        )
    for name, against in across["savings_usd"].items():
        if not name.startswith("gpu-agent"):
            continue
        for base, s in against.items():
            lines.append(
                f"{name} saves {_usd(s['total'])} against {base}: routing "
                f"{_usd(s['routing'])}, idle tails {_usd(s['tail'])}, pauses "
                f"{_usd(s['pause'])}, kills {_usd(s['killed'])}, work not done "
                f"{_usd(s['work_not_done'])}"
            )
    return lines


def _worst_projects(worst: Mapping[str, Any] | None) -> list[str]:
    """The project each policy serves worst against the fairness baseline, by mean slowdown."""
    if not worst:
        return []
    cells = [
        f"{name} {w['ratio']:.3f}x ({w['project']})" if w else f"{name} n/a"
        for name, w in worst["policies"].items()
    ]
    if not cells:
        return []
    return [
        f"worst project's mean slowdown against {worst['against']} (over 1: served worse): "
        + ", ".join(cells)
    ]


def table(results: Mapping[str, dict[str, Any]], across: Mapping[str, Any] | None = None) -> str:
    """A fixed-width text table, one column per policy in the given order, then the deltas
    and, given what the policies say together (sim.simulate.across), the floor and the
    savings explained."""
    rows = _cells(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [*versus(results), *_versus_strongest(results, across), *judged(results, across or {})]
    return "\n".join([*lines, *(["", *notes] if notes else [])])


def _versus_strongest(
    results: Mapping[str, Mapping[str, Any]], across: Mapping[str, Any] | None
) -> list[str]:
    best = (across or {}).get("strongest_baseline")
    if best in (None, BASELINE):
        return []
    return [line for line in versus(results, best) if line.startswith("gpu-agent")]


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows = _cells(results)
    out = ["| " + " | ".join(rows[0]) + " |", "|---" + "|---:" * (len(rows[0]) - 1) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _project_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Cost against budget per project, one column per policy."""
    projects = sorted({p for m in results.values() for p in m.get("per_project", {})})
    out = [
        "| Project | Budget (USD) | " + " | ".join(f"{n} cost" for n in results) + " |",
        "|---|---:" + "|---:" * len(results) + "|",
    ]
    for p in projects:
        entries = [m.get("per_project", {}).get(p, {}) for m in results.values()]
        budget = next((e["budget_usd"] for e in entries if e.get("budget_usd") is not None), None)
        costs = [_num("cost_usd", "{:,.2f}")(e) for e in entries]
        shown = "n/a" if budget is None else f"{budget:,.2f}"
        out.append(f"| {p} | {shown} | " + " | ".join(costs) + " |")
    return "\n".join(out)


def _calibration(c: Mapping[str, float]) -> str:
    def share(key: str) -> str:
        v = c.get(key)
        return "n/a" if v is None else f"{v * 100:.1f} %"

    util = c.get("mean_util_pct")
    return "\n".join(
        [
            f"- Jobs: {c.get('jobs', 'n/a')}; GPU-hours on the trace: "
            f"{c.get('gpu_hours', 0.0):,.0f}",
            f"- Mean SM utilisation while held: {'n/a' if util is None else f'{util:.1f} %'} "
            f"(Philly, published: {PHILLY_MEAN_UTIL})",
            f"- Share of held GPU time at 0 %: {share('idle_share')} "
            f"(Philly, published: ~{PHILLY_IDLE_SHARE * 100:.0f} % of samples)",
            f"- Idle share of jobs under 6 h: {share('idle_share_under_6h')}; over 24 h: "
            f"{share('idle_share_over_24h')}",
        ]
    )


def _meta(meta: Mapping[str, Any]) -> str:
    return "\n".join(f"- {k}: {meta[k]}" for k in sorted(meta))


def markdown(
    results: Mapping[str, Mapping[str, Any]],
    calibration: Mapping[str, float],
    meta: Mapping[str, Any],
    across: Mapping[str, Any] | None = None,
    plots: Sequence[str] = PLOTS,
) -> str:
    """report.md: run, calibration, the table, the deltas, the plots and the definitions."""
    definitions = metrics_module.__doc__ or "See sim/metrics.py for the definitions."
    parts = [
        "# Trace-driven simulation: policies compared",
        "",
        "## Run",
        "",
        _meta(meta),
        "",
        "## Workload calibration",
        "",
        _calibration(calibration),
        "",
        "## Results",
        "",
        markdown_table(results),
        "",
        *(f"- {line}" for line in versus(results)),
        *(f"- {line}" for line in _versus_strongest(results, across)),
        "",
        "## Against the floor, and where the savings come from",
        "",
        *(f"- {line}" for line in judged(results, across or {})),
        "",
        (metrics_accounting.__doc__ or "").strip(),
        "",
        "## Cost against budget per project",
        "",
        _project_table(results),
        "",
        "## Plots",
        "",
        *(f"![{p[:-4]}]({p})\n" for p in plots),
        "## Definitions",
        "",
        definitions.strip(),
        "",
    ]
    return "\n".join(parts)


def dump(
    results: Mapping[str, Any],
    calibration: Mapping[str, float],
    meta: Mapping[str, Any],
    across: Mapping[str, Any] | None = None,
) -> str:
    """metrics.json's text: sorted keys, so identical inputs give identical bytes."""
    doc = {"meta": meta, "calibration": calibration, "policies": results, **(across or {})}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def write_report(
    out_dir: Path,
    results: Mapping[str, dict[str, Any]],
    calibration: Mapping[str, float],
    meta: Mapping[str, Any],
    across: Mapping[str, Any] | None = None,
) -> list[Path]:
    """metrics.json, report.md and the four plots in `out_dir`; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / METRICS, out_dir / REPORT]
    written[0].write_text(dump(results, calibration, meta, across), encoding="utf-8")
    written[1].write_text(markdown(results, calibration, meta, across), encoding="utf-8")
    return written + plot(out_dir, results)


def plot(out_dir: Path, results: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """The four PNGs; matplotlib is imported here so the table needs no plotting library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in zip(PLOTS, (_cost_plot, _util_plot, _jct_plot, _share_plot), strict=True):
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        draw(ax, results)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _cost_plot(ax: Any, results: Mapping[str, Mapping[str, Any]]) -> None:
    for name, m in results.items():
        ax.plot(_get(m, "series.t_hours") or [], _get(m, "series.cost_usd") or [], label=name)
    ax.set(title="Cumulative cost", xlabel="hours since first submit", ylabel="USD")
    ax.legend()


def _util_plot(ax: Any, results: Mapping[str, Mapping[str, Any]]) -> None:
    fleet = max((m.get("fleet_gpus") or 0 for m in results.values()), default=0)
    for name, m in results.items():
        ax.plot(_get(m, "series.t_hours") or [], _get(m, "series.gpus_held") or [], label=name)
    if fleet:
        ax.axhline(fleet, color="black", linestyle="--", linewidth=1, label="fleet")
    ax.set(title="GPUs held", xlabel="hours since first submit", ylabel="GPUs")
    ax.legend()


def _jct_plot(ax: Any, results: Mapping[str, Mapping[str, Any]]) -> None:
    """The completion times' CDF of each policy that completed a job; where none did, the
    plot says so (a legend of no line is a warning on the user's terminal)."""
    for name, m in results.items():
        hours = _get(m, "series.jct_cdf.hours") or []
        if hours:
            pct = _get(m, "series.jct_cdf.pct")
            ax.plot([max(h, 1e-3) for h in hours], [p / 100 for p in pct], label=name)
    ax.set_xscale("log")
    ax.set(
        title="Job completion time (completed jobs)",
        xlabel="JCT (hours, log)",
        ylabel="fraction of jobs",
    )
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no policy completed a job", ha="center", transform=ax.transAxes)


def _share_plot(ax: Any, results: Mapping[str, Mapping[str, Any]]) -> None:
    projects = sorted({p for m in results.values() for p in m.get("per_project", {})})
    width = 0.8 / max(1, len(results))
    for i, (name, m) in enumerate(results.items()):
        per = m.get("per_project", {})
        shares = [per.get(p, {}).get("share_of_gpu_hours") or 0.0 for p in projects]
        ax.bar([k + i * width for k in range(len(projects))], shares, width, label=name)
    ax.set_xticks(
        [k + 0.4 - width / 2 for k in range(len(projects))], projects, rotation=45, ha="right"
    )
    ax.set(title="Share of GPU-hours held per project", ylabel="share")
    ax.legend()
