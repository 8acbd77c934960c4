"""How foreseeable waste is in the worlds `gpu-agent council evaluate` judges on: what a model
could reach if it knew what no record shows.

On the test slices of the evaluation worlds (council.evaluate: seeds 0-4, 120 days, 24
projects), the waste AUC of
- the habits heuristic (`oracle` in `council evaluate`): 1 - (1-hoard)(1-bursty)(1-overrun) of
  the project's true habits at the time, ignoring the request;
- a logistic regression on the true habits (hoard, bursty, overrun, padding, wrong hardware),
  the request (log hours, log GPUs, log worst case, priority, wrong hardware) and the
  products of each habit with each request feature, fitted to the known outcomes of the
  training slices of the worlds `council train --target outcome` builds (seed 0: 32 worlds of
  120 days), inverse propensity weighted as the councils learn.
No policy can read the habits: the second figure says how far above the heuristic the
request lifts a model that knew them, a rough ceiling for one that must guess them from a
project's record.

And the human band those rankings allow (issue 19's goal: at most 5 % of the auto-approved
end wasteful, at most 0.5 % of the requests good work denied, at most 10 % to a human),
with the band chosen in hindsight on each test slice itself (council.outcomes.band: the
lowest approval threshold that meets 5 %, the highest denial threshold that meets 0.5 %),
so no policy that ranks no better could send fewer to a human:
- the logistic on habits and request, against the outcome without guardrails;
- every idle tail and budget cut prevented (a guardrail no fleet has: each job's work ends
  its allocation, no budget cuts it): then only work that runs under 20 % utilisation is
  wasted (Sample.low_util), drawn per job with the chance the project's true `bursty` habit
  gives, which is also the best ranking anyone could have of it.

    .venv/bin/python benchmarks/waste_ceiling.py [--worlds 32] [--days 120]

About 4 minutes on two busy cores (the replays are most of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path

# beside benchmarks/council.py, `council` would import that file: the repository root first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from council.dataset import EXPLORE, Sample, cuts, replay, synthetic_jobs, time_split
from council.evaluate import EvalSettings, replayed
from council.outcomes import auc, band, banded, figures
from fleet.config import load_fleet


def row(s: Sample) -> list[float]:
    """The habits, the request, and each habit times each request feature."""
    h, f = s.habits, s.features
    assert h is not None
    habits = [h.hoard, h.bursty, h.overrun, h.pad, h.mismatch]
    request = [
        math.log(f.hours),
        math.log(f.count),
        math.log1p(f.worst_case_usd),
        f.priority,
        f.purpose_mismatch,
    ]
    return habits + request + [a * b for a in habits for b in request]


def hindsight(p: list[float], test: list[Sample]) -> dict[str, float | None]:
    """The figures of approving at p (a chance of no waste) with the band chosen on `test`
    itself against its own outcomes (`Sample.would_waste`): the fewest sent to a human that
    any thresholds on this ranking allow."""
    deny, approve = band(p, [s.would_waste == 1.0 for s in test], z=0.0)  # in hindsight
    return figures([banded(x, deny, approve, "hindsight") for x in p], test)


def banded_line(name: str, got: list[dict[str, float | None]]) -> str:
    """One line of the mean human share, auto-approved waste and good work denied."""

    def mean(key: str) -> str:
        values = [g[key] for g in got if g[key] is not None]
        return f"{statistics.fmean(values):.3f}" if values else "n/a"  # type: ignore[arg-type]

    return (
        f"{name}: human share {mean('human_share')}, auto-approved waste "
        f"{mean('auto_approved_waste_rate')}, good work denied {mean('good_work_denied_share')}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=32)
    ap.add_argument("--days", type=float, default=120)
    args = ap.parse_args()
    config = load_fleet(None)
    train: list[Sample] = []
    for w in range(args.worlds):
        samples = replay([(w, synthetic_jobs(w, args.days, 24))], config, 0, EXPLORE)
        if samples:
            end = cuts(samples)[0]
            train += [s for s in time_split(samples)[0] if s.outcome_at(end) is not None]
    x = torch.tensor([row(s) for s in train], dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-9)
    x = (x - mu) / sd
    y = torch.tensor([s.wasted or 0.0 for s in train], dtype=torch.float64)
    weight = torch.tensor([1 / s.propensity for s in train], dtype=torch.float64)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 1, dtype=torch.float64)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            F.binary_cross_entropy_with_logits(lin(x).squeeze(1), y, reduction="none") * weight
        ).sum() / weight.sum() + 1e-3 * lin.weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    heuristic, fitted = [], []
    fitted_band, guarded_band = [], []
    for seed in EvalSettings().seeds:
        run, samples = replayed(seed, EvalSettings(), config)
        test = time_split(samples)[2]
        waste = [s.would_waste == 1.0 for s in test]
        heuristic.append(auc([s.habit_waste for s in test], waste))
        with torch.no_grad():
            z = lin((torch.tensor([row(s) for s in test], dtype=torch.float64) - mu) / sd)
        fitted.append(auc(z.squeeze(1).tolist(), waste))
        fitted_band.append(hindsight(torch.sigmoid(-z).squeeze(1).tolist(), test))
        only_util = [
            dataclasses.replace(s, would_waste=float(s.low_util), would_waste_guarded=math.nan)
            for s in test
        ]
        bursty = [s.habits.bursty if s.habits else math.nan for s in test]
        guarded_band.append(hindsight([1 - b for b in bursty], only_util))
        print(f"world {seed}: heuristic {heuristic[-1]:.3f}, habits and request {fitted[-1]:.3f}")
        spread = run.unmanaged_util().values()
        print(
            f"  its projects would use {min(spread):.0f} % to {max(spread):.0f} % of what they "
            f"hold with no monitor, {run.unmanaged_util_all():.0f} % in all (Helios Earth's "
            "virtual clusters: 0.8 % to 91 %, 66.7 % in all)"
        )
    print(
        f"waste AUC, mean of {len(fitted)} worlds: habits heuristic "
        f"{statistics.fmean(heuristic):.3f}, logistic on habits and request "
        f"{statistics.fmean(fitted):.3f} ({len(train)} training requests)"
    )
    print("the band in hindsight on each test slice, mean of the worlds:")
    print(banded_line("  logistic on habits and request, no guardrail", fitted_band))
    prevented = "  every idle tail and budget cut prevented, true bursty habit"
    print(banded_line(prevented, guarded_band))


if __name__ == "__main__":
    main()
