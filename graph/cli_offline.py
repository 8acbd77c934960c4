"""The commands that work beside the fleet rather than on it: the demo story (`demo`), the
trace-driven simulator (`simulate`), a ledger's analysis (`analyze`), the council's training
(`council train`) and NVML recordings (`nvml record`). Each imports what it runs when it runs
(sim/, torch, pynvml)."""

from __future__ import annotations

import argparse
import json

from fleet.config import load_fleet
from fleet.errors import InvalidInput
from graph.cli_common import _emit, _fleet_file


def cmd_demo(args: argparse.Namespace) -> int:
    from graph.demo import run_demo  # loaded when it runs

    code: int = run_demo(state_dir=args.state_dir, fleet=_fleet_file(args), as_json=args.json)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleet.config import parse_fleet
    from sim.simulate import as_json, fleet_source, parse_policies, simulate, summary

    policies = parse_policies(args.policies)
    if args.jobs is not None and args.jobs < 1:
        raise InvalidInput(f"--jobs must be at least 1, not {args.jobs}")
    name, text = fleet_source(args.fleet)
    sim = simulate(
        args.trace,
        policies,
        parse_fleet(text, source=f"fleet file {name}"),
        name,
        Path(args.out),
        jobs=args.jobs,
        seed=args.seed,
        fleet_text=text,
    )
    if args.json:
        print(json.dumps(as_json(sim)))
    else:
        print(summary(sim))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from sim.analysis import run_analyze  # like demo: only the CLI reaches into sim/

    code: int = run_analyze(
        state_dir=args.state_dir,
        fleet=args.fleet,
        since=args.since,
        until=args.until,
        out=args.out,
        plots=not args.no_plots,
        as_json=args.json,
    )
    return code


def cmd_council(args: argparse.Namespace) -> int:
    from pathlib import Path

    from council.train import TrainSettings, train

    if args.worlds < 3 or args.steps < 1 or args.trace_jobs < 1:
        raise InvalidInput("--worlds must be at least 3, --steps and --trace-jobs at least 1")
    settings = TrainSettings(
        seed=args.seed,
        worlds=args.worlds,
        steps=args.steps,
        trace=Path(args.trace) if args.trace else None,
        trace_jobs=args.trace_jobs,
        ablations=not args.no_ablations,
    )
    log = (lambda _: None) if args.json else print
    metrics = train(settings, load_fleet(_fleet_file(args)), Path(args.out), log)
    t = metrics["test"]
    assert isinstance(t, dict)
    _emit(
        args,
        metrics,
        f"wrote {args.out}/council.pt: test accuracy {t['accuracy']:.4f}, "
        f"ECE {t['ece']:.4f}, {t['monotonicity']['violations']} monotonicity violations "
        f"({metrics['seconds']} s); see {args.out}/MODEL_CARD.md",
    )
    return 0


def cmd_nvml(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleet.nvml.reader import NvmlSession
    from fleet.nvml.record import record, write

    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidInput(f"cannot write {out}: {out.parent} is not a directory")
    recording = record(
        NvmlSession(timed=True), seconds=args.seconds, period=args.period, phase=args.phase
    )
    write(recording, out)
    print(f"{out}: {recording['device_count']} GPU(s), {len(recording['samples'])} samples")
    return 0
