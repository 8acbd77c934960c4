"""`gpu-agent council evaluate`: how a council's decisions compare with what the requests
went on to do.

Each seed is a simulated world the shipped council never trained on (council.dataset: projects
with habits that differ and change, their jobs on the simulated fleet under the real monitor).
Its voted requests are split by time, never at random: the first 60 % of the world's span is
for training, the next 10 % for choosing thresholds, and the figures come from the last 30 %.
A request's outcome is whether it would end wasteful (released for idling, cut by its budget,
or under 20 % utilisation: council.dataset.WASTE_UTIL_PCT), known here for denied requests
too because the world is simulated; a real ledger knows it only for those that ran.

Per policy (the councils of weights files, the reference rules, a logistic regression that
learns from outcomes, a heuristic that reads the projects' true habits, and approving every
request), on the test slice:
  waste_auc                 how well 1 - p(approve) ranks wasteful requests above the rest
  ece                       expected calibration error of p(approve) against "not wasteful"
  auto_approved_waste_rate  the share of approved requests that end wasteful
  human_share               the share of voted requests sent to a human
  good_work_denied_share    the share of voted requests denied that would not have been wasted
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from council.dataset import (
    EPOCH,
    EXPLORE,
    THRESHOLDS,
    TRAIN,
    Sample,
    World,
    synthetic_jobs,
    time_split,
)
from council.features import RequestFeatures
from council.outcomes import BAND_CEILING, BAND_FLOOR, FIGURES, band, banded, figures
from fleet.config import CouncilSettings, FleetConfig
from fleet.models import CouncilDecision, CouncilOutcome

WORLD_OFFSET = 900_000  # evaluation worlds' seeds: far from training's seed * 1000 + world


Decide = Callable[[RequestFeatures, CouncilSettings], CouncilDecision]
# decisions on the test slice, given the training and threshold slices before it
Policy = Callable[
    [list[Sample], list[Sample], list[Sample], CouncilSettings], list[CouncilDecision]
]


@dataclass(frozen=True)
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    days: float = 120
    projects: int = 24


def world(seed: int, settings: EvalSettings, config: FleetConfig) -> list[Sample]:
    """The voted requests of evaluation world `seed`, in time order, with the exploration
    that lets a model learn from outcomes where the rules deny (council.dataset.EXPLORE)."""
    w = WORLD_OFFSET + seed
    jobs = synthetic_jobs(w, settings.days, settings.projects)
    return World(jobs, config, w, w, EXPLORE).run()


def observed(samples: list[Sample]) -> tuple[list[Sample], list[float]]:
    """What a real ledger knows of `samples`: those that ran, each with its inverse
    propensity weight. The slices a policy learns from are read only through this; the
    outcomes of requests that did not run are for the test figures alone."""
    ran = [s for s in samples if s.wasted is not None]
    return ran, [1.0 / s.propensity for s in ran]


def fixed(decide: Decide) -> Policy:
    """A policy that learns nothing from the slices before the test: a council's `decide`."""

    def policy(
        train: list[Sample], val: list[Sample], test: list[Sample], settings: CouncilSettings
    ) -> list[CouncilDecision]:
        return [decide(s.features, settings) for s in test]

    return policy


def outcome_logistic(
    train: list[Sample], val: list[Sample], test: list[Sample], settings: CouncilSettings
) -> list[CouncilDecision]:
    """A logistic regression on the summary features (council.train.summary_features),
    fitted to the outcomes of the training slice's requests that ran (inverse propensity
    weighted, as `council train --target outcome` learns), its band chosen the same way on
    the threshold slice: the simplest model that learns from what happened, which the
    council must beat."""
    import torch
    import torch.nn.functional as F

    from council.train import Split, summary_features

    (ran, weight), (val_ran, val_weight) = observed(train), observed(val)
    if not ran or not test:  # nothing to learn from: every request to a human
        return [banded(0.5, BAND_FLOOR, BAND_CEILING, "outcome-logistic") for _ in test]
    xs = [summary_features(Split.of(part)) for part in (ran, val_ran, test)]
    mu, sd = xs[0].mean(0), xs[0].std(0).clamp_min(1e-6)
    xs = [(x - mu) / sd for x in xs]
    good = torch.tensor([1.0 - float(s.wasted or 0.0) for s in ran])
    w = torch.tensor(weight)
    torch.manual_seed(0)
    lin = torch.nn.Linear(xs[0].shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lin(xs[0]).squeeze(1), good, w)
        loss = loss + 1e-3 * lin.weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        pv, pt = (torch.sigmoid(lin(x).squeeze(1)).tolist() for x in xs[1:])
    deny, approve = band(pv, [s.wasted == 1.0 for s in val_ran], val_weight)
    return [banded(x, deny, approve, "outcome-logistic") for x in pt]


def oracle(
    train: list[Sample], val: list[Sample], test: list[Sample], settings: CouncilSettings
) -> list[CouncilDecision]:
    """Not a policy anyone can run: it reads each project's true habits (how often its jobs
    hoard, burst or overrun), which the world draws and no record shows, scored as
    1 - (1-hoard)(1-bursty)(1-overrun): a reference point for how foreseeable waste is in
    these worlds, not a bound (it ignores the request itself). Its band is chosen like a
    learned model's."""
    ran, weight = observed(val)
    deny, approve = band([1 - s.habit_waste for s in ran], [s.wasted == 1.0 for s in ran], weight)
    return [banded(1 - s.habit_waste, deny, approve, "oracle") for s in test]


def approve_all(features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
    """The baseline with no council: every request approved."""
    return CouncilDecision(
        outcome=CouncilOutcome.APPROVED,
        probability=1.0,
        votes=[],
        quorum=settings.quorum,
        policy="none",
        summary="approved: no council",
    )


def evaluate(
    policies: dict[str, Policy],
    config: FleetConfig,
    settings: EvalSettings,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, object]:
    """Every policy on the test slice of every seed's world; per policy the figures per seed,
    their mean and standard deviation. The first policy's means are also the top-level
    figures."""
    runs: dict[str, list[dict[str, float | None]]] = {name: [] for name in policies}
    slices = []
    for seed in settings.seeds:
        train, val, test = time_split(world(seed, settings, config))
        slices.append(
            {"seed": seed, "train": len(train), "validation": len(val), "test": len(test)}
        )
        log(f"world {seed}: {len(train)} / {len(val)} / {len(test)} voted requests")
        for name, policy in policies.items():
            runs[name].append(figures(policy(train, val, test, config.council), test))
    families = {}
    for name, per_seed in runs.items():
        family: dict[str, object] = {"per_seed": per_seed}
        for key in (*FIGURES, "waste_rate"):
            values = [v for r in per_seed if (v := r[key]) is not None]
            family[f"{key}_mean"] = statistics.fmean(values) if values else None
            family[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        families[name] = family
    first = families[next(iter(policies))]
    return {
        **{key: first[f"{key}_mean"] for key in FIGURES},
        "policy": next(iter(policies)),
        "seeds": list(settings.seeds),
        "world": {"days": settings.days, "projects": settings.projects, "epoch": EPOCH},
        "split": {
            "train": TRAIN,
            "thresholds": round(THRESHOLDS - TRAIN, 2),
            "test": 1 - THRESHOLDS,
        },
        "slices": slices,
        "families": families,
    }


def report(result: dict[str, object]) -> str:
    """The figures as a table: per policy, each figure's mean ± sd over the seeds."""
    families = result["families"]
    assert isinstance(families, dict)
    head = ["policy", *FIGURES]
    rows = [head]
    for name, family in families.items():
        cells = [name]
        for key in FIGURES:
            mean, sd = family[f"{key}_mean"], family[f"{key}_sd"]
            cells.append("-" if mean is None else f"{mean:.3f} ± {sd:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    seeds = result["seeds"]
    first = next(iter(families.values()))
    assert isinstance(seeds, list) and isinstance(first, dict)
    rate = first["waste_rate_mean"]
    return "\n".join(
        [
            *lines,
            f"on the last 30 % of {len(seeds)} world(s) (seeds {', '.join(map(str, seeds))}),"
            + ("" if rate is None else f" where {rate:.1%} of the voted requests end wasteful")
            + "; mean ± sd over the seeds",
        ]
    )
