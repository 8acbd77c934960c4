"""`gpu-agent council train`: data, training, calibration, held-out evaluation, ablations,
and the weights plus model card the package ships.

Two targets. `reference` (the shipped weights): each member learns its part of the reference
rules, the generalists the whole rules; worlds are split whole into train, validation and
test, so the test projects were never seen in training. `outcome`: every member learns
whether a request that ran ended without waste (council.dataset.wasteful: its work lost to
an idle release or a budget cut, a tenth of its hours held idle with no work left, or under
20 % utilisation), from the requests that ran and had ended by the end of their
slice only, as a real ledger would know them then. The logging policy (the reference rules)
runs a small seeded share of the requests it denies (`explore`), and each request that ran
weighs 1 / the chance it had to run (inverse propensity), so what the rules deny is still
learned. Each world is split by time: the first 60 % trains, the next 10 % sets the
temperature and the band (council.outcomes.band: approve where at most 5 % of the approved
end wasteful, deny where at most 0.5 % of the requests are good work denied, each with 95 %
confidence), the last 30 % is the test. Members: risk and cost (their perspectives'
inputs) and two generalists; fairness and capacity stay with placement, which enforces
them. Every random draw is seeded: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from council import outcomes
from council.dataset import (
    EXPLORE,
    TARGETS,
    Sample,
    cuts,
    replay,
    synthetic_jobs,
    time_split,
)
from council.encoding import LOW_UTIL_PCT, SEQ_BAD, SEQ_FREE, STATIC_BAD, Encoded, encode
from council.neural_council import ABSTAIN_MARGIN, NeuralCouncil, torch_threads
from council.outcomes import band, figures
from council.spec import Core, NetSpec, TimeMode
from council.torch_net import CouncilNet, param_count
from council.weightfiles import arrays_path
from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.trace import Job, read_trace

MEMBERS = ("cost", "fairness", "capacity", "risk", "general-1", "general-2")
OUTCOME_MEMBERS = ("risk", "cost", "general-1", "general-2")
Target = Literal["reference", "outcome"]
PERSPECTIVE = {"cost": "cost", "fairness": "fairness", "capacity": "capacity", "risk": "risk"}
COUNCIL_TARGET = TARGETS.index("council")
WEIGHTS_FILE, METRICS_FILE, CARD_FILE = "council.pt", "metrics.json", "MODEL_CARD.md"
# What `train` writes in its folder, checked before training starts (the .npz: weightfiles)
OUTPUTS = (WEIGHTS_FILE, arrays_path(Path(WEIGHTS_FILE)).name, METRICS_FILE, CARD_FILE)
TEMPERATURE_LOG10 = (-6.5, 6.0)  # the widest search of fit_temperature, in log10 t
# What `council train` runs where its options do not say, per target. Outcomes learn from more
# and longer worlds, for more steps: records as long as those of the worlds `council evaluate`
# judges on (120 days), and twice the data (docs/decisions.md, issue 19).
DEFAULTS: dict[Target, dict[str, int]] = {
    "reference": {"worlds": 16, "world_days": 60, "steps": 2000},
    "outcome": {"worlds": 32, "world_days": 120, "steps": 4000},
}


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    worlds: int = 16  # synthetic worlds; the last two are validation and test
    world_days: float = 60
    world_projects: int = 24
    steps: int = 1500
    batch: int = 256
    lr: float = 3e-3
    trace: Path | None = None
    trace_jobs: int = 30000
    ablations: bool = True
    target: Target = "reference"
    explore: float = EXPLORE  # outcome target: the share of denied requests run anyway
    core: Core = "cfc"  # the members' recurrent cell (council.spec), for comparing families
    time: TimeMode = "gate"  # how elapsed time enters it


@dataclass
class Split:
    samples: list[Sample]
    enc: Encoded[Tensor]
    targets: Tensor  # (N, len(TARGETS))
    wasted: Tensor  # (N,) 0/1, NaN where no outcome is known (not run, or not ended yet)
    propensity: Tensor  # (N,) the chance the logging policy ran it

    @staticmethod
    def of(samples: list[Sample], cuts: Sequence[float] | None = None) -> Split:
        """`cuts`: per request, when its slice ends; an outcome not known by then (the job
        was still running: Sample.outcome_at) is none. None: every outcome is known."""
        ends = [math.inf] * len(samples) if cuts is None else cuts
        wasted = [s.outcome_at(cut) for s, cut in zip(samples, ends, strict=True)]
        return Split(
            samples,
            encode([s.features for s in samples]),
            torch.tensor([s.targets for s in samples]),
            torch.tensor([math.nan if w is None else w for w in wasted]),
            torch.tensor([s.propensity for s in samples]),
        )

    def take(self, idx: Tensor) -> Split:
        """The requests at `idx`, in that order."""
        return Split(
            [self.samples[i] for i in idx.tolist()],
            self.enc.take(idx),
            self.targets[idx],
            self.wasted[idx],
            self.propensity[idx],
        )

    @property
    def known(self) -> Tensor:
        """Which requests have a known outcome: they ran and ended by their slice's end."""
        return ~torch.isnan(self.wasted)

    @property
    def ipw(self) -> Tensor:
        """Inverse propensity weights: 1 / the chance to run, where the outcome is known;
        else 0."""
        return torch.where(self.known, 1.0 / self.propensity, torch.zeros_like(self.propensity))

    @property
    def y(self) -> Tensor:
        """The reference council leans to approve."""
        return (self.targets[:, COUNCIL_TARGET] >= 0.5).float()


def council_spec(seed: int, target: Target = "reference", **kw: object) -> NetSpec:
    members = OUTCOME_MEMBERS if target == "outcome" else MEMBERS
    return NetSpec.current(
        members=members,
        perspectives=tuple(PERSPECTIVE.get(m, "general") for m in members),
        modes=("default",) * len(members),
        seed=seed,
        **kw,
    )


def target_columns(spec: NetSpec) -> list[int]:
    return [TARGETS.index(p) if p != "general" else COUNCIL_TARGET for p in spec.perspectives]


def outcome_datasets(s: TrainSettings, config: FleetConfig) -> tuple[Split, Split, Split]:
    """Every world with exploration, each split by time (council.dataset.time_split). In
    the training and threshold slices an outcome counts only if it was known at the slice's
    end; the test slice's figures read every request's outcome (council.outcomes.figures)."""
    parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    ends: tuple[list[float], list[float], list[float]] = ([], [], [])
    for w in range(s.worlds):
        jobs = synthetic_jobs(s.seed * 1000 + w, s.world_days, s.world_projects)
        samples = replay([(w, jobs)], config, s.seed, s.explore)
        if not samples:
            continue
        for part, end, got, cut in zip(
            parts, ends, time_split(samples), (*cuts(samples), math.inf), strict=True
        ):
            part.extend(got)
            end.extend([cut] * len(got))
    train, val, test = (Split.of(p, e) for p, e in zip(parts, ends, strict=True))
    return train, val, test


def datasets(s: TrainSettings, config: FleetConfig) -> tuple[Split, Split, Split]:
    if s.target == "outcome":
        return outcome_datasets(s, config)
    worlds: list[tuple[int, list[Job]]] = [
        (w, synthetic_jobs(s.seed * 1000 + w, s.world_days, s.world_projects))
        for w in range(s.worlds)
    ]
    split_of = {w: "train" for w in range(s.worlds - 2)} | {
        s.worlds - 2: "val",
        s.worlds - 1: "test",
    }
    if s.trace is not None:  # the trace in time order: 70 % train, 15 % val, 15 % test
        jobs = [
            replace(j, hours=max(1 / 60, j.hours))  # a zero-length job still holds
            for j in read_trace(s.trace, limit=s.trace_jobs)
        ]  # its GPUs a minute
        a, b = int(len(jobs) * 0.7), int(len(jobs) * 0.85)
        for w, part, name in (
            (100, jobs[:a], "train"),
            (101, jobs[a:b], "val"),
            (102, jobs[b:], "test"),
        ):
            worlds.append((w, part))
            split_of[w] = name
    samples = replay(worlds, config, s.seed)
    parts = {
        n: Split.of([x for x in samples if split_of[x.world] == n])
        for n in ("train", "val", "test")
    }
    return parts["train"], parts["val"], parts["test"]


def fit(net: CouncilNet, data: Split, s: TrainSettings, log: Callable[[str], None]) -> None:
    """Each member on a bootstrap resample of its own. Target `reference`: distillation (soft
    BCE to each member's reference target) plus a small auxiliary loss on the recorded
    outcomes. Target `outcome`: BCE to "ended without waste" on the requests that ran, each
    weighed by its inverse propensity."""
    if s.target == "outcome":
        data = data.take(torch.nonzero(data.known).squeeze(1))
    gen = torch.Generator().manual_seed(s.seed + 7)
    cols = target_columns(net.spec)
    n, m = len(data.enc), len(cols)
    boot = torch.poisson(torch.ones(m, n), generator=gen)
    if s.target == "outcome":
        boot = boot * data.ipw
        targets = (1.0 - data.wasted).expand(m, -1)
    else:
        targets = data.targets[:, cols].t()
    opt = torch.optim.Adam(net.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps, eta_min=s.lr / 20)
    net.train()
    for step in range(s.steps):
        idx = torch.randint(n, (s.batch,), generator=gen)
        out = net(data.enc.take(idx))
        w = boot[:, idx]
        loss = (
            F.binary_cross_entropy_with_logits(out.logit, targets[:, idx], reduction="none") * w
        ).sum() / w.sum()
        wasted = data.wasted[idx]
        known = ~torch.isnan(wasted)
        if s.target == "reference" and bool(known.any()):
            loss = loss + 0.2 * F.binary_cross_entropy_with_logits(
                out.outcome_logit[:, known], wasted[known].expand(m, -1)
            )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == s.steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}")
    net.eval()


@torch.inference_mode()
def member_probs(net: CouncilNet, enc: Encoded[Tensor], chunk: int = 2048) -> Tensor:
    return torch.cat(
        [
            torch.sigmoid(net(enc.take(torch.arange(i, min(i + chunk, len(enc))))).logit)
            for i in range(0, len(enc), chunk)
        ],
        dim=1,
    )


def log_loss(z: Tensor, y: Tensor, weight: Tensor | None, temperatures: Tensor) -> Tensor:
    """The (weighted) mean log loss of logits `z` at each temperature, as one batch."""
    loss = F.binary_cross_entropy_with_logits(
        z / temperatures[:, None], y.expand(len(temperatures), -1), reduction="none"
    )
    return (loss if weight is None else loss * weight).mean(1)


def fit_temperature(p: Tensor, y: Tensor, weight: Tensor | None = None) -> float:
    """The temperature that minimises log loss of the averaged probability on validation.

    A grid on log10 t in steps of 0.01, first over [-1.5, 1]; while its best point is at an
    edge, the grid grows 2.5 decades that way (the loss is convex in 1/t, so an interior
    best point is the optimum to the grid's step), up to TEMPERATURE_LOG10. There the limit
    is reached to five decimals: with p clamped to [1e-6, 1 - 1e-6], t = 1e6 makes every
    probability 0.5 and t = 10^-6.5 makes each 0 or 1 by the sign of its logit."""
    z = torch.logit(p.clamp(1e-6, 1 - 1e-6))
    lo, hi = -1.5, 1.0
    while True:
        grid = torch.logspace(lo, hi, round((hi - lo) * 100) + 1)
        nll = torch.cat([log_loss(z, y, weight, part) for part in torch.split(grid, 64)])
        best = int(nll.argmin())
        if best == 0 and lo > TEMPERATURE_LOG10[0]:
            lo -= 2.5
        elif best == len(grid) - 1 and hi < TEMPERATURE_LOG10[1]:
            hi += 2.5
        else:
            return float(grid[best])


def fit_vote_weights(member_p: Tensor, y: Tensor, weight: Tensor) -> tuple[float, ...]:
    """Each member's say in the soft vote: the weights on the simplex that, with a
    temperature, minimise the weighted log loss of the averaged probability `member_p`
    (members, N) against `y`. A member whose view foresees little (on outcomes, cost, which
    reads no record) gets little, rather than pulling the average towards its guesses."""
    p, y, weight = member_p.double().clamp(1e-9, 1 - 1e-9), y.double(), weight.double()
    logits = torch.zeros(len(p), dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits, log_t], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        mean = (p * torch.softmax(logits, 0).unsqueeze(1)).sum(0)
        z = torch.logit(mean) / torch.exp(log_t)
        loss = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * weight).sum()
        loss = loss / weight.sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return tuple(round(w, 6) for w in torch.softmax(logits.detach(), 0).tolist())


def calibrate_on_outcomes(council: NeuralCouncil, val: Split) -> None:
    """Vote weights, temperature and band from the threshold slice's requests with a known
    outcome, each weighed by its inverse propensity, as a real ledger would allow
    (council.outcomes.band)."""
    ran = val.take(torch.nonzero(val.known).squeeze(1))
    good = 1.0 - ran.wasted
    member_p = member_probs(council.net, ran.enc)
    council.vote_weights = fit_vote_weights(member_p, good, ran.ipw)
    p = council.council_probability(member_p).float()
    council.temperature = fit_temperature(p, good, ran.ipw)
    calibrated = council.council_probability(member_p)
    council.band = band(calibrated.tolist(), (ran.wasted == 1).tolist(), ran.ipw.tolist())


def outcome_figures(council: NeuralCouncil, test: Split, config: FleetConfig) -> dict[str, object]:
    """council.evaluate's figures on the test slice (every request's outcome, known in the
    simulated worlds), with the band and the monotonicity sweep."""
    decisions = [council.decide(s.features, config.council) for s in test.samples]
    return {
        **figures(decisions, test.samples),
        "band": list(council.band or ()),
        "monotonicity": monotonicity(council, test),
    }


def ece(p: Tensor, y: Tensor, bins: int = 10) -> float:
    return outcomes.ece(p.tolist(), y.tolist(), bins)


def auc(score: Tensor, y: Tensor) -> float | None:
    """council.outcomes.auc; None where one class is missing (nothing to rank)."""
    got = outcomes.auc(score.tolist(), (y == 1).tolist())
    return None if math.isnan(got) else got


def escalation(
    council: NeuralCouncil, member_p: Tensor, y: Tensor, approve: float, deny: float, quorum: int
) -> dict[str, float]:
    """Errors the council makes alone, and those left once split votes go to a human."""
    p = council.council_probability(member_p)
    approvers = (member_p >= 0.5 + ABSTAIN_MARGIN).sum(0)
    approved = (p >= approve) & (approvers >= min(quorum, member_p.shape[0]))
    denied = p <= deny
    escalated = ~(approved | denied)
    wrong = (p >= 0.5).float() != y
    left = (approved & (y == 0)) | (denied & (y == 1))
    return {
        "errors": int(wrong.sum()),
        "escalated": int(escalated.sum()),
        "escalated_share": float(escalated.float().mean()),
        "errors_after_escalation": int(left.sum()),
        "errors_removed_share": 1 - float(left.sum()) / max(1, int(wrong.sum())),
    }


@torch.inference_mode()
def monotonicity(council: NeuralCouncil, data: Split, n: int = 256) -> dict[str, int]:
    """Grid sweep on `n` test requests: cost pressure 0..10, all past utilisation 100..0 %,
    0..all past jobs stopped by the budget. Counts any rise in council probability."""
    enc = data.enc.take(torch.arange(min(n, len(data.enc))))
    rated = enc.free[:, :, SEQ_FREE.index("rated")]
    real = enc.mask & (enc.free[:, :, SEQ_FREE.index("is_request")] == 0)
    sweeps: list[list[Encoded[Tensor]]] = [[], [], []]
    for level in torch.linspace(0, 1, 11):
        a = enc.take(torch.arange(len(enc)))
        a.static_bad[:, STATIC_BAD.index("cost_pressure")] = level * 10
        sweeps[0].append(a)
        b = enc.take(torch.arange(len(enc)))
        b.bad[:, :, SEQ_BAD.index("util_deficit")] = level * rated
        b.bad[:, :, SEQ_BAD.index("low_util")] = float(1 - level < LOW_UTIL_PCT / 100) * rated
        sweeps[1].append(b)
        c = enc.take(torch.arange(len(enc)))
        hit = real & (torch.arange(enc.mask.shape[1]) >= (1 - level) * enc.mask.shape[1])
        for name in ("budget_release", "held_on"):  # a budget cut ends what the holder held on
            c.bad[:, :, SEQ_BAD.index(name)] = torch.maximum(
                c.bad[:, :, SEQ_BAD.index(name)], hit.float()
            )
        sweeps[2].append(c)
    violations = checks = 0
    for sweep in sweeps:
        p = torch.stack(
            [council.council_probability(torch.sigmoid(council.net(e).logit)) for e in sweep]
        )
        rises = (p[1:] - p[:-1]) > 1e-6
        violations += int(rises.sum())
        checks += rises.numel()
    return {"violations": violations, "checks": checks}


def evaluate(council: NeuralCouncil, data: Split, config: FleetConfig) -> dict[str, object]:
    mp = member_probs(council.net, data.enc)
    y = data.y
    p = council.council_probability(mp)
    cols = target_columns(council.net.spec)
    members = {}
    for i, name in enumerate(council.members):
        own = (data.targets[:, cols[i]] >= 0.5).float()
        members[name] = {
            "accuracy_vs_council": float(((mp[i] >= 0.5).float() == y).float().mean()),
            "accuracy_vs_own_target": float(((mp[i] >= 0.5).float() == own).float().mean()),
        }
    known = ~torch.isnan(data.wasted)
    with torch.inference_mode():
        risk = torch.sigmoid(council.net(data.enc).outcome_logit).mean(0)
    deny, approve = config.council.band("neural")
    return {
        "samples": len(y),
        "approve_share": float(y.mean()),
        "accuracy": float(((p >= 0.5).float() == y).float().mean()),
        "ece": ece(p, y),
        "brier": float(((p - y) ** 2).mean()),
        "best_member_accuracy": max(m["accuracy_vs_council"] for m in members.values()),
        "members": members,
        "escalation": escalation(council, mp, y, approve, deny, config.council.quorum),
        "monotonicity": monotonicity(council, data),
        "waste_auc": auc(risk[known], data.wasted[known]),
    }


def summary_features(data: Split) -> Tensor:
    """What a model without a sequence gets: the request, the standing, and unweighted,
    undecayed means of the record plus its length and age."""
    enc = data.enc
    real = (enc.mask & (enc.free[:, :, SEQ_FREE.index("is_request")] == 0)).float()
    n = real.sum(1, keepdim=True).clamp_min(1)
    means = (enc.bad * real.unsqueeze(-1)).sum(1) / n
    age = torch.log1p(enc.dt[:, -1:])
    return torch.cat([enc.static_free, enc.static_bad, means, n / 64, age], dim=1)


def logistic_baseline(train: Split, val: Split, test: Split, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    xs = [summary_features(d) for d in (train, val, test)]
    mu, sd = xs[0].mean(0), xs[0].std(0).clamp_min(1e-6)
    xs = [(x - mu) / sd for x in xs]
    lin = torch.nn.Linear(xs[0].shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)
    target = train.targets[:, COUNCIL_TARGET]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lin(xs[0]).squeeze(1), target)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        pv, pt = (torch.sigmoid(lin(x).squeeze(1)) for x in xs[1:])
    return _alone(pt, pv, test, val)


CFC = "cfc (time in the gate): the council's general-1"
ABLATIONS: dict[str, dict[str, object]] = {
    "cfc without time (dt = 1)": {"time": "none"},
    "cfc no_gate variant": {"modes": ("no_gate",)},
    "gru with log(1+dt) input": {"core": "gru", "time": "input"},
}


def _alone(member_p: Tensor, val_p: Tensor, test: Split, val: Split) -> dict[str, float]:
    """One member on its own, temperature-scaled on validation like the council."""
    t = fit_temperature(val_p, val.y)
    p = torch.sigmoid(torch.logit(member_p.clamp(1e-6, 1 - 1e-6)) / t)
    return {"accuracy": float(((p >= 0.5).float() == test.y).float().mean()), "ece": ece(p, test.y)}


def ablations(
    council: NeuralCouncil,
    train: Split,
    val: Split,
    test: Split,
    s: TrainSettings,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """The council's first general member against one generalist per variant, trained on
    the same data with the same steps and seed."""
    g = council.members.index("general-1")
    out = {
        CFC: _alone(
            member_probs(council.net, test.enc)[g], member_probs(council.net, val.enc)[g], test, val
        )
    }
    for name, change in ABLATIONS.items():
        log(f"ablation: {name}")
        spec = replace(
            NetSpec.current(
                members=("general",), perspectives=("general",), modes=("default",), seed=s.seed
            ),
            **change,  # type: ignore[arg-type]
        )
        net = CouncilNet(spec)
        fit(net, train, s, log)
        out[name] = _alone(
            member_probs(net, test.enc)[0], member_probs(net, val.enc)[0], test, val
        ) | {"params": param_count(net)}
    out["logistic regression on summary features"] = logistic_baseline(train, val, test, s.seed)
    return out


def train(
    s: TrainSettings, config: FleetConfig, out: Path, log: Callable[[str], None] = print
) -> dict[str, object]:
    with torch_threads(1):  # one thread: a seed gives the same bytes on any machine
        return _train(s, config, out, log)


def _train(
    s: TrainSettings, config: FleetConfig, out: Path, log: Callable[[str], None]
) -> dict[str, object]:
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    train_set, val, test = datasets(s, config)
    log(
        f"data: {len(train_set.samples)} train, {len(val.samples)} validation, "
        f"{len(test.samples)} test requests ({time.perf_counter() - started:.0f} s)"
    )
    net = CouncilNet(council_spec(s.seed, s.target, core=s.core, time=s.time))
    fit(net, train_set, s, log)
    metrics_time = time.perf_counter() - started
    council = NeuralCouncil.of(net, 1.0, (1.0,) * len(net.spec.members), "cfc-council")
    if s.target == "outcome":
        calibrate_on_outcomes(council, val)
    else:
        council.temperature = fit_temperature(
            council.council_probability(member_probs(net, val.enc)), val.y
        )
    metrics: dict[str, object] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
        "params": param_count(net),
        "members": list(net.spec.members),
        "vote_weights": list(council.vote_weights),
        "temperature": council.temperature,
        "council_seconds": round(metrics_time, 1),
        "data": {
            "train": len(train_set.samples),
            "validation": len(val.samples),
            "test": len(test.samples),
        },
        "test": (
            outcome_figures(council, test, config)
            if s.target == "outcome"
            else evaluate(council, test, config)
        ),
    }
    if s.ablations and s.target == "reference":
        metrics["ablations"] = ablations(council, train_set, val, test, s, log)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    save(council, metrics, out, s.seed)
    return metrics


def save(council: NeuralCouncil, metrics: dict[str, object], out: Path, seed: int) -> None:
    """The weights, metrics and model card in `out`; a place that changed since it was
    checked (OSError, or torch.save's RuntimeError on a file it cannot open) in one line."""
    from council.card import model_card

    try:
        out.mkdir(parents=True, exist_ok=True)
        council.save(out / WEIGHTS_FILE, seed=seed)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (out / CARD_FILE).write_text(model_card(metrics))
    except (OSError, RuntimeError) as exc:
        raise InvalidInput(f"--out {out}: cannot write the council ({exc})") from None
