"""`gpu-agent council evaluate`: the outcome figures, the split by time, counterfactual
outcomes that change nothing the world recorded, and the command's input checks."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from council import weightfiles
from council.card import EVALUATED, evaluation_section, with_section
from council.dataset import (
    Sample,
    World,
    _Plan,
    cuts,
    known,
    replay,
    synthetic_jobs,
    time_split,
    wasteful,
)
from council.encoding import encode_arrays
from council.evaluate import (
    EvalSettings,
    baselines,
    cell,
    evaluate,
    figure_rows,
    fixed,
    outcome_logistic,
    report,
    spread,
    world,
)
from council.neural_council import SHIPPED, SHIPPED_OUTCOME, NeuralCouncil
from council.outcomes import (
    BAND_CEILING,
    BAND_FLOOR,
    CHANGE_DAYS,
    FIGURES,
    auc,
    band,
    banded,
    ece,
    ess,
    figures,
    upper,
)
from council.policies import approve_all
from council.rules import ReferenceCouncil
from council.train import (
    OUTCOME_MEMBERS,
    WEIGHTS_FILE,
    TrainSettings,
    outcome_datasets,
    train,
)
from council.train import auc as train_auc
from council.voting import combine
from fleet.config import CouncilSettings, load_fleet
from fleet.errors import InvalidInput
from fleet.models import (
    CouncilDecision,
    CouncilOutcome,
    GPURequest,
    MemberVote,
    ReleaseReason,
    Verdict,
)
from fleet.simulated import PROFILES
from graph.cli import main
from graph.cli_offline import writable_dir
from tests.conftest import cli_in_process, run_cli
from tests.test_council_cfc import features

SMALL = EvalSettings(seeds=(0, 1), days=20, projects=8)


def test_auc_and_ece_on_cases_worked_by_hand() -> None:
    assert auc([0.1, 0.9, 0.5], [False, True, False]) == 1.0
    assert auc([0.9, 0.1], [False, True]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5  # ties count half
    assert auc([0.2, 0.4, 0.4, 0.8], [False, True, False, True]) == pytest.approx(0.875)
    assert math.isnan(auc([0.1, 0.2], [True, True]))
    assert ece([0.95, 0.95, 0.05, 0.05], [1, 1, 0, 0]) == pytest.approx(0.05)
    assert ece([0.7, 0.7], [1, 0]) == pytest.approx(0.2)


def decision(outcome: CouncilOutcome, p: float) -> CouncilDecision:
    return CouncilDecision(
        outcome=outcome, probability=p, votes=[], quorum=1, policy="test", summary=""
    )


def test_figures_count_what_each_decision_did_with_the_outcome() -> None:
    """Two wasteful and three good requests: the approved wasteful one is auto-approved
    waste, the denied good one good work denied, the split one a human's."""
    f = features(random.Random(0))
    samples = [Sample(f, (), None, 0, w) for w in (1.0, 1.0, 0.0, 0.0, 0.0)]
    decisions = [
        decision(CouncilOutcome.APPROVED, 0.8),
        decision(CouncilOutcome.DENIED, 0.1),
        decision(CouncilOutcome.APPROVED, 0.9),
        decision(CouncilOutcome.DENIED, 0.2),
        decision(CouncilOutcome.SPLIT, 0.5),
    ]
    got = figures(decisions, samples)
    assert got["auto_approved_waste_rate"] == pytest.approx(1 / 2)
    assert got["good_work_denied_share"] == pytest.approx(1 / 5)
    assert got["human_share"] == pytest.approx(1 / 5)
    assert got["waste_rate"] == pytest.approx(2 / 5)
    # risk 1 - p: wasteful 0.2, 0.9; good 0.1, 0.8, 0.5 -> 4 of 6 pairs ranked right
    assert got["waste_auc"] == pytest.approx(4 / 6)


def test_the_habit_change_figure_ranks_only_requests_soon_after_a_change() -> None:
    """Two requests within CHANGE_DAYS after their project changed, ranked right; two long
    after, ranked wrong: the overall AUC is lower, the habit-change figure 1."""
    f = features(random.Random(0))
    day = 86400.0
    samples = [Sample(f, (), None, 0, w) for w in (1.0, 0.0, 1.0, 0.0)]
    for s, since in zip(samples, (1, 2, CHANGE_DAYS + 5, CHANGE_DAYS + 9), strict=True):
        s.changed_at = f.now - since * day
    decisions = [decision(CouncilOutcome.SPLIT, p) for p in (0.2, 0.8, 0.9, 0.1)]
    got = figures(decisions, samples)
    assert got["waste_auc_changed"] == 1.0 and got["changed_requests"] == 2
    assert got["waste_auc"] is not None and got["waste_auc"] < 1.0
    for s in samples:
        s.changed_at = math.inf  # a project that never changed
    assert figures(decisions, samples)["waste_auc_changed"] is None


def test_an_idle_tail_is_wasteful_by_its_share_and_lost_work_always() -> None:
    """8 h of work: a 30-minute idle tail is under a tenth of the 8.5 h held, a 1-hour
    one is not; an idle release or a budget cut before the work is done loses it."""
    assert wasteful(8.5, 76.0, ReleaseReason.IDLE, 8.0) == 0.0
    assert wasteful(9.0, 72.0, ReleaseReason.IDLE, 8.0) == 1.0
    assert wasteful(4.0, 80.0, ReleaseReason.IDLE, 8.0) == 1.0
    assert wasteful(4.0, 80.0, ReleaseReason.BUDGET, 8.0) == 1.0
    assert wasteful(8.0, 80.0, ReleaseReason.EXPLICIT, 8.0) == 0.0
    assert wasteful(8.0, 12.0, ReleaseReason.EXPLICIT, 8.0) == 1.0  # under 20 % utilisation


def test_a_stricter_idle_release_turns_some_wasteful_tails_good_and_never_the_reverse() -> None:
    """The same world's jobs with and without the guardrails' idle release, on the same
    draws: guarded, some end good that were wasteful, and none the other way (their work
    phases never idle long enough for even the stricter release)."""
    samples = World(synthetic_jobs(3, 30, 12), load_fleet(None), 3, 3).run()
    assert any(s.would_waste > s.would_waste_guarded for s in samples)
    assert all(s.would_waste >= s.would_waste_guarded for s in samples)


def test_work_that_only_bursts_is_wasted_under_any_guardrail() -> None:
    """A job whose work runs at a few per cent (Sample.low_util, the waste no guardrail on
    idle tails or budgets removes: benchmarks/waste_ceiling.py's bound) ends wasteful with
    the guardrails and without; the other jobs are the rest."""
    samples = World(synthetic_jobs(3, 30, 12), load_fleet(None), 3, 3).run()
    low = [s for s in samples if s.low_util]
    assert low and len(low) < len(samples)
    assert all(s.would_waste == s.would_waste_guarded == 1.0 for s in low)


def test_approved_with_guardrails_counts_as_approved_at_its_guarded_outcome() -> None:
    """Guarded approvals count in auto_approved_waste_rate at the outcome the job has under
    its guardrails, apart in guarded_share, never in the human share."""
    f = features(random.Random(0))
    samples = [Sample(f, (), None, 0, w) for w in (1.0, 0.0, 0.0, 1.0)]
    samples[0].would_waste_guarded = 1.0
    decisions = [
        decision(CouncilOutcome.GUARDED, 0.6),
        decision(CouncilOutcome.APPROVED, 0.9),
        decision(CouncilOutcome.APPROVED, 0.8),
        decision(CouncilOutcome.SPLIT, 0.4),
    ]
    got = figures(decisions, samples)
    assert got["auto_approved_waste_rate"] == pytest.approx(1 / 3)
    samples[0].would_waste_guarded = 0.0  # the guardrail ended its idle tail in time
    assert figures(decisions, samples)["auto_approved_waste_rate"] == 0.0
    assert got["approved_waste_rate"] == 0.0
    assert got["guarded_share"] == pytest.approx(1 / 4)
    assert got["human_share"] == pytest.approx(1 / 4)
    # a single model's band is split as a council's is, where a share is given
    assert [banded(p, 0.2, 0.8, "t", 0.5).outcome for p in (0.45, 0.55)] == [
        CouncilOutcome.SPLIT,
        CouncilOutcome.GUARDED,
    ]
    assert banded(0.55, 0.2, 0.8, "t").outcome is CouncilOutcome.SPLIT


def test_the_split_is_by_time_and_the_test_slice_is_the_last_thirty_percent() -> None:
    samples = world(0, SMALL, load_fleet(None))
    train, val, test = time_split(samples)
    assert len(train) + len(val) + len(test) == len(samples) and train and val and test
    start = min(s.features.now for s in samples)
    span = max(s.features.now for s in samples) - start
    assert max(s.features.now for s in train) < start + 0.6 * span
    assert all(start + 0.6 * span <= s.features.now < start + 0.7 * span for s in val)
    assert min(s.features.now for s in test) >= start + 0.7 * span


def test_every_voted_request_has_an_outcome_and_a_denied_ones_is_recorded_nowhere() -> None:
    """A request that ran has its own outcome; one the reference denied gets what it would
    have done, drawn on its own seed: the world's random stream, its running jobs and the
    project's history are as they were."""
    config = load_fleet(None)
    w = World(synthetic_jobs(7, 20, 8), config, 7, 7)
    samples = w.run()
    ran = [s for s in samples if s.wasted is not None]
    denied = [s for s in samples if s.wasted is None]
    assert ran and denied
    assert all(s.would_waste == s.wasted for s in ran)
    assert all(s.would_waste in (0.0, 1.0) for s in samples)
    assert all(s.would_waste_guarded in (0.0, 1.0) for s in samples)
    job = w.jobs[-1]
    habits = w.projects[job.project].at(job.submit)
    request = w._request(job, habits)
    assert request is not None
    state, running = w.rng.getstate(), list(w.running)
    past = {name: list(p.past) for name, p in w.projects.items()}
    plan = w._plan(job, request, habits, random.Random(1))
    w._play(plan, request, job.submit)
    w._play(plan, request, job.submit, guard_minutes=10)
    assert w.rng.getstate() == state and w.running == running
    assert {name: p.past for name, p in w.projects.items()} == past


def test_the_worlds_hold_a_guarded_lease_a_term_at_a_time_where_the_fleet_sets_one() -> None:
    """An approval with guardrails plays out in the worlds as nodes.monitor holds it: where
    the idle release is longer than a term, a term its GPUs sat idle all of is not renewed
    and the lease ends there (3 h of a 6 h lease, its work done at 1.5 h); a term ended
    while work was left loses it, which is wasteful. Where the idle release is shorter (the
    fleet's 30 minutes; no command runs in the worlds), it ends the idle tail first, as
    without a term; where the guardrails read the stream, it ends the tail sooner still."""
    base = load_fleet(None)

    def play(
        term: float | None,
        idle_minutes: float,
        phases: tuple[tuple[str, float], ...],
        release: str = "timeout",
        cut: float | None = None,
    ) -> tuple[float, ReleaseReason]:
        council = base.council.model_copy(
            update={"guard_share": 0.5, "guard_lease_hours": term, "guard_idle_release": release}
        )
        monitor = base.monitor.model_copy(update={"idle_timeout_minutes": idle_minutes})
        config = base.model_copy(update={"council": council, "monitor": monitor})
        w = World(synthetic_jobs(1, 2, 1), config, 1, 1)
        request = GPURequest(project="team-00", purpose="training", count=2, duration_hours=6)
        work = sum(h for p, h in phases if p != "hoard")
        held, util, reason = w._watch(request, _Plan("A100", 6.0, work, phases, cut), 0.0, 600)
        assert wasteful(held, util, reason, work) == float(held < work or held - work >= 0.6)
        return round(held, 6), reason

    hoards = (("train", 1.5), ("hoard", 4.5))
    assert play(1.0, 600, hoards) == (3.0, ReleaseReason.LEASE_EXPIRED)
    assert play(None, 600, hoards) == (6.0, ReleaseReason.LEASE_EXPIRED)
    # a budget that ends it between the decision and the term's end ends it there
    assert play(1.0, 600, hoards, cut=2.995) == (2.995, ReleaseReason.BUDGET)
    assert play(1.0, 30, hoards) == play(None, 30, hoards)
    assert play(1.0, 30, hoards)[1] is ReleaseReason.IDLE
    # work that pauses longer than a term is ended before it is done: lost, so wasteful
    assert play(1.0, 600, (("train", 1.0), ("hoard", 2.5), ("train", 2.5))) == (
        2.0,
        ReleaseReason.LEASE_EXPIRED,
    )
    # idling that began at a term's start is read a world's tick (10 minutes) later: still
    # idle all the term, as the monitor, reading every minute, would find it
    assert play(1.0, 600, (("train", 2.0), ("hoard", 4.0))) == (3.0, ReleaseReason.LEASE_EXPIRED)
    assert play(1.0, 600, (("train", 6.0),)) == (6.0, ReleaseReason.LEASE_EXPIRED)
    # where the guardrails read the stream, it ends the tail once the stream reads as ended:
    # its idle stretch begins at the tail's first 10-minute tick, 5 minutes are enough
    late = (("train", 3.0), ("hoard", 3.0))
    assert play(None, 600, late, "stream") == (round(3 + 2 / 6, 6), ReleaseReason.IDLE)
    assert play(None, 600, late) == (6.0, ReleaseReason.LEASE_EXPIRED)


def test_projects_differ_about_as_far_as_published_in_what_they_use_of_what_they_hold() -> None:
    """The calibration (council.dataset): with no monitor, a careless project's jobs would use
    a tenth or less of what they hold, a careful one's all its work runs at (the training
    profile's 81 %); hand-picked kinds of project spanned only 36 % to 81 %."""
    w = World(synthetic_jobs(3, 30, 24), load_fleet(None), 3, 3)
    w.run()
    used = w.unmanaged_util()
    ceiling = PROFILES["train"].mean_util + 1e-9
    assert len(used) == 24 and all(0 <= u <= ceiling for u in used.values())
    assert min(used.values()) < 15 and max(used.values()) > 75
    total = w.unmanaged_util_all()
    assert total is not None and min(used.values()) < total < max(used.values())


def test_evaluate_reports_every_policy_per_seed_with_means_and_the_first_on_top() -> None:
    config = load_fleet(None)
    policies = {
        "reference-rules": fixed(ReferenceCouncil().decide),
        "outcome-logistic": outcome_logistic,
        "approve-all": fixed(approve_all),
    }
    got = evaluate(policies, config, SMALL)
    assert got == json.loads(json.dumps(got))  # the same on a second look: plain data
    assert got["seeds"] == [0, 1] and got["policy"] == "reference-rules"
    families = got["families"]
    assert isinstance(families, dict)
    rules, everyone = families["reference-rules"], families["approve-all"]
    for key in FIGURES:
        assert got[key] == rules[f"{key}_mean"]
        assert f"{key}_sd" in rules
    assert len(rules["per_seed"]) == 2
    assert everyone["human_share_mean"] == 0.0 and everyone["good_work_denied_share_mean"] == 0.0
    assert everyone["waste_auc_mean"] == 0.5
    assert everyone["auto_approved_waste_rate_mean"] == pytest.approx(everyone["waste_rate_mean"])
    assert evaluate(policies, config, SMALL) == got  # seeded: the same figures again


def test_a_family_of_councils_is_pooled_over_its_training_seeds() -> None:
    """Councils named one family are reported as one, where the first of them stood: per
    figure the mean and sd over the family's members of each one's mean over the worlds."""
    config = load_fleet(None)
    policies = {
        "approve-all": fixed(approve_all),
        "a": fixed(ReferenceCouncil().decide),
        "b": fixed(approve_all),
    }
    alone = evaluate(policies, config, SMALL)["families"]
    got = evaluate(policies, config, SMALL, groups={"fam": {"a": 3, "b": 4}})
    families = got["families"]
    assert isinstance(families, dict) and isinstance(alone, dict)
    assert list(families) == ["approve-all", "fam"] and got["policy"] == "approve-all"
    fam = families["fam"]
    assert fam["training_seeds"] == [3, 4] and fam["waste_auc_n"] == 2
    means = [alone[name]["waste_auc_mean"] for name in ("a", "b")]
    assert fam["waste_auc_mean"] == pytest.approx(sum(means) / 2)
    assert fam["waste_auc_sd"] == pytest.approx(abs(means[0] - means[1]) / math.sqrt(2))
    entries = fam["per_training_seed"]
    assert [(e["weights"], e["training_seed"]) for e in entries] == [("a", 3), ("b", 4)]
    assert entries[0]["per_seed"] == alone["a"]["per_seed"]
    assert "fam (2 training seeds)" in report(got)


def test_a_learned_band_meets_its_goals_on_the_slice_it_was_chosen_on() -> None:
    """Approve where at most 5 % of the approved end wasteful, deny where at most 0.5 % of
    all requests are good work denied, each with 95 % confidence; between, a human."""
    rng = random.Random(3)
    p = [rng.random() ** 0.3 for _ in range(20000)]
    waste = [rng.random() > x for x in p]  # calibrated: p is the chance of no waste
    deny, approve = band(p, waste)
    assert deny < approve < BAND_CEILING and deny > BAND_FLOOR
    approved = [w for x, w in zip(p, waste, strict=True) if x >= approve]
    assert approved and upper(sum(approved), len(approved)) <= 0.05
    denied_good = sum(x <= deny and not w for x, w in zip(p, waste, strict=True))
    assert upper(denied_good, len(p)) <= 0.005
    good = [False] * 1000
    assert band([0.9, 0.8] * 500, good) == (BAND_FLOOR, 0.8)  # all good: approve all
    assert band([0.9, 0.8] * 500, [True] * 1000) == (0.9, BAND_CEILING)  # all wasteful: deny all


def test_a_band_decides_nothing_it_cannot_be_sure_of() -> None:
    """On two good requests nothing is certain: a 95 % bound on the waste of what is approved
    is far above 5 %, so the band approves nothing and denies nothing (all to a human). The
    bound is Wilson's: 0 of n seen gives z^2 / (n + z^2)."""
    assert band([0.9, 0.8], [False, False]) == (BAND_FLOOR, BAND_CEILING)
    assert upper(0, 1000) == pytest.approx(1.645**2 / (1000 + 1.645**2))
    assert upper(50, 1000) > 0.05 > upper(35, 1000)
    assert upper(0, 0) == 1.0


@pytest.mark.parametrize(
    ("p", "waste"),
    [
        ([], []),
        ([0.9, 0.8], [True, True]),  # no threshold meets the approval goal
        ([0.9, 0.8], [False, False]),  # none needs to deny
        ([0.5, 0.5, 0.5], [False, True, False]),  # one tie throughout
        ([0.0, 1.0, 1e-9, 1 - 1e-9], [True, False, True, False]),  # beyond the edges
        ([0.3, 0.6, 0.6, 0.9], [True, False, False, False]),  # the goals overlap
    ],
)
def test_a_band_is_always_finite_and_one_the_fleet_file_accepts(
    p: list[float], waste: list[bool]
) -> None:
    """ "Approve nothing" and "deny nothing" are the edges CouncilSettings accepts
    (0 < deny < approve < 1), never infinities: the band goes into JSON and weights files."""
    deny, approve = band(p, waste, [2.0] * len(p))
    assert BAND_FLOOR <= deny < approve <= BAND_CEILING
    CouncilSettings(deny_threshold=deny, approve_threshold=approve)
    json.dumps([deny, approve], allow_nan=False)


@pytest.mark.parametrize(("deny", "approve"), [(0.3, 0.7), (0.5, 0.5), (0.5, 0.4)])
def test_banded_decides_in_the_order_the_council_does(deny: float, approve: float) -> None:
    """Denied at or below `deny` first, then approved at or above `approve`, as
    council.voting.combine does, ties included."""
    settings = CouncilSettings().model_copy(
        update={"deny_threshold": deny, "approve_threshold": approve}
    )
    for p in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        vote = MemberVote(member="a", verdict=Verdict.APPROVE, probability=p, weight=1.0)
        expected = combine([vote], settings, "test").outcome
        assert banded(p, deny, approve, "test").outcome is expected, (p, deny, approve)


def test_approve_all_is_a_decision_like_any_other() -> None:
    d = approve_all(features(random.Random(1)), CouncilSettings())
    assert d.outcome is CouncilOutcome.APPROVED and d.probability == 1.0


def test_the_evaluate_command_prints_the_figures_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("council", "evaluate", "--seeds", "0", "--days", "20", "--projects", "8")
    done = run_cli(*args, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert set(FIGURES) <= set(got) and got["seeds"] == [0]
    assert list(got["families"]) == [  # both shipped councils first
        "cfc-council",
        "cfc-council-outcome",
        "reference-rules",
        "outcome-logistic",
        "oracle",
        "approve-all",
    ]
    alone = json.loads(run_cli(*args, "--weights", "outcome", "--json", cwd=tmp_path).stdout)
    assert alone["policy"] == "cfc-council-outcome"
    assert alone["families"]["cfc-council-outcome"] == got["families"]["cfc-council-outcome"]
    text = run_cli(*args, cwd=tmp_path)
    assert text.returncode == 0 and "waste_auc" in text.stdout and "approve-all" in text.stdout
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in SHIPPED.parent.glob("council.*"):
        shutil.copy(f, twin / f.name)
    blob = torch.load(SHIPPED, weights_only=True)  # the same weights, said to be seed 1's
    weightfiles.write(tmp_path / "seed1.pt", blob | {"spec": blob["spec"] | {"seed": 1}})
    family = ("--weights", f"cfc={SHIPPED}", "--weights", f"cfc={tmp_path / 'seed1.pt'}")
    done = run_cli(*args, *family, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    cfc = got["families"]["cfc"]
    assert got["policy"] == "cfc" and cfc["training_seeds"] == [0, 1]
    assert cfc["waste_auc_sd"] == 0.0 and got["waste_auc"] == cfc["waste_auc_mean"]
    for bad in (
        ("--seeds", "x"),
        ("--seeds", ""),
        ("--seeds", "-900000"),
        ("--seeds", "0,0"),
        ("--days", "0"),
        ("--days", "nan"),
        ("--projects", "1"),
        ("--projects", "100000"),
        ("--weights", str(tmp_path / "missing.pt")),
        ("--weights", "cfc="),
        ("--weights", "a.pt", "--weights", "a.pt"),
        ("--weights", "outcome", "--weights", "outcome"),
        ("--weights", f"cfc={SHIPPED}", "--weights", f"cfc={twin / SHIPPED.name}"),  # seed 0 twice
        ("--weights", f"cfc={SHIPPED}", "--weights", "cfc=outcome"),  # trained otherwise
        ("--card",),  # whose card?
        ("--card", "--weights", "outcome", "--weights", str(SHIPPED)),
        ("--card", "--weights", f"cfc={SHIPPED}"),
        ("--card", "--weights", str(tmp_path / "twin" / "missing" / "council.pt")),
    ):
        assert cli_in_process("council", "evaluate", *bad, "--json") == 2, bad
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and json.loads(out)["error"], err


def test_council_evaluate_reproduces_the_shipped_cards_figures() -> None:
    """Each shipped council's card holds the section `council evaluate --weights W --card`
    writes: the same figures on the same five fresh worlds, beside the same baselines."""
    config = load_fleet(None)
    shipped = {"rules-trained": SHIPPED, "on-outcomes": SHIPPED_OUTCOME}
    councils = {name: fixed(NeuralCouncil.load(path).decide) for name, path in shipped.items()}
    result = evaluate(councils | baselines(), config, EvalSettings())
    header, *rows = figure_rows(result)
    for name, path in shipped.items():
        own = [header, *(r for r in rows if r[0] == name or r[0] not in shipped)]
        card = (path.parent / "MODEL_CARD.md").read_text()
        assert evaluation_section(result, own) in card, name


def test_the_card_section_is_replaced_where_a_card_has_one_else_set_before_its_limits() -> None:
    card = "# Card\n\n## Data\nx\n\n## Known limits\n- y\n"
    first = with_section(card, f"{EVALUATED}\n\nold\n")
    assert first == f"# Card\n\n## Data\nx\n\n{EVALUATED}\n\nold\n\n## Known limits\n- y\n"
    assert with_section(first, f"{EVALUATED}\n\nnew\n") == first.replace("old", "new")
    assert with_section("# Card\n", f"{EVALUATED}\n") == f"# Card\n\n{EVALUATED}\n"


def test_exploration_runs_a_seeded_share_of_what_the_rules_deny() -> None:
    """With exploration some requests the reference denies run anyway, with that share as
    their propensity; without it none do. The same seed explores the same requests."""
    config = load_fleet(None)
    jobs = synthetic_jobs(11, 30, 10)
    plain = World(jobs, config, 11, 11).run()
    explored = World(jobs, config, 11, 11, explore=0.5).run()
    assert all(s.propensity == 1.0 for s in plain)
    denied = [s for s in explored if s.propensity == 0.5]  # the rules said no: a coin decides
    ran = sum(s.wasted is not None for s in denied)
    assert 0 < ran < len(denied)
    assert [s.propensity for s in World(jobs, config, 11, 11, explore=0.5).run()] == [
        s.propensity for s in explored
    ]


def test_a_council_trained_on_outcomes_learns_a_band_and_decides_with_it(tmp_path: Path) -> None:
    """Target `outcome`: the weights carry the band chosen on the threshold slice; a council
    loaded from them decides with it unless the fleet file sets thresholds; deterministic;
    monotone; the card says what it learned."""
    s = TrainSettings(
        worlds=3, world_days=20, world_projects=8, steps=20, batch=64, target="outcome"
    )
    config = load_fleet(None)
    a = train(s, config, tmp_path / "a", log=lambda _: None)
    b = train(s, config, tmp_path / "b", log=lambda _: None)
    for timings in (a, b):
        del timings["seconds"], timings["council_seconds"]
    assert a == json.loads(json.dumps(b, allow_nan=False))  # no NaN, no Infinity
    council = NeuralCouncil.load(tmp_path / "a" / WEIGHTS_FILE)
    assert council.members == OUTCOME_MEMBERS and council.band is not None
    # each member's say, fitted on the threshold slice with the temperature
    assert list(council.vote_weights) == a["vote_weights"] and len(council.vote_weights) == 4
    assert abs(sum(council.vote_weights) - 1) < 1e-5
    test = a["test"]
    assert isinstance(test, dict)
    assert test["band"] == list(council.band) and test["monotonicity"]["violations"] == 0
    deny, approve = council.band
    f = features(random.Random(5))
    d = council.decide(f, CouncilSettings())
    expected = (
        CouncilOutcome.DENIED
        if d.probability <= deny
        else CouncilOutcome.APPROVED
        if d.probability >= approve
        else CouncilOutcome.SPLIT
    )
    assert d.outcome is expected or (expected is CouncilOutcome.APPROVED and "quorum" in d.summary)
    assert 0.001 < d.probability < 0.998  # the fleet file's thresholds take over:
    strict = CouncilSettings(deny_threshold=0.998, approve_threshold=0.999)
    assert council.decide(f, strict).outcome is CouncilOutcome.DENIED
    lenient = CouncilSettings(deny_threshold=0.001, approve_threshold=0.002)
    assert council.decide(f, lenient).outcome is not CouncilOutcome.DENIED
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "trained on outcomes" in card and "1 / the chance it had to run" in card


def test_a_gru_family_trains_on_the_same_data_and_decides_on_numpy(tmp_path: Path) -> None:
    """`council train --core gru --time input`: the same members, data and steps with a GRU
    reading log(1 + dt); the weights load into the numpy forward, which agrees with torch,
    and stay monotone."""
    s = TrainSettings(
        worlds=3,
        world_days=20,
        world_projects=8,
        steps=10,
        batch=64,
        target="outcome",
        core="gru",
        time="input",
    )
    metrics = train(s, load_fleet(None), tmp_path, log=lambda _: None)
    council = NeuralCouncil.load(tmp_path / WEIGHTS_FILE)
    assert (council.model.spec.core, council.model.spec.time) == ("gru", "input")
    test = metrics["test"]
    assert isinstance(test, dict) and test["monotonicity"]["violations"] == 0
    batch = [features(random.Random(i)) for i in range(8)]
    torch_p = council.probabilities(batch).double().numpy()
    numpy_p = 1 / (1 + np.exp(-council.model.logits(encode_arrays(batch))))
    assert np.abs(torch_p - numpy_p).max() < 1e-5
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "the GRU (log(1 + dt) as an input) council" in card and "--core gru" in card


def test_an_auc_with_nothing_to_rank_is_none_not_nan() -> None:
    """Training's metrics go into JSON: a test slice of one class has no AUC (None)."""
    assert train_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])) is None
    assert train_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 1.0])) == 1.0


def test_the_effective_sample_size_is_kish_s() -> None:
    assert ess([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert ess([1.0, 3.0]) == pytest.approx(16 / 10)  # one heavy weight: less than two
    assert ess([20.0]) == pytest.approx(1.0)
    assert ess([]) is None


def test_evaluate_says_what_each_slice_offers_to_learn_from() -> None:
    """Per seed and slice: voted requests, those that ran, those known by the slice's end,
    the explored among them and the effective sample size of their weights; in the JSON
    and in the text."""
    got = evaluate({"approve-all": fixed(approve_all)}, load_fleet(None), SMALL)
    slices = got["slices"]
    assert isinstance(slices, list) and [s["seed"] for s in slices] == [0, 1]
    for entry in slices:
        for part in ("train", "validation", "test"):
            s = entry[part]
            assert set(s) == {"requests", "ran", "known", "explored", "ess"}
            assert s["requests"] >= s["ran"] >= s["known"] >= s["explored"] >= 0
            assert s["ess"] is not None and 0 < s["ess"] <= s["known"]
    text = report(got)
    assert "explored" in text and "ess" in text
    assert f"0      train       {slices[0]['train']['requests']}" in text


def test_a_learner_sees_only_the_outcomes_known_when_its_slice_ends() -> None:
    """A job that ran in the training slice but ended after the slice's end has an outcome
    nobody knew at the cut: evaluate's learners never see it (world 0 of SMALL has one)."""
    config = load_fleet(None)
    samples = world(0, SMALL, config)
    train, val, _ = time_split(samples)
    train_end, val_end = cuts(samples)
    late = [s for s in train if s.wasted is not None and s.outcome_at(train_end) is None]
    assert late and all(s.ended_at is not None and s.ended_at > train_end for s in late)
    assert late[0].outcome_at(math.inf) == late[0].wasted
    seen: list[list[Sample]] = []

    def spy(
        train: list[Sample], val: list[Sample], test: list[Sample], settings: CouncilSettings
    ) -> list[CouncilDecision]:
        seen.extend((train, val))
        return [approve_all(s.features, settings) for s in test]

    evaluate({"spy": spy}, config, EvalSettings(seeds=(0,), days=20, projects=8))
    assert seen[0] == known(train, train_end) and seen[1] == known(val, val_end)
    assert not any(s in seen[0] for s in late)
    assert all(s.ended_at is not None and s.ended_at <= train_end for s in seen[0])


def test_training_on_outcomes_masks_those_not_known_at_the_slice_end() -> None:
    """`council train --target outcome`: in the training and threshold slices, an outcome
    counts only where the job had ended by the slice's end; the test slice keeps all."""
    s = TrainSettings(worlds=1, world_days=20, world_projects=10, target="outcome")
    config = load_fleet(None)
    train_split, val_split, test_split = outcome_datasets(s, config)
    samples = replay([(0, synthetic_jobs(0, 20, 10))], config, 0, s.explore)
    train_end, val_end = cuts(samples)
    for split, cut in ((train_split, train_end), (val_split, val_end), (test_split, math.inf)):
        expected = [x.outcome_at(cut) is not None for x in split.samples]
        assert split.known.tolist() == expected
    ran = sum(x.wasted is not None for x in train_split.samples)
    assert int(train_split.known.sum()) < ran  # some ended after the cut


def test_means_over_seeds_say_how_many_seeds_they_rest_on() -> None:
    assert spread([None, 0.5]) == {"mean": 0.5, "sd": None, "n": 1}
    got = spread([0.2, None, 0.4])
    assert got["mean"] == pytest.approx(0.3) and got["n"] == 2
    assert got["sd"] == pytest.approx(math.sqrt(0.02))
    assert spread([None, None]) == {"mean": None, "sd": None, "n": 0}
    family = {"waste_auc_mean": 0.7, "waste_auc_sd": None, "waste_auc_n": 1}
    assert cell(family, "waste_auc", 3) == "0.700 (n=1)"
    result = evaluate({"approve-all": fixed(approve_all)}, load_fleet(None), SMALL)
    families = result["families"]
    assert isinstance(families, dict)
    assert families["approve-all"]["waste_auc_n"] == 2


def test_a_world_with_an_empty_slice_is_refused() -> None:
    """Too short a span or too few projects to put a voted request in every slice: a clear
    error, not empty figures (world 8 of 7 days and 2 projects has no threshold slice)."""
    tiny = EvalSettings(seeds=(8,), days=7, projects=2)
    with pytest.raises(InvalidInput, match="no voted request in its threshold slice"):
        evaluate({"approve-all": fixed(approve_all)}, load_fleet(None), tiny)


def test_evaluate_refuses_a_fleet_that_guards_by_gpu_hours() -> None:
    """The baselines' bands are on the probability alone: a size rule would judge the
    councils and not them, so it is refused before any world is built."""
    config = load_fleet(None)
    sized = config.council.model_copy(update={"guard_share": 0.5, "guard_gpu_hours": 8.0})
    with pytest.raises(InvalidInput, match="leave guard_gpu_hours out"):
        evaluate(
            {"approve-all": fixed(approve_all)}, config.model_copy(update={"council": sized}), SMALL
        )


@pytest.mark.parametrize(
    "args",
    [
        ("--explore", "0.1"),  # the reference target runs nothing the rules deny
        ("--target", "outcome", "--explore", "0.6"),
        ("--target", "outcome", "--explore", "0"),
        ("--target", "outcome", "--explore", "-0.05"),
        ("--target", "outcome", "--explore", "nan"),
    ],
)
def test_train_refuses_an_explore_share_it_cannot_use(
    args: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--explore: with --target outcome only, above 0 and at most 0.5; one line, a JSON
    error with --json, nothing written."""
    code = main(["council", "train", "--out", str(tmp_path / "w"), *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "--explore" in err, err
    assert "--explore" in json.loads(out)["error"]
    assert not (tmp_path / "w").exists()


def test_train_refuses_an_out_it_cannot_write_before_it_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --out that is a file, or lies under one, is refused in one line before any
    training starts; the file is left as it was."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr("council.train.train", never)
    file = tmp_path / "file"
    file.write_text("kept")
    for out in (file, file / "sub"):
        code = main(["council", "train", "--out", str(out), "--target", "outcome"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "is a file" in err, err
    assert file.read_text() == "kept"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_train_refuses_an_out_in_a_folder_it_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InvalidInput, match="cannot write in"):
        writable_dir(locked / "w", "--out")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--days", "1e-9"), "--days must be from 7"),
        (("--days", "6.9"), "--days must be from 7"),
        (("--days", "7", "--projects", "2", "--seeds", "8"), "no voted request"),
    ],
)
def test_evaluate_refuses_a_span_too_short_for_its_slices(
    args: tuple[str, ...], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Too short a world is one line and a non-zero exit, never empty figures."""
    code = main(["council", "evaluate", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
