"""`gpu-agent simulate`: one trace, several policies, the same jobs, one report.

    gpu-agent simulate --trace ../shared/traces/philly.csv \\
        --policies naive,slurm-like,slurm-cheapest,cheapest-first,gpu-agent \\
        [--jobs N] [--vc NAME] [--workload normal|pure] [--fleet FILE] [--out DIR] [--seed S]

The trace is read through a schema mapping (fleet.trace), made into requests and workloads by
the seeded rule of sim.workload, and replayed under each policy in virtual time. The gpu-agent
policies leave their ledger (and the fleet they ran on) in OUT/<policy>/, so that
`gpu-agent analyze --state-dir OUT/gpu-agent` can study the run.
"""

from __future__ import annotations

import contextlib
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

from council.policies import NoCouncil
from fleet.config import FleetConfig, parse_fleet
from fleet.errors import InvalidInput
from fleet.models import CouncilOutcome
from fleet.statedir import FLEET_COPY, LEDGER
from fleet.trace import PHILLY, Job, TraceSchema, read_trace
from sim.accounting import Floor, floor, same_work, savings
from sim.agent_replay import run_gpu_agent
from sim.baselines import BASELINES, run_baseline
from sim.borrowing import run_borrowing
from sim.lifecycle import Attempt
from sim.metrics import metrics, worst_project
from sim.report import BASELINE, METRICS, PLOTS, REPORT, strongest, table, write_report
from sim.workload import SimJob, Workload, WorkloadSettings, calibration, synthesize

TRACE_FLEET = "trace_fleet.toml"
REPORT_FILES = (METRICS, REPORT, *PLOTS)  # sim.report.write_report's
# in each policy's folder: the fleet it ran on, and the ledger (gpu-agent's policies) with
# SQLite's files beside it; a previous run's are removed first
STATE_FILES = (LEDGER, f"{LEDGER}-wal", f"{LEDGER}-shm", FLEET_COPY)
NO_RELEASE_MINUTES = 10.0**9  # an idle timeout no allocation reaches: auto-release off
# (workload, fleet, state directory, progress) -> (attempts, what else the policy reports)
CouncilChoice = Literal["fleet", "reference", "none"]
FAIRNESS_BASELINE = "slurm-cheapest"  # no project's mean slowdown should be worse than here
Runner = Callable[
    [Workload, FleetConfig, Path, Callable[[int], None]], tuple[list[Attempt], dict[str, Any]]
]


def _agent(
    auto_release: bool = True,
    judge: CouncilChoice = "fleet",
    borrow: bool = False,
    move: bool = True,
    levelling: str | None = None,
    dearer: bool = False,
) -> Runner:
    """gpu-agent's graph; `judge`, its council: the fleet file's, the reference rules, or
    none (every request approved); `borrow`: with borrowing between pools on, whatever the
    fleet file says (fleet.borrowing: supervised jobs that checkpoint carry a notice), and
    with `dearer`, loans that cost more a unit of work where they finish sooner
    ([preemption] borrow_dearer);
    `move` false: queued requests stay on the type they were first routed to, whatever the
    fleet file says ([scheduler] move_queued, on by default); `levelling`: [scheduler] policy
    "max-min" or "least-attained" (fleet.maxmin), the least served first, and those served
    more yield with notice."""

    def run(
        workload: Workload, config: FleetConfig, out: Path, progress: Callable[[int], None]
    ) -> tuple[list[Attempt], dict[str, Any]]:
        if borrow:
            lend = config.preemption.model_copy(update={"borrow": True, "borrow_dearer": dearer})
            config = config.model_copy(update={"preemption": lend})
        if not move:
            staying = config.scheduler.model_copy(update={"move_queued": False})
            config = config.model_copy(update={"scheduler": staying})
        if levelling:  # a virtual cluster is one project: its daily limit would stop it
            levelled = config.scheduler.model_copy(update={"policy": levelling})
            unlimited = config.preemption.model_copy(update={"max_per_project_per_day": 10**9})
            config = config.model_copy(update={"scheduler": levelled, "preemption": unlimited})
        if not auto_release:
            monitor = config.monitor.model_copy(update={"idle_timeout_minutes": NO_RELEASE_MINUTES})
            config = config.model_copy(update={"monitor": monitor})
        if judge == "reference":
            rules = config.council.model_copy(update={"policy": "reference"})
            config = config.model_copy(update={"council": rules})
        chosen = NoCouncil() if judge == "none" else None
        result = run_gpu_agent(workload, config, out, progress, chosen)
        council = {o.value: result.council.get(o.value, 0) for o in CouncilOutcome}
        return result.attempts, {
            "council": dict(sorted(council.items())),
            "reviews": result.reviews,
            "node_runs": dict(sorted(result.steps.items())),
        }

    return run


def _baseline(name: str) -> Runner:
    return lambda w, c, _out, p: (run_baseline(name, w, c, p), {})


def _borrowing(
    workload: Workload, config: FleetConfig, _out: Path, progress: Callable[[int], None]
) -> tuple[list[Attempt], dict[str, Any]]:
    attempts, preemptions = run_borrowing(workload, config, progress)
    return attempts, {"preemptions": preemptions}


POLICIES: dict[str, Runner] = {
    **{name: _baseline(name) for name in BASELINES},
    # slurm-cheapest with borrowing between pools, reclaimed with notice (sim/borrowing.py)
    "slurm-cheapest-borrow": _borrowing,
    "gpu-agent": _agent(),
    # the same graph with the idle release switched off: what auto-release saves
    "gpu-agent-no-autorelease": _agent(auto_release=False),
    # the same graph with the reference rules as its council, and with none: what the
    # fleet file's council adds
    "gpu-agent-rules": _agent(judge="reference"),
    "gpu-agent-no-council": _agent(judge="none"),
    # with borrowing between pools, reclaimed after the loan's notice (fleet.borrowing)
    "gpu-agent-borrow": _agent(borrow=True),
    "gpu-agent-no-council-borrow": _agent(judge="none", borrow=True),
    # queued requests stay on the type first routed to: what moving them to another type of
    # their pool that frees first saves
    "gpu-agent-no-move": _agent(move=False),
    "gpu-agent-no-council-no-move": _agent(judge="none", move=False),
    # max-min fairness over effective throughput (fleet.maxmin); and least attained service
    # per GPU
    "gpu-agent-maxmin": _agent(levelling="max-min"),
    "gpu-agent-no-council-maxmin": _agent(judge="none", levelling="max-min"),
    "gpu-agent-las": _agent(levelling="least-attained"),
    "gpu-agent-no-council-las": _agent(judge="none", levelling="least-attained"),
    # ... with borrowing between pools: loans no dearer a unit of work (fleet.routing)
    "gpu-agent-maxmin-borrow": _agent(borrow=True, levelling="max-min"),
    "gpu-agent-no-council-maxmin-borrow": _agent(judge="none", borrow=True, levelling="max-min"),
    "gpu-agent-las-borrow": _agent(borrow=True, levelling="least-attained"),
    "gpu-agent-no-council-las-borrow": _agent(
        judge="none", borrow=True, levelling="least-attained"
    ),
    # ... and loans dearer a unit where they finish sooner ([preemption] borrow_dearer)
    "gpu-agent-maxmin-borrow-dearer": _agent(borrow=True, levelling="max-min", dearer=True),
    "gpu-agent-no-council-maxmin-borrow-dearer": _agent(
        judge="none", borrow=True, levelling="max-min", dearer=True
    ),
    "gpu-agent-las-borrow-dearer": _agent(borrow=True, levelling="least-attained", dearer=True),
    "gpu-agent-no-council-las-borrow-dearer": _agent(
        judge="none", borrow=True, levelling="least-attained", dearer=True
    ),
}


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if not names or unknown:
        raise InvalidInput(
            f"unknown policy {', '.join(map(repr, unknown)) or '(none)'} "
            f"(choose from {', '.join(POLICIES)})"
        )
    if len(set(names)) != len(names):
        raise InvalidInput("a policy is named twice")
    return names


class Progress:
    """A one-line bar on `stream`, redrawn at most every `every` seconds."""

    def __init__(self, label: str, total: int, stream: TextIO, every: float = 0.5) -> None:
        self.label, self.total, self.stream, self.every = label, total, stream, every
        self.done = 0
        self.start = self._last = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self.draw()

    def draw(self, end: str = "") -> None:
        share = self.done / self.total if self.total else 1.0
        bar = "#" * round(30 * share)
        self.stream.write(
            f"\r  {self.label:<26} [{bar:<30}] {self.done:>7,}/{self.total:,} "
            f"jobs {time.perf_counter() - self.start:6.1f} s{end}"
        )
        self.stream.flush()


@dataclass
class Simulation:
    results: dict[str, dict[str, Any]]
    calibration: dict[str, float]
    meta: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    across: dict[str, Any] = field(default_factory=dict)  # floor, same_work, savings
    written: list[Path] = field(default_factory=list)


def simulate(
    trace: str | Path,
    policies: Sequence[str],
    config: FleetConfig,
    fleet_name: str,
    out: Path,
    *,
    jobs: int | None = None,
    seed: int = 0,
    schema: TraceSchema = PHILLY,
    stream: TextIO | None = None,
    fleet_text: str | None = None,
    settings: WorkloadSettings | None = None,
    vc: str | None = None,
) -> Simulation:
    """Run `policies` on the trace's jobs (with `vc`, that virtual cluster's only); the
    progress bars go to `stream` (stderr). `settings` changes the workload model (its seed
    is `seed`)."""
    stream = stream or sys.stderr
    settings = replace(settings or WorkloadSettings(), seed=seed)
    chosen = select(read_trace(trace, schema, limit=None if vc else jobs), schema, vc, jobs)
    workload = synthesize(chosen, config, settings)
    cal = calibration(workload.jobs)
    meta = {
        "trace": str(trace),
        "jobs": len(workload.jobs),
        "fleet": fleet_name,
        "fleet_gpus": sum(n.gpus for n in config.nodes),
        "vc": vc,
        "seed": seed,
        "policies": list(policies),
        "workload": _settings(settings),
    }
    with writing(out):  # a file on its path, a read-only place: one line, nothing run
        out.mkdir(parents=True, exist_ok=True)
    sim = Simulation({}, cal, meta)
    runs: dict[str, list[Attempt]] = {}
    bound = floor(workload.jobs, config)
    for name in policies:
        with writing(out):
            state = _fresh_state(out / name)
            if fleet_text is not None:
                (state / FLEET_COPY).write_text(fleet_text, encoding="utf-8")
        bar = Progress(name, len(workload.jobs), stream)
        attempts, extra = POLICIES[name](workload, config, state, bar)
        bar.draw(end="\n")
        sim.seconds[name] = time.perf_counter() - bar.start
        sim.results[name] = (
            metrics(workload.jobs, attempts, config, workload.budgets, bound) | extra
        )
        runs[name] = attempts
    sim.across = across(workload.jobs, runs, sim.results, config, bound)
    with writing(out):
        sim.written = write_report(out, sim.results, cal, meta, sim.across)
    return sim


def outputs(policies: Sequence[str]) -> tuple[list[str], list[str]]:
    """What `simulate` writes under its --out folder, relative to it: the report's files,
    written over, and each policy's state files, removed first (_fresh_state). Checked
    before the run (graph.cli_offline.writable_dir), so that a place it cannot write fails
    at once."""
    return list(REPORT_FILES), [f"{name}/{file}" for name in policies for file in STATE_FILES]


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """An OSError while writing under --out (the place changed since it was checked) as
    one line, not a traceback."""
    try:
        yield
    except OSError as e:
        raise InvalidInput(
            f"--out {out}: cannot write {e.filename or out} ({e.strerror or e})"
        ) from None


def select(
    trace: Sequence[Job], schema: TraceSchema, vc: str | None, jobs: int | None
) -> list[Job]:
    """The earliest `jobs` of the trace's jobs (all when None), of the virtual cluster `vc`
    only when given: its project name (`vc-11cb48`) or the trace's own value (`11cb48`)."""
    if vc is None:
        return list(trace[:jobs])
    names = {vc, schema.project_prefix + vc}
    kept = [j for j in trace if j.project in names]
    if not kept:
        known = sorted({j.project for j in trace})
        raise InvalidInput(f"no virtual cluster {vc!r} in the trace (it has {', '.join(known)})")
    return kept[:jobs]


def across(
    jobs: Sequence[SimJob],
    runs: Mapping[str, Sequence[Attempt]],
    results: Mapping[str, Mapping[str, Any]],
    config: FleetConfig,
    bound: Floor | None = None,
) -> dict[str, Any]:
    """What only the policies together say: the floor, the same-work comparison, and each
    policy's saving against naive and against the strongest baseline, explained."""
    bound = bound or floor(jobs, config)
    best = strongest(results)
    against = [b for b in (BASELINE, best) if b is not None and b in runs]
    return {
        "floor": {
            "unit": bound.unit,
            "usd": round(bound.usd, 2),
            "work_units": round(bound.work_units, 4),
        },
        "same_work": same_work(jobs, runs, config),
        "strongest_baseline": best,
        "worst_project_slowdown": {
            "against": FAIRNESS_BASELINE,
            "policies": {
                name: worst_project(m, results[FAIRNESS_BASELINE])
                for name, m in results.items()
                if name != FAIRNESS_BASELINE
            },
        }
        if FAIRNESS_BASELINE in results
        else None,
        "savings_usd": {
            name: {
                b: {k: round(v, 2) for k, v in savings(runs[b], attempts, config).items()}
                for b in dict.fromkeys(against)
                if b != name
            }
            for name, attempts in runs.items()
        },
    }


def _settings(s: WorkloadSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}


def _fresh_state(directory: Path) -> Path:
    """The policy's state directory, emptied of a previous run's ledger (only ours)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        (directory / name).unlink(missing_ok=True)
    return directory


def spread_line(c: Mapping[str, float], meta: Mapping[str, Any]) -> list[str]:
    """How differently the projects use what they hold, where they have habits."""
    sigma = meta["workload"].get("habit_sigma", 0.0)
    if not sigma or "project_idle_share_min" not in c:
        return []
    return [
        f"project habits (sd {sigma:g}, sim/workload.py): the projects' idle shares of what "
        f"they hold from {c['project_idle_share_min']:.1%} to {c['project_idle_share_max']:.1%}"
        f" (median {c['project_idle_share_median']:.1%}; per virtual cluster on Helios, "
        "allocation utilisation from 0.8 % to 91 %)"
    ]


def summary(sim: Simulation) -> str:
    """What the command prints: calibration, the table, where the report is."""
    c = sim.calibration
    lines = [
        f"workload: {sim.meta['jobs']:,} jobs on {sim.meta['fleet']} "
        f"({sim.meta['fleet_gpus']:,} GPUs), seed {sim.meta['seed']}",
        f"calibration: mean utilisation {c['mean_util_pct']:.1f} % (Philly: 47-52 %), "
        f"idle GPU time {c['idle_share']:.1%} (Philly: ~32 % of samples at 0 %; "
        f"under 6 h {c['idle_share_under_6h']:.1%}, over 24 h {c['idle_share_over_24h']:.1%})",
        *spread_line(c, sim.meta),
        "",
        table(sim.results, sim.across),
        "",
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sim.seconds.items()),
        f"report: {sim.written[1] if len(sim.written) > 1 else '-'}",
    ]
    return "\n".join(lines)


def fleet_source(path: str | None) -> tuple[str, str]:
    """(name, TOML text) of the fleet to simulate: the file given, or the trace fleet."""
    if path is None:
        from importlib import resources

        text = resources.files("fleet").joinpath("data", TRACE_FLEET).read_text("utf-8")
        return f"{TRACE_FLEET} (built in)", text
    try:
        return path, Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"fleet file {path}: cannot read it ({exc})") from None


def with_models(name: str, text: str, path: str) -> tuple[str, str]:
    """The fleet (name, TOML text) with the [speeds.<workload>] tables of the file at `path`
    added as data, not as text: pasted, a key above its first table would join the fleet's
    last table, and a [council] table would change the council simulated, unseen. The text
    is what each policy's state directory keeps, so that its ledger reads with them; the
    caller checks it as a fleet file (fleet.config.parse_fleet)."""
    speeds = models_speeds(path)
    own = parse_fleet(text, source=f"fleet file {name}").speeds
    twice = [w for w in speeds if w in own]
    if twice:
        raise InvalidInput(f"--models {path}: [speeds.{twice[0]}] is in the fleet file too")
    tables = "".join(_speeds_table(w, row) for w, row in speeds.items())
    merged = f"{text}\n\n# the [speeds] tables of --models {path!r}\n{tables}"
    try:  # both valid alone: only the fleet's own speeds written as one table can clash
        tomllib.loads(merged)
    except tomllib.TOMLDecodeError:
        raise InvalidInput(
            f"--models {path}: cannot add its tables to fleet file {name}, whose speeds are "
            "one inline table (`speeds = {...}`): write them as [speeds.WORKLOAD] tables"
        ) from None
    return f"{name} + {path}", merged


def models_speeds(path: str) -> dict[str, dict[str, Any]]:
    """The [speeds.<workload>] tables of a --models file; anything else in it is refused."""
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"--models {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"--models {path}: not valid TOML: {exc}") from None
    speeds: dict[str, dict[str, Any]] = data.pop("speeds", {})
    if not isinstance(speeds, dict):  # `speeds = 1`: no table
        data["speeds"] = speeds
    stray = [*data] or [f"speeds.{w}" for w, row in speeds.items() if not isinstance(row, dict)]
    if stray:
        raise InvalidInput(
            f"--models {path}: may hold only [speeds.<workload>] tables, not {stray[0]!r}"
        )
    return speeds


def _speeds_table(workload: str, row: Mapping[str, Any]) -> str:
    """One [speeds.<workload>] table as TOML text, its values as read (the fleet's model
    judges them)."""
    lines = [f"[speeds.{_quoted(workload)}]"]
    lines += [f"{_quoted(t)} = {_toml_value(v)}" for t, v in row.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    """A number or a bool as TOML writes it; anything else as a string (no speed: refused)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)  # inf and nan too: TOML writes them so
    return _quoted(str(value))


def _quoted(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\\x7f' or c < " " else c for c in text) + '"'


def as_json(sim: Simulation) -> Mapping[str, Any]:
    return {
        "meta": sim.meta,
        "calibration": sim.calibration,
        "policies": sim.results,
        **sim.across,
        "seconds": sim.seconds,
        "written": [str(p) for p in sim.written],
    }
