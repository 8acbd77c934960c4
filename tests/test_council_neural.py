"""The shipped neural council: weights, decisions with reasons, held-out quality, training,
the human in the loop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from council.dataset import World, synthetic_jobs
from council.features import RequestFeatures
from council.neural_council import OCCLUSIONS, SHIPPED, SHIPPED_OUTCOME, NeuralCouncil
from council.policies import council_for
from council.record import PastJob, rates
from council.rules import ReferenceCouncil
from council.train import (
    METRICS_FILE,
    TEMPERATURE_LOG10,
    WEIGHTS_FILE,
    Split,
    TrainSettings,
    evaluate,
    fit_temperature,
    fit_vote_weights,
    train,
)
from fleet.config import CouncilSettings, FleetConfig, load_fleet
from fleet.errors import ConfigError
from fleet.models import CouncilOutcome, ReleaseReason, Status, Verdict
from fleet.trace import read_trace
from nodes.context import council_of
from tests.conftest import (
    ROOT,
    SHARED,
    OrchFactory,
    cli_in_process,
    fleet_toml,
    run_cli,
    small_config,
)
from tests.test_council_cfc import NOW, features, history

SETTINGS = CouncilSettings()


@pytest.fixture(scope="module")
def council() -> NeuralCouncil:
    return NeuralCouncil.load()


@pytest.fixture(scope="module", params=[None, "outcome"], ids=["rules-trained", "outcome-trained"])
def shipped(request: pytest.FixtureRequest) -> NeuralCouncil:
    """Each shipped council: the default (trained to the reference rules), and the one
    trained on outcomes."""
    return NeuralCouncil.load(request.param)


def test_shipped_weights_are_a_small_state_dict(council: NeuralCouncil) -> None:
    assert SHIPPED.stat().st_size < 300_000
    blob = torch.load(SHIPPED, weights_only=True)  # tensors and plain values, no pickled code
    assert set(blob) >= {"spec", "state", "temperature", "vote_weights"}
    assert all(isinstance(v, torch.Tensor) for v in blob["state"].values())
    assert council.members == ("cost", "fairness", "capacity", "risk", "general-1", "general-2")
    assert council.name.startswith("cfc-council-")
    assert isinstance(council_for(SETTINGS), NeuralCouncil)
    assert isinstance(council_for(CouncilSettings(policy="reference")), ReferenceCouncil)


def test_the_council_trained_on_outcomes_ships_beside_the_default_chosen_by_name() -> None:
    """`[council] weights = "outcome"`: the shipped council trained on outcomes, with the band
    it learned; the default stays the one trained to the rules. Both under 1 MiB."""
    outcome = council_for(CouncilSettings(weights="outcome"))
    assert isinstance(outcome, NeuralCouncil) and outcome.band is not None
    assert outcome.members == ("risk", "cost", "general-1", "general-2")
    assert outcome.name != NeuralCouncil.load().name and NeuralCouncil.load().band is None
    files = [f for f in SHIPPED.parent.rglob("*") if f.is_file()]
    assert SHIPPED_OUTCOME in files and sum(f.stat().st_size for f in files) < 1 << 20
    assert "trained on outcomes" in (SHIPPED_OUTCOME.parent / "MODEL_CARD.md").read_text()


def test_unreadable_weights_are_a_clear_config_error(tmp_path: Path) -> None:
    """Also from the CLI: refused in one line before a state directory, ledger or
    checkpoint is made (not first at the council's vote)."""
    bad = tmp_path / "council.pt"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="cannot load council weights"):
        NeuralCouncil.load(bad)
    table = tmp_path / "one.csv"  # torch's unpickler raised IndexError: a traceback (session 30)
    table.write_text("timestamp,duration\n2017-10-09 07:01:55,66.0\n")
    with pytest.raises(ConfigError, match=r"cannot load council weights .*: pop from empty"):
        NeuralCouncil.load(table)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty.pt: \w"):  # a reason, never none
        NeuralCouncil.load(empty)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council={"policy": "neural", "weights": str(bad)}))
    done = run_cli(
        "request", "--state-dir", str(tmp_path / "s"), "--fleet", str(fleet), "--project",
        "p", "--purpose", "training", "--count", "1", "--hours", "1", "--no-wait",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot load council weights" in done.stderr
    assert "weights_only" not in done.stderr and len(done.stderr) < 300  # not torch's advice
    assert not (tmp_path / "s").exists()


def good_and_bad() -> tuple[Any, Any]:
    rng = random.Random(7)
    good = features(
        rng,
        0,
        count=2,
        hours=4,
        cost_pressure=0.05,
        worst_case_usd=40,
        fair_share=0.9,
        usage_share=0.05,
        pool_share=0.1,
        pool_busy=0.2,
        past=history(rng, 20, util=85, bad=0.0),
    )
    bad = features(
        rng,
        0,
        count=16,
        hours=48,
        cost_pressure=2.0,
        worst_case_usd=4000,
        fair_share=0.2,
        usage_share=0.6,
        pool_share=0.7,
        pool_busy=0.8,
        past=history(rng, 20, util=3, bad=0.9),
    )
    return good, bad


def test_votes_carry_reasons_and_contrasting_requests_get_contrasting_decisions(
    shipped: NeuralCouncil,
) -> None:
    council = shipped
    good, bad = good_and_bad()
    yes, no = council.decide(good, SETTINGS), council.decide(bad, SETTINGS)
    assert yes.outcome is CouncilOutcome.APPROVED and yes.probability > 0.9
    assert no.outcome is CouncilOutcome.DENIED and no.probability < 0.1
    assert [v.member for v in no.votes] == list(council.members)
    for vote in no.votes:
        assert vote.reasons and all(r.feature in OCCLUSIONS for r in vote.reasons)
        assert all(r.effect < 0 for r in vote.reasons[:1]) or vote.verdict is Verdict.APPROVE
    risk = next(v for v in no.votes if v.member == "risk")
    assert risk.verdict is Verdict.DENY
    assert risk.reasons[0].feature in ("hoarding_rate", "recent_util", "overrun_rate")
    assert {r.feature for v in no.votes for r in v.reasons} >= {"cost_pressure"}


def test_worse_records_never_raise_the_shipped_councils_probability(shipped: NeuralCouncil) -> None:
    """Grid sweep on real request shapes: budget overrun and utilisation history."""
    council = shipped
    rng = random.Random(11)
    for _ in range(8):
        f = features(rng, rng.randint(1, 32))
        util_grid = [
            dataclasses.replace(f, past=tuple(dataclasses.replace(j, util_pct=u) for j in f.past))
            for u in range(100, -1, -10)
        ]
        cost_grid = [dataclasses.replace(f, cost_pressure=c / 4) for c in range(13)]
        clean = [
            i
            for i, j in enumerate(f.past)
            if j.reason not in (ReleaseReason.IDLE, ReleaseReason.BUDGET)
        ]  # an idle job stopped by the
        overrun_grid = [
            dataclasses.replace(
                f,
                past=tuple(  # budget is a swap, not "worse"
                    dataclasses.replace(j, reason=ReleaseReason.BUDGET) if i in clean[:k] else j
                    for i, j in enumerate(f.past)
                ),
            )
            for k in range(len(clean) + 1)
        ]
        for grid in (util_grid, cost_grid, overrun_grid):
            p = council.council_probability(council.probabilities(grid))
            assert bool((p[1:] <= p[:-1] + 1e-6).all()), p


def test_an_old_hoarding_record_is_forgiven_as_it_ages(council: NeuralCouncil) -> None:
    """No cap on elapsed time: the same record of idle releases, older and older, counts less
    and less against the request, also past 60 days (the cap time once had, at which the
    shipped council denied a 1,000-day-old record as it did a 60-day-old one), and the
    reasons say how old the record is."""
    day = 86400.0

    def hoarder(age_days: float) -> RequestFeatures:
        end = NOW - age_days * day
        past = tuple(
            PastJob(end - (11 - i) * day, 4, 6.0, 100.0, 2.0, ReleaseReason.IDLE, 0.3, 6.0, 24.0)
            for i in range(12)
        )
        record = rates(past, None, NOW, 7, 4)
        return features(
            random.Random(3),
            0,
            count=8,
            hours=24,
            cost_pressure=0.5,
            worst_case_usd=1500,
            fair_share=0.5,
            usage_share=0.3,
            pool_share=0.5,
            pool_busy=0.5,
            past=past,
            history_len=len(past),
            hoarding_rate=record.hoarding,
            overrun_rate=record.overrun,
            recent_util=record.util,
        )

    ages = (1, 7, 30, 60, 94, 200, 400)
    decisions = [council.decide(hoarder(a), SETTINGS) for a in ages]
    p = [d.probability for d in decisions]
    assert p == sorted(p) and p[-1] >= p[ages.index(60)] + 0.1, p
    assert decisions[0].outcome is CouncilOutcome.DENIED
    assert decisions[-1].outcome is not CouncilOutcome.DENIED
    cited = {r.text for v in decisions[ages.index(94)].votes for r in v.reasons}
    assert any(t.endswith("with no work left; the last 94 days ago") for t in cited), cited


def test_held_out_quality_on_fresh_worlds(council: NeuralCouncil) -> None:
    """Worlds with seeds the training never used: the Must-show thresholds, but for the
    accuracy. The shipped weights were trained on the worlds before their habits were
    calibrated (docs/decisions.md, "Issue 19 on calibrated worlds") and before their leases
    were the hours asked ("The worlds' leases as placed"); on today's worlds they agree with
    the rules 93.1 % of the time (94.8 % before the leases) where 95 % was asked on their
    own. A council retrained on calibrated worlds agreed 96.9 % but denied 18 of the whole
    Philly trace's requests that the rules approve (3.7 % of its work), so these stay the
    default."""
    config = load_fleet(None)
    samples = [s for w in (9001, 9002) for s in World(synthetic_jobs(w), config, w, w).run()]
    m: dict[str, Any] = evaluate(council, Split.of(samples), config)
    assert m["samples"] > 1000
    assert m["accuracy"] >= 0.93 and m["ece"] <= 0.05
    assert m["accuracy"] >= m["best_member_accuracy"]
    assert m["monotonicity"]["violations"] == 0
    esc = m["escalation"]
    assert esc["errors_after_escalation"] < esc["errors"]


def test_training_is_deterministic_and_writes_weights_and_a_card(tmp_path: Path) -> None:
    s = TrainSettings(worlds=3, world_days=8, world_projects=6, steps=4, batch=32)
    config = load_fleet(None)
    a = train(s, config, tmp_path / "a", log=lambda _: None)
    b = train(s, config, tmp_path / "b", log=lambda _: None)
    sa = torch.load(tmp_path / "a" / WEIGHTS_FILE, weights_only=True)["state"]
    sb = torch.load(tmp_path / "b" / WEIGHTS_FILE, weights_only=True)["state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for timings in (a, b):
        del timings["seconds"], timings["council_seconds"]
    assert a == json.loads(json.dumps(b))
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "Model card" in card and "logistic regression on summary features" in card
    assert json.loads((tmp_path / "a" / METRICS_FILE).read_text())["data"]["train"] > 0
    NeuralCouncil.load(tmp_path / "a" / WEIGHTS_FILE)  # loads like the shipped weights


def test_train_command_rejects_bad_arguments_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,duration,num_gpus,cluster\n2017-10-01 00:00:00,-5,1,a\n")
    for args in (
        ("--worlds", "2"),
        ("--worlds", "1001"),
        ("--steps", "0"),
        ("--steps", str(10**23)),  # accepted once, and it never ended
        ("--days", "6"),
        ("--target", "outcome", "--days", "nan"),
        ("--trace", str(tmp_path / "missing.csv")),
        ("--trace", str(bad)),
        ("--target", "outcome", "--explore", "0"),
        ("--target", "outcome", "--explore", "1"),
        ("--target", "outcome", "--trace", str(bad)),
        ("--target", "outcomes"),
    ):
        assert cli_in_process("council", "train", "--out", str(tmp_path / "w"), *args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert not (tmp_path / "w").exists()


@pytest.mark.skipif(not (SHARED / "traces" / "philly.csv").exists(), reason="no ../shared")
def test_the_philly_trace_replays_into_samples() -> None:
    jobs = read_trace(SHARED / "traces" / "philly.csv", limit=3000)
    assert len(jobs) == 3000 and all(a.submit <= b.submit for a, b in itertools.pairwise(jobs))
    assert all(j.project.startswith("vc-") and j.count >= 1 for j in jobs)
    samples = World(jobs, load_fleet(None), 1, 100).run()
    assert samples and all(
        s.features.past == tuple(sorted(s.features.past, key=lambda j: j.ended_at)) for s in samples
    )


SPLIT = {"quorum": 6, "auto_approve_max_gpus": 0}


def split_config() -> FleetConfig:
    """Every member must approve; 8 of the small fleet's 10 training GPUs is too many for
    the capacity member, so there is no quorum and a human decides."""
    return small_config(council=SPLIT)


BIG = {"project": "vision", "purpose": "training", "count": 8, "duration_hours": 1}


def test_review_interrupt_has_no_side_effects_and_resume_reserves_once(
    make_orch: OrchFactory,
) -> None:
    orch = make_orch(split_config())
    assert isinstance(council_of(orch.services), NeuralCouncil)

    def reserved() -> list[str]:  # the ledger less its audit log (which says who was asked)
        return [  # and the thread's claim on its name (fleet.thread_claims)
            r for r in orch.services.ledger.dump() if not r.startswith(("audit: ", "threads: "))
        ]

    before = reserved()
    out = orch.request(BIG, thread_id="t-1")
    assert out.status is Status.PENDING_REVIEW and out.council is not None
    assert len(out.council.votes) == 6 and "no quorum" in out.council.summary
    assert reserved() == before  # council and review reserved nothing
    assert [e.action for e in orch.audit()] == ["ask"]
    assert orch.resume("t-1").status is Status.PENDING_REVIEW  # no answer: still waiting
    assert reserved() == before
    done = orch.resume("t-1", {"approve": True, "by": "ana", "comment": "deadline"})
    assert done.status is Status.RELEASED
    rows = orch.services.ledger.allocations()
    assert len(rows) == 1 and len(orch.history()) == 1
    with pytest.raises(Exception, match="already decided: approve by ana"):
        orch.resume("t-1", True)
    assert len(orch.services.ledger.allocations()) == 1 and len(orch.history()) == 1


def test_cli_resume_decides_a_split_council(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council=SPLIT))
    common = ("--state-dir", str(tmp_path / "s"), "--fleet", str(fleet), "--json")
    asked = run_cli(
        "request",
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "8",
        "--hours",
        "1",
        "--thread-id",
        "t-cli",
        "--no-wait",
        *common,
        cwd=ROOT,
    )
    assert asked.returncode == 0 and json.loads(asked.stdout)["status"] == "pending_review"
    denied = run_cli("resume", "t-cli", "--deny", "--by", "bo", *common, cwd=ROOT)
    assert denied.returncode == 3 and json.loads(denied.stdout)["status"] == "denied"


def test_batched_probabilities_run_on_the_threads_asked_and_restore_torchs(
    council: NeuralCouncil,
) -> None:
    """torch's own pool spins against a busy machine's other processes: a batch runs on the
    threads asked for (one by default) and torch's setting is as it was afterwards."""
    from council.neural_council import torch_threads

    before = torch.get_num_threads()
    seen: list[int] = []
    batch = [features(random.Random(i)) for i in range(4)]
    real = council.member_logits

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args, **kw)

    council.member_logits = spy  # type: ignore[method-assign]
    try:
        one = council.probabilities(batch)
        two = council.probabilities(batch, threads=2)
    finally:
        del council.member_logits
    assert seen == [1, 2] and torch.get_num_threads() == before
    assert torch.allclose(one, two)
    with pytest.raises(ValueError, match="at least 1"), torch_threads(0):
        pass


def test_vote_weights_give_a_member_that_foresees_nothing_next_to_no_say() -> None:
    """fit_vote_weights: on a slice where one member's probability tracks the outcome and
    another's is noise, the noise gets next to no weight; the weights are a distribution,
    and the same slice gives the same weights."""
    gen = torch.Generator().manual_seed(0)
    y = torch.bernoulli(torch.full((2000,), 0.6), generator=gen)
    informed = torch.where(y == 1, 0.75, 0.3) + 0.05 * torch.rand(2000, generator=gen)
    noise = torch.rand(2000, generator=gen)
    member_p = torch.stack([informed, noise, informed.flip(0)])
    weights = fit_vote_weights(member_p, y, torch.ones(2000))
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5 and min(weights) >= 0
    assert weights[0] > 0.9 and weights[1] < 0.05, weights
    assert fit_vote_weights(member_p, y, torch.ones(2000)) == weights


def test_the_temperature_fit_widens_its_search_past_the_first_grid() -> None:
    """The first grid spans t in [10^-1.5, 10]; an optimum beyond either edge is found, not
    clipped to it, and where the data want t at 0 the search stops at its far bound."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=gen) * 3
    blunt = (torch.rand(4000, generator=gen) < torch.sigmoid(x / 20)).float()
    assert 12 < fit_temperature(torch.sigmoid(x), blunt) < 35
    x = x[:1000]
    sharp = (torch.rand(1000, generator=gen) < torch.sigmoid(x)).float()
    assert fit_temperature(torch.sigmoid(x * 0.01), sharp) == pytest.approx(0.01, rel=0.2)
    floor = 10 ** TEMPERATURE_LOG10[0]
    assert fit_temperature(torch.sigmoid(x), (x > 0).float()) == pytest.approx(floor)
