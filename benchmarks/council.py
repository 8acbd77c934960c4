"""Latency of the shipped neural council on this CPU: one decision, and 1,024 in one batch,
on an idle machine and then while other processes keep every core busy.

- one decision: `NeuralCouncil.decide` for a request whose project has 32 past events, all
  members voting with their reasons (the occlusion variants run in the same batched pass), on
  the numpy forward a request runs (council/inference.py);
- one bare forward of the torch model: `probabilities([f])`, encoding included, no reasons;
- 1,024 requests in one batch with varied histories (0 to 32 events): `probabilities(batch)`
  with encoding, and the forward alone on the encoded batch.

`probabilities` runs on `--threads` torch threads (default 1, its default): torch's own pool
spins against the other processes of a busy machine. With `--busy` (the default) the same
figures are measured again while one spinning process per core runs (the benchmark starts
them, says so, and stops them). Inputs are built deterministically (random.Random(0)).

    .venv/bin/python benchmarks/council.py [--repeats 300] [--batch-runs 7] [--threads 1]
                                           [--no-busy]

The last line holds the figures: single_p50_ms (decide) and batch1024_ms (with encoding),
idle and busy.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This file is council.py: run as a script, its folder comes first on sys.path and `council`
# would import this file; the repository root, put before it, makes it the package again.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from council.encoding import encode
from council.features import RequestFeatures
from council.neural_council import NeuralCouncil, torch_threads
from council.record import PastJob, rates
from fleet.config import CouncilSettings
from fleet.models import ReleaseReason

NOW = 1_767_225_600.0  # 2026-01-01 00:00 UTC
DAY = 86_400.0
HISTORY = 32  # past events of the single request: CouncilSettings().history_events
BATCH = 1024
GOAL_SINGLE_MS = 3.0
GOAL_BATCH_MS = 100.0
REASONS = (
    ReleaseReason.EXPLICIT,
    ReleaseReason.EXPLICIT,
    ReleaseReason.LEASE_EXPIRED,
    ReleaseReason.IDLE,
    ReleaseReason.BUDGET,
)


def history(rng: random.Random, n: int) -> tuple[PastJob, ...]:
    """n finished jobs, oldest first, ending at irregular gaps before NOW."""
    ends, t = [], NOW
    for _ in range(n):
        t -= rng.uniform(0.05, 5.0) * DAY
        ends.append(t)
    ends.reverse()
    jobs = []
    for end in ends:
        count, hours = rng.choice((1, 2, 4, 8)), rng.uniform(0.5, 48.0)
        jobs.append(
            PastJob(
                ended_at=end,
                count=count,
                hours=hours,
                cost_usd=count * hours * 5.12,
                util_pct=None if rng.random() < 0.1 else rng.uniform(0.0, 100.0),
                reason=rng.choice(REASONS),
                fleet_busy=rng.random(),
            )
        )
    return tuple(jobs)


def features(rng: random.Random, n_past: int) -> RequestFeatures:
    past = history(rng, n_past)
    r = rates(past, None, NOW, 7.0, 4.0)
    count, hours = rng.choice((1, 2, 4, 8, 16)), rng.uniform(1.0, 72.0)
    return RequestFeatures(
        count=count,
        hours=hours,
        priority=rng.choice((0.25, 0.5, 0.75, 1.0)),
        worst_case_usd=count * hours * 5.12,
        cost_pressure=rng.uniform(0.0, 3.0),
        budgeted=rng.random() < 0.7,
        usage_share=rng.random(),
        fair_share=rng.random(),
        pool_share=count / 24,
        pool_busy=rng.random(),
        hoarding_rate=r.hoarding,
        overrun_rate=r.overrun,
        recent_util=r.util,
        history_len=len(past),
        purpose_mismatch=float(rng.random() < 0.1),
        past=past,
        older=None,
        now=NOW,
    )


def timings_ms(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def measure(
    council: NeuralCouncil,
    one: RequestFeatures,
    batch: list[RequestFeatures],
    args: argparse.Namespace,
) -> tuple[float, float]:
    """Prints the figures; returns (single decision p50 ms, batch ms with encoding)."""
    settings = CouncilSettings()
    decide = timings_ms(lambda: council.decide(one, settings), args.repeats, warmup=30)
    single_p50 = statistics.median(decide)
    print(
        f"  decide(), {HISTORY} past events, {len(council.members)} members with reasons: "
        f"p50 {single_p50:.2f} ms, p99 {p99(decide):.2f} ms ({args.repeats} runs)"
    )
    bare = timings_ms(lambda: council.probabilities([one], args.threads), args.repeats, warmup=30)
    print(
        f"  probabilities([f]), encoding included, no reasons: "
        f"p50 {statistics.median(bare):.2f} ms, p99 {p99(bare):.2f} ms"
    )
    full = timings_ms(lambda: council.probabilities(batch, args.threads), args.batch_runs, warmup=1)
    batch_ms = statistics.median(full)
    enc = encode(batch)
    with torch_threads(args.threads), torch.inference_mode():
        forward = timings_ms(lambda: council.member_logits(enc), args.batch_runs, warmup=1)
    steps, real = int(enc.free.shape[1]), int(enc.mask.sum())
    print(
        f"  {BATCH} requests in one batch ({steps} steps after padding, {real} of "
        f"{BATCH * steps} real), median of "
        f"{args.batch_runs}: {batch_ms:.1f} ms with encoding "
        f"({1e3 * batch_ms / BATCH:.1f} us per request), forward only "
        f"{statistics.median(forward):.1f} ms"
    )
    return single_p50, batch_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="single-request timings")
    parser.add_argument("--batch-runs", type=int, default=7, help="timings of the batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the batch")
    parser.add_argument(
        "--no-busy", dest="busy", action="store_false", help="skip the busy-machine run"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores, load average {os.getloadavg()[0]:.2f}")
    council = NeuralCouncil.load()
    rng = random.Random(0)
    one = features(rng, HISTORY)
    batch = [features(rng, rng.randint(0, HISTORY)) for _ in range(BATCH)]
    print(
        f"{council.name}: {len(council.members)} members, torch {torch.__version__}, "
        f"{args.threads} torch thread(s) for the batch"
    )
    print("idle (nothing else started by this benchmark):")
    figures = {"": measure(council, one, batch, args)}
    if args.busy:
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)
        ]
        try:
            time.sleep(1.0)  # let them take the cores
            print(f"busy: {cores} processes spinning, one per core (started by this benchmark):")
            figures["busy_"] = measure(council, one, batch, args)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for label, (single, batch_ms) in figures.items():
        print(
            f"goals{' (busy)' if label else ''}: single p50 < {GOAL_SINGLE_MS:g} ms: "
            f"{verdict(single < GOAL_SINGLE_MS)}; batch of {BATCH} < {GOAL_BATCH_MS:g} ms: "
            f"{verdict(batch_ms < GOAL_BATCH_MS)}"
        )
    print(
        " ".join(
            f"{label}single_p50_ms={single:.2f} {label}batch1024_ms={batch_ms:.1f}"
            for label, (single, batch_ms) in figures.items()
        )
    )


if __name__ == "__main__":
    main()
