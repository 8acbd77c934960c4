"""The commands that work beside the fleet rather than on it: the demo story (`demo`), the
trace-driven simulator (`simulate`), a ledger's analysis (`analyze`), the council's training
and evaluation (`council train`, `council evaluate`) and NVML recordings (`nvml record`).
Each imports what it runs when it runs (sim/, torch, pynvml)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fleet.config import load_fleet
from fleet.errors import InvalidInput
from graph.cli_common import emit, fleet_file

MAX_EXPLORE = 0.5  # council train --explore: at most half of what the rules deny runs anyway
FAMILY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")  # council evaluate --weights FAMILY=PATH
MAX_HABIT_SIGMA = 4.0  # simulate --habits: beyond, every project is all idle or never idle
MIN_DAYS = 7  # council evaluate --days: a week, so that each slice of a world holds requests


def writable_dir(
    path: Path, option: str, files: Iterable[str] = (), replaced: Iterable[str] = ()
) -> None:
    """Refuses, before any work, an output folder the command could not fill, so that it
    fails in one line rather than after the work with part of its output written: `path`, or
    a folder of `files` or `replaced` (paths relative to `path`), that exists and is no
    directory, or is a link to nothing; one of them that exists and is no regular file; one
    of `files` (written over) that cannot be written (`replaced` ones are removed first: only
    their folder counts); a folder in which no file can be made. That last is tried with a
    probe file, made and removed: os.access says yes to root, and knows nothing of read-only
    or virtual file systems (/proc)."""
    written, removed = [path / f for f in files], [path / f for f in replaced]
    targets = written + removed
    folders = dict.fromkeys([path, *(d for t in targets for d in _folders_between(path, t))])
    for folder in folders:
        if folder.is_symlink() and not folder.exists():
            raise InvalidInput(f"{option} {path}: {folder} is a link to nothing")
        if folder.exists() and not folder.is_dir():
            where = str(path) if folder == path else f"{path}: {folder}"
            raise InvalidInput(f"{option} {where} is a file, not a directory")
    for target in targets:
        if target.is_symlink() and not target.exists():
            raise InvalidInput(f"{option} {path}: {target} is a link to nothing")
        if target.exists() and not target.is_file():
            raise InvalidInput(f"{option} {path}: {target} is not a regular file")
    for target in written:
        if target.exists() and not os.access(target, os.W_OK):
            raise InvalidInput(f"{option} {path}: cannot write {target}")
    for base in dict.fromkeys(_nearest_existing(folder) for folder in folders):
        if not base.is_dir():
            raise InvalidInput(f"{option} {path}: {base} is a file, not a directory")
        _probe(base, option, path)


def _folders_between(top: Path, file: Path) -> list[Path]:
    """The folders from `top` (excluded) down to `file`'s own: those the command makes."""
    return [p for p in file.parents if p != top and top in p.parents]


def _nearest_existing(path: Path) -> Path:
    """`path` or the nearest of its parents that exists: where its folders would be made."""
    return next(p for p in (path, *path.parents) if p.exists())


def _probe(folder: Path, option: str, path: Path) -> None:
    """Makes and removes a file in `folder`, or says in one line why it cannot."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".gpu-agent-probe-", dir=folder)
    except OSError as exc:
        raise InvalidInput(
            f"{option} {path}: cannot write in {folder} ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def cmd_demo(args: argparse.Namespace) -> int:
    from graph.demo import run_demo  # loaded when it runs

    code: int = run_demo(state_dir=args.state_dir, fleet=fleet_file(args), as_json=args.json)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from council.policies import council_for
    from fleet.config import parse_fleet
    from fleet.simulated import check_simulable
    from sim.simulate import (
        as_json,
        fleet_source,
        outputs,
        parse_policies,
        simulate,
        summary,
        with_models,
    )
    from sim.workload import WorkloadSettings

    policies = parse_policies(args.policies)
    if args.jobs is not None and args.jobs < 1:
        raise InvalidInput(f"--jobs must be at least 1, not {args.jobs}")
    if not 0 <= args.habits <= MAX_HABIT_SIGMA:  # also refuses nan
        raise InvalidInput(f"--habits must be from 0 to {MAX_HABIT_SIGMA}, not {args.habits}")
    if args.workload == "pure" and args.habits:
        raise InvalidInput("--habits has no meaning with --workload pure (no job idles)")
    if not 0 <= args.run_compliance <= 1:  # also refuses nan
        raise InvalidInput(f"--run-compliance must be from 0 to 1, not {args.run_compliance}")
    if args.workload == "pure" and args.run_compliance:
        raise InvalidInput(
            "--run-compliance has no meaning with --workload pure (every job runs under "
            "`gpu-agent run`)"
        )
    name, text = fleet_source(args.fleet)
    if args.models is not None:
        name, text = with_models(name, text, args.models)
    config = parse_fleet(text, source=f"fleet file {name}")
    check_simulable(config)  # else a refusal midway, after the earlier policies' folders
    if any(p.startswith("gpu-agent") for p in policies):  # its council's weights load
        council_for(config.council)  # (ConfigError) before any folder is cleared
    if args.models is not None and not config.speeds:
        raise InvalidInput(f"--models {args.models}: no [speeds] table")
    out = Path(args.out)
    writable_dir(out, "--out", *outputs(policies))
    sim = simulate(
        args.trace,
        policies,
        config,
        name,
        out,
        jobs=args.jobs,
        seed=args.seed,
        fleet_text=text,
        settings=WorkloadSettings(
            habit_sigma=args.habits,
            pure=args.workload == "pure",
            models=args.models is not None,
            run_compliance=args.run_compliance,
        ),
        vc=args.vc,
    )
    if args.json:
        print(json.dumps(as_json(sim)))
    else:
        print(summary(sim))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from sim.analysis import run_analyze  # like demo: only the CLI reaches into sim/
    from sim.analysis.plots import PLOTS

    option = "--out" if args.out else "plots folder (--out's default)"
    code: int = run_analyze(
        state_dir=args.state_dir,
        fleet=args.fleet,
        since=args.since,
        until=args.until,
        out=args.out,
        plots=not args.no_plots,
        as_json=args.json,
        check_plots=lambda folder: writable_dir(folder, option, PLOTS.values()),
    )
    return code


# what one `council train` may ask for: the defaults are 32 worlds and 4,000 steps; more than
# this is a typo (a 10**23-step run was accepted and never ended), not a bigger run
MAX_WORLDS = 1000
MAX_STEPS = 1_000_000


def cmd_council(args: argparse.Namespace) -> int:
    if args.council_command == "evaluate":
        return council_evaluate(args)
    from council.train import DEFAULTS, OUTPUTS, TrainSettings, train

    if not 0 <= args.seed < 900:  # training worlds are seed * 1000 + w; evaluation's 900000+
        raise InvalidInput("--seed must be from 0 to 899 (evaluation worlds use the rest)")
    default = DEFAULTS[args.target]
    worlds = default["worlds"] if args.worlds is None else args.worlds
    days = default["world_days"] if args.days is None else args.days
    steps = default["steps"] if args.steps is None else args.steps
    if not (3 <= worlds <= MAX_WORLDS and 1 <= steps <= MAX_STEPS and args.trace_jobs >= 1):
        raise InvalidInput(
            f"--worlds must be from 3 to {MAX_WORLDS}, --steps from 1 to {MAX_STEPS:,}, "
            "--trace-jobs at least 1"
        )
    if not MIN_DAYS <= days <= 3650:
        raise InvalidInput(f"--days must be from {MIN_DAYS} to 3650, not {days:g}")
    if args.explore is not None and args.target != "outcome":
        raise InvalidInput("--explore applies to --target outcome only")
    explore = TrainSettings.explore if args.explore is None else args.explore
    if not 0 < explore <= MAX_EXPLORE:
        raise InvalidInput(f"--explore must be above 0 and at most {MAX_EXPLORE}, not {explore}")
    if args.target == "outcome" and args.trace:
        raise InvalidInput("--target outcome trains on synthetic worlds only (no --trace yet)")
    out = Path(args.out)
    writable_dir(out, "--out", OUTPUTS)
    settings = TrainSettings(
        seed=args.seed,
        worlds=worlds,
        world_days=days,
        steps=steps,
        trace=Path(args.trace) if args.trace else None,
        trace_jobs=args.trace_jobs,
        ablations=not args.no_ablations,
        target=args.target,
        explore=explore,
        core=args.core,
        time=args.time,
    )
    log = (lambda _: None) if args.json else print
    metrics = train(settings, load_fleet(fleet_file(args)), out, log)
    t = metrics["test"]
    assert isinstance(t, dict)
    quality = (
        f"test waste AUC {'-' if t['waste_auc'] is None else format(t['waste_auc'], '.3f')}, "
        f"{t['human_share']:.1%} to a human"
        if args.target == "outcome"
        else f"test accuracy {t['accuracy']:.4f}"
    )
    emit(
        args,
        metrics,
        f"wrote {args.out}/council.pt: {quality}, ECE {t['ece']:.4f}, "
        f"{t['monotonicity']['violations']} monotonicity violations "
        f"({metrics['seconds']} s); see {args.out}/MODEL_CARD.md",
    )
    return 0


def family_and_path(entry: str) -> tuple[str | None, str]:
    """`--weights [FAMILY=]PATH`: the family a council belongs to (councils trained alike
    but for their seed, pooled in the report), if named, and its weights file."""
    family, sep, path = entry.partition("=")
    if not sep or not FAMILY.fullmatch(family):
        return None, entry
    if not path:
        raise InvalidInput(f"--weights {entry}: name a weights file after the '='")
    return family, path


def council_evaluate(args: argparse.Namespace) -> int:
    """`council evaluate`: every council named (both shipped ones by default) beside the
    baselines, on the test slices of fresh worlds (council.evaluate)."""
    from council.evaluate import (
        EvalSettings,
        Policy,
        baselines,
        check_family,
        evaluate,
        fixed,
        report,
    )
    from council.neural_council import SHIPPED_NAMES, NeuralCouncil
    from council.spec import NetSpec

    try:
        seeds = tuple(int(x) for x in args.seeds.split(","))
    except ValueError:
        raise InvalidInput(
            f"--seeds must be whole numbers, comma-separated: {args.seeds!r}"
        ) from None
    if not all(0 <= seed < 100_000 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise InvalidInput("--seeds must be distinct whole numbers from 0 to 99999")
    if not MIN_DAYS <= args.days <= 3650 or not 2 <= args.projects <= 1000:
        raise InvalidInput(
            f"--days must be from {MIN_DAYS} to 3650 (each slice needs requests), "
            "--projects from 2 to 1000"
        )
    card = _card_beside(args)
    config = load_fleet(fleet_file(args))
    policies: dict[str, Policy] = {}
    groups: dict[str, dict[str, int | None]] = {}
    specs: dict[str, dict[str, NetSpec]] = {}
    # by default every shipped council: trained to the rules, and those named (on outcomes)
    for family, path in map(family_and_path, args.weights or ["", *SHIPPED_NAMES]):
        name = f"cfc-council-{path}" if path in SHIPPED_NAMES else path or "cfc-council"
        if name in policies:
            raise InvalidInput(f"--weights names {name} twice")
        council = NeuralCouncil.load(path or None)
        policies[name] = fixed(council.decide)
        if family:
            groups.setdefault(family, {})[name] = council.model.spec.seed
            specs.setdefault(family, {})[name] = council.model.spec
    for family, members in specs.items():
        check_family(family, members)
    policies |= baselines()
    settings = EvalSettings(seeds=seeds, days=args.days, projects=args.projects)
    result = evaluate(policies, config, settings, (lambda _: None) if args.json else print, groups)
    if card is not None:
        from council.card import evaluation_section, with_section
        from council.evaluate import figure_rows

        fleet = Path(args.fleet).name if args.fleet else None
        section = evaluation_section(result, figure_rows(result), fleet)
        card.write_text(with_section(card.read_text("utf-8"), section), "utf-8")
    emit(args, result, report(result))
    return 0


def _card_beside(args: argparse.Namespace) -> Path | None:
    """`--card`: the model card beside the one council evaluated, checked before the run."""
    if not args.card:
        return None
    from council.neural_council import SHIPPED_NAMES

    if not args.weights or len(args.weights) != 1 or family_and_path(args.weights[0])[0]:
        raise InvalidInput("--card needs exactly one --weights, without a FAMILY")
    card = Path(SHIPPED_NAMES.get(args.weights[0], args.weights[0])).parent / "MODEL_CARD.md"
    if not card.is_file() or not os.access(card, os.W_OK):
        raise InvalidInput(f"--card: no model card to write beside the weights ({card})")
    return card


def cmd_nvml(args: argparse.Namespace) -> int:
    from fleet.nvml.reader import NvmlSession
    from fleet.nvml.record import check_options, record, write

    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidInput(f"cannot write {out}: {out.parent} is not a directory")
    if out.is_dir():
        raise InvalidInput(f"cannot write {out}: it is a directory (--out names the file to write)")
    check_options(args.seconds, args.period)
    recording = record(
        NvmlSession(timed=True), seconds=args.seconds, period=args.period, phase=args.phase
    )
    write(recording, out)
    print(f"{out}: {recording['device_count']} GPU(s), {len(recording['samples'])} samples")
    return 0
