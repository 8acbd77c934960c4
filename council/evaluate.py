"""`gpu-agent council evaluate`: how a council's decisions compare with what the requests
went on to do.

Each seed is a simulated world the shipped council never trained on (council.dataset: projects
with habits that differ and change, their jobs on the simulated fleet under the real monitor).
Its voted requests are split by time, never at random: the first 60 % of the world's span is
for training, the next 10 % for choosing thresholds, and the figures come from the last 30 %.
A request's outcome is whether it would end wasteful (council.dataset.wasteful: its work lost
to an idle release or a budget cut, a tenth of its hours or more held idle with no work left,
or under 20 % utilisation), and, where it was approved with guardrails, whether it would
under them (the same job on the same draws, with the stricter idle release); known here for
denied requests too because the world is simulated; a real ledger knows it only for those
that ran, and only once they ended: what a policy learns from a slice is what was known at its end.

Per policy (the councils of weights files, the reference rules, a logistic regression that
learns from outcomes, a heuristic that reads the projects' true habits, and approving every
request), on the test slice:
  waste_auc                 how well 1 - p(approve) ranks wasteful requests above the rest
  ece                       expected calibration error of p(approve) against "not wasteful"
  auto_approved_waste_rate  the share of approved requests that end wasteful
  human_share               the share of voted requests sent to a human
  good_work_denied_share    the share of voted requests denied that would not have been wasted
and, beside them in the JSON, approved_waste_rate (plain approvals alone), guarded_share
(approved with guardrails, where the fleet file opts in: `guard_share`), waste_rate and
guarded_waste_rate (every voted request, without guardrails and with them), and
waste_auc_changed: the waste AUC on the requests made within 30 days after their project's
habits changed (the habit-change test: where an old record misleads, time should matter).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from council.dataset import (
    EPOCH,
    EXPLORE,
    THRESHOLDS,
    TRAIN,
    Sample,
    World,
    cuts,
    known,
    synthetic_jobs,
    time_split,
)
from council.features import RequestFeatures
from council.outcomes import (
    BAND_CEILING,
    BAND_FLOOR,
    DETAILS,
    FIGURES,
    band,
    banded,
    ess,
    figures,
)
from council.spec import NetSpec
from fleet.config import CouncilSettings, FleetConfig
from fleet.errors import InvalidInput
from fleet.models import CouncilDecision

WORLD_OFFSET = 900_000  # evaluation worlds' seeds: far from training's seed * 1000 + world
SLICE_COLUMNS = ("requests", "ran", "known", "explored", "ess")  # learned_from's


Decide = Callable[[RequestFeatures, CouncilSettings], CouncilDecision]
# decisions on the test slice, given what a ledger knows of the training and threshold slices
# at their ends (council.dataset.known: the requests that ran and had ended by then)
Policy = Callable[
    [list[Sample], list[Sample], list[Sample], CouncilSettings], list[CouncilDecision]
]


@dataclass(frozen=True)
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    days: float = 120
    projects: int = 24


@dataclass(frozen=True)
class Slices:
    """A world's voted requests split by time, and when the first two slices end."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    train_end: float
    val_end: float


def world(seed: int, settings: EvalSettings, config: FleetConfig) -> list[Sample]:
    """The voted requests of evaluation world `seed`, in time order, with the exploration
    that lets a model learn from outcomes where the rules deny (council.dataset.EXPLORE)."""
    return replayed(seed, settings, config)[1]


def replayed(seed: int, settings: EvalSettings, config: FleetConfig) -> tuple[World, list[Sample]]:
    """Evaluation world `seed` after its replay (what its projects did: the calibration,
    council.dataset.World.unmanaged_util), and its voted requests."""
    w = WORLD_OFFSET + seed
    replay = World(synthetic_jobs(w, settings.days, settings.projects), config, w, w, EXPLORE)
    return replay, replay.run()


def ipw(samples: list[Sample]) -> list[float]:
    """Each request's inverse propensity weight: 1 / the chance it had to run."""
    return [1.0 / s.propensity for s in samples]


def learned_from(samples: list[Sample], cut: float) -> dict[str, int | float | None]:
    """What a slice ending at `cut` offers to learn from: its voted requests, those that
    ran, those of them known by the cut (ended; the rest are still running), how many of
    these the rules denied and exploration ran, and the Kish effective sample size of their
    inverse propensity weights (council.outcomes.ess), which the band rests on."""
    ran = sum(s.wasted is not None for s in samples)
    seen = known(samples, cut)
    size = ess(ipw(seen))
    return {
        "requests": len(samples),
        "ran": ran,
        "known": len(seen),
        "explored": sum(s.propensity < 1 for s in seen),
        "ess": None if size is None else round(size, 1),
    }


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
    fitted to the known outcomes of the training slice (inverse propensity weighted, as
    `council train --target outcome` learns), its band chosen the same way on the threshold
    slice: the simplest model that learns from what happened, which the council must
    beat."""
    import torch
    import torch.nn.functional as F

    from council.train import Split, summary_features

    if not train or not test:  # nothing to learn from: every request to a human
        return [banded(0.5, BAND_FLOOR, BAND_CEILING, "outcome-logistic") for _ in test]
    xs = [summary_features(Split.of(part)) for part in (train, val, test)]
    mu, sd = xs[0].mean(0), xs[0].std(0).clamp_min(1e-6)
    xs = [(x - mu) / sd for x in xs]
    good = torch.tensor([1.0 - float(s.wasted or 0.0) for s in train])
    w = torch.tensor(ipw(train))
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
    deny, approve = band(pv, [s.wasted == 1.0 for s in val], ipw(val))
    return [
        banded(x, deny, approve, "outcome-logistic", settings.guard_share, settings.auto_deny)
        for x in pt
    ]


def oracle(
    train: list[Sample], val: list[Sample], test: list[Sample], settings: CouncilSettings
) -> list[CouncilDecision]:
    """Not a policy anyone can run: it reads each project's true habits (how often its jobs
    hoard, burst or overrun), which the world draws and no record shows, scored as
    1 - (1-hoard)(1-bursty)(1-overrun): a reference point for how foreseeable waste is in
    these worlds, not a bound (it ignores the request itself). Its band is chosen like a
    learned model's."""
    deny, approve = band([1 - s.habit_waste for s in val], [s.wasted == 1.0 for s in val], ipw(val))
    share, auto = settings.guard_share, settings.auto_deny
    return [banded(1 - s.habit_waste, deny, approve, "oracle", share, auto) for s in test]


def baselines() -> dict[str, Policy]:
    """What every council is compared with: the rules, a logistic regression that learns
    from each world's outcomes, the habits heuristic, and approving everything."""
    from council.policies import approve_all
    from council.rules import ReferenceCouncil

    return {
        "reference-rules": fixed(ReferenceCouncil().decide),
        "outcome-logistic": outcome_logistic,
        "oracle": oracle,
        "approve-all": fixed(approve_all),
    }


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """The mean, sample standard deviation and number of the values that are not None (a
    seed with nothing to measure has None): the sd is None below two values, the mean below
    one."""
    got = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(got) if got else None,
        "sd": statistics.stdev(got) if len(got) > 1 else None,
        "n": len(got),
    }


def split_world(seed: int, settings: EvalSettings, config: FleetConfig) -> Slices:
    """World `seed`'s training, threshold and test slices and the ends of the first two;
    refused where a slice holds no voted request (too short a span, too few projects)."""
    samples = world(seed, settings, config)
    parts = time_split(samples)
    for name, part in zip(("training", "threshold", "test"), parts, strict=True):
        if not part:
            raise InvalidInput(
                f"world {seed} has no voted request in its {name} slice: "
                "give it more days or more projects"
            )
    return Slices(*parts, *cuts(samples))


def check_family(family: str, specs: Mapping[str, NetSpec]) -> None:
    """InvalidInput unless the councils named `family` differ only in their training seed,
    each its own: else the spread pooled() reports is not the one between training seeds."""
    first, *rest = specs.items()
    for name, spec in rest:
        if dataclasses.replace(spec, seed=0) != dataclasses.replace(first[1], seed=0):
            raise InvalidInput(
                f"--weights {family}=: {name} is not trained as {first[0]} is (a family's "
                "councils differ only in their training seed)"
            )
    seeds = [spec.seed for spec in specs.values()]
    if len(set(seeds)) != len(seeds):
        raise InvalidInput(
            f"--weights {family}=: two councils trained with the same seed "
            f"({', '.join(map(str, seeds))}); a family's come from different seeds"
        )


def pooled(
    members: Mapping[str, dict[str, object]], seeds: Mapping[str, int | None]
) -> dict[str, object]:
    """A family of councils that differ only in their training seed: per figure the mean,
    sample sd and number over the councils of each one's mean over the worlds, so that the
    sd is the spread between training seeds (each council's spread between worlds stays in
    its entry of `per_training_seed`)."""
    family: dict[str, object] = {
        "training_seeds": [seeds[name] for name in members],
        "per_training_seed": [
            {"weights": name, "training_seed": seeds[name], **got} for name, got in members.items()
        ],
    }
    means = [{key: got[f"{key}_mean"] for key in (*FIGURES, *DETAILS)} for got in members.values()]
    return family | spreads(means)


def spreads(rows: Sequence[Mapping[str, object]]) -> dict[str, float | int | None]:
    """Each figure's spread (mean, sd, n) over `rows`, as `<figure>_mean`, `_sd`, `_n`."""
    out: dict[str, float | int | None] = {}
    for key in (*FIGURES, *DETAILS):
        values = [r[key] for r in rows]
        got = spread([v if isinstance(v, float | int) else None for v in values])
        out |= {f"{key}_{part}": value for part, value in got.items()}
    return out


def grouped(
    families: dict[str, dict[str, object]], groups: Mapping[str, Mapping[str, int | None]]
) -> dict[str, dict[str, object]]:
    """The policies' figures with each group's pooled in place of its members', where its
    first member stood."""
    group_of = {name: group for group, members in groups.items() for name in members}
    out: dict[str, dict[str, object]] = {}
    for name, got in families.items():
        group = group_of.get(name)
        if group is None:
            out[name] = got
        elif group not in out:
            members = groups[group]
            out[group] = pooled({m: families[m] for m in members}, members)
    return out


def evaluate(
    policies: dict[str, Policy],
    config: FleetConfig,
    settings: EvalSettings,
    log: Callable[[str], None] = lambda _: None,
    groups: Mapping[str, Mapping[str, int | None]] | None = None,
) -> dict[str, object]:
    """Every policy on the test slice of every seed's world; per policy the figures per seed,
    their mean, standard deviation and the number of seeds with the figure (`_n`); per seed
    what its slices offer to learn from (learned_from). `groups` names families of policies
    (councils trained alike but for their seed, each with its training seed): such a family
    is reported as one, its figures pooled over the training seeds (pooled). The first
    family's means are also the top-level figures."""
    if config.council.guard_gpu_hours is not None:  # the baselines' bands are probabilities
        raise InvalidInput(
            "council evaluate judges bands on the probability alone: leave guard_gpu_hours "
            "out of its fleet file (gpu-agent simulate measures it)"
        )
    runs: dict[str, list[dict[str, float | None]]] = {name: [] for name in policies}
    slices = []
    for seed in settings.seeds:
        w = split_world(seed, settings, config)
        slices.append(
            {
                "seed": seed,
                "train": learned_from(w.train, w.train_end),
                "validation": learned_from(w.val, w.val_end),
                "test": learned_from(w.test, math.inf),
            }
        )
        log(f"world {seed}: {len(w.train)} / {len(w.val)} / {len(w.test)} voted requests")
        known_train, known_val = known(w.train, w.train_end), known(w.val, w.val_end)
        for name, policy in policies.items():
            decisions = policy(known_train, known_val, w.test, config.council)
            runs[name].append(figures(decisions, w.test))
    families: dict[str, dict[str, object]] = {}
    for name, per_seed in runs.items():
        families[name] = {"per_seed": per_seed, **spreads(per_seed)}
    families = grouped(families, groups or {})
    lead = next(iter(families))
    first = families[lead]
    return {
        **{key: first[f"{key}_mean"] for key in FIGURES},
        "policy": lead,
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


def table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def cell(family: Mapping[str, object], key: str, seeds: int) -> str:
    """A figure's mean ± sd, the sd left out below two seeds, and how many seeds had the
    figure where some had nothing to measure."""
    mean, sd, n = family[f"{key}_mean"], family[f"{key}_sd"], family[f"{key}_n"]
    if mean is None:
        return "-"
    text = f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"
    return text if n == seeds else f"{text} (n={n})"


def figure_rows(result: Mapping[str, object]) -> list[list[str]]:
    """A header, then per policy each figure's mean ± sd over the seeds (report's table)."""
    families, seeds = result["families"], result["seeds"]
    assert isinstance(families, dict) and isinstance(seeds, list)
    shown = (*FIGURES, "guarded_share", "waste_auc_changed")
    rows = [["policy", *shown]]
    for name, f in families.items():
        trained = f.get("training_seeds")
        if isinstance(trained, list):  # a family pooled over its training seeds
            label = f"{name} ({len(trained)} training seed{'s' * (len(trained) != 1)})"
            rows.append([label, *(cell(f, key, len(trained)) for key in shown)])
        else:
            rows.append([name, *(cell(f, key, len(seeds)) for key in shown)])
    return rows


def report(result: dict[str, object]) -> str:
    """The figures as a table: per policy, each figure's mean ± sd over the seeds; then per
    seed and slice what a learned policy had to learn from."""
    families, seeds, slices = result["families"], result["seeds"], result["slices"]
    assert isinstance(families, dict) and isinstance(seeds, list) and isinstance(slices, list)
    rows = figure_rows(result)
    learned = [["world", "slice", *SLICE_COLUMNS]]
    for entry in slices:
        for part in ("train", "validation", "test"):
            got = entry[part]
            learned.append(
                [
                    str(entry["seed"]),
                    part,
                    *("-" if got[k] is None else str(got[k]) for k in SLICE_COLUMNS),
                ]
            )
    first = next(iter(families.values()))
    rate, guarded = first["waste_rate_mean"], first["guarded_waste_rate_mean"]
    return "\n".join(
        [
            *table(rows),
            f"on the last 30 % of {len(seeds)} world(s) (seeds {', '.join(map(str, seeds))}),"
            + ("" if rate is None else f" where {rate:.1%} of the voted requests end wasteful")
            + ("" if guarded is None else f" ({guarded:.1%} under the guardrails)")
            + "; mean ± sd over the seeds (n=: the seeds with something to measure), "
            "over the training seeds for a family of councils",
            "",
            *table(learned),
            "what each slice offers to learn from: voted requests, those that ran, those known "
            "by the slice's end, the explored among them (denied, run anyway), and the "
            "effective sample size of their inverse propensity weights",
        ]
    )
