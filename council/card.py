"""The model card written beside the weights: data, metrics, ablations, known limits; and
the section `gpu-agent council evaluate --card` adds, its figures on fresh worlds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

EVALUATED = "## On fresh worlds (`gpu-agent council evaluate`)"
LIMITS = "## Known limits"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _auc(x: float | None) -> str:
    return "- (one class only)" if x is None else f"{x:.3f}"


def model_card(m: dict[str, Any]) -> str:
    if m["settings"].get("target") == "outcome":
        return outcome_card(m)
    t = m["test"]
    esc = t["escalation"]
    mono = t["monotonicity"]
    s = m["settings"]
    lines = [
        "# Model card: the CfC council",
        "",
        f"Written by `gpu-agent council train --seed {s['seed']}` on the CPU: data and the "
        f"six members in {m['council_seconds']} s, {m['seconds']} s with the ablations. Every "
        "figure below comes from that run (also in `metrics.json`).",
        "",
        "## What it is",
        f"Six members ({', '.join(t['members'])}), each a closed-form continuous-time (CfC) "
        "cell over the project's record (past allocations in time order, the time since the "
        "previous one as the gate's dt, in days) ending with the request, plus monotone "
        "evidence accumulators for idling, overruns and low utilisation, and a vote head. "
        f"{m['params']} parameters in all. The vote is a weighted soft vote, temperature "
        f"scaled after averaging (T = {m['temperature']:.3f}, fitted on validation worlds).",
        "",
        "## Data",
        f"Project histories replayed on the simulated fleet: {s['worlds']} synthetic worlds "
        f"({s['world_projects']} projects over {s['world_days']:g} days each, seeded habits "
        "that change once), "
        + (
            f"plus the trace {s['trace']} (first {s['trace_jobs']} jobs, split by time). "
            if s["trace"] not in (None, "None")
            else "no trace. "
        )
        + "Each request the council would vote on is labelled by the reference policy "
        "(council/rules.py): each perspective member learns its own rule's probability, "
        "the general members learn the reference council's. An auxiliary head learns the "
        "outcome the replay recorded for each job that ran (council.dataset.wasteful). "
        "Worlds are split whole: "
        f"{m['data']['train']} training, {m['data']['validation']} validation and "
        f"{m['data']['test']} test requests.",
        "",
        "## Held-out results (test worlds)",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy against the reference (leans approve or deny) | {t['accuracy']:.4f} |",
        f"| best single member's accuracy | {t['best_member_accuracy']:.4f} |",
        f"| expected calibration error (10 bins) | {t['ece']:.4f} |",
        f"| Brier score | {t['brier']:.4f} |",
        f"| monotonicity violations on the grid sweep | {mono['violations']} of "
        f"{mono['checks']} checks |",
        f"| errors before escalation | {esc['errors']} |",
        f"| split votes sent to a human | {esc['escalated']} ({_pct(esc['escalated_share'])}) |",
        f"| errors left after escalation | {esc['errors_after_escalation']} "
        f"({_pct(esc['errors_removed_share'])} removed) |",
        f"| AUC of the auxiliary waste prediction | {_auc(t['waste_auc'])} |",
        "",
        "| member | accuracy against the council's reference | against its own rule |",
        "| --- | --- | --- |",
        *[
            f"| {k} | {v['accuracy_vs_council']:.4f} | {v['accuracy_vs_own_target']:.4f} |"
            for k, v in t["members"].items()
        ],
        "",
    ]
    if "ablations" in m:
        lines += [
            "## Ablations (one general member each, same data, steps and seed)",
            "",
            "| model | test accuracy | ECE |",
            "| --- | --- | --- |",
            *[f"| {k} | {v['accuracy']:.4f} | {v['ece']:.4f} |" for k, v in m["ablations"].items()],
            "",
            _verdict(m["ablations"]),
            "",
        ]
    lines += [
        "## Known limits",
        "- It imitates a rule policy on synthetic and replayed histories; it is as good as "
        "those rules, and judged against them. Real outcomes only enter as an auxiliary "
        "head, not as the label: denied requests have no outcome (selective labels).",
        "- Utilisation profiles come from the simulated fleet, calibrated on one H200 "
        "recording; a fleet whose jobs look different needs retraining "
        "(`gpu-agent council train`).",
        "- Monotonicity holds by construction for overruns, idling, utilisation and cost "
        "pressure only; other inputs (fair share, pool load, request size) are free.",
        "- Histories longer than the configured number of events enter as one summary step.",
        "",
    ]
    return "\n".join(lines)


def _verdict(ab: dict[str, dict[str, float]]) -> str:
    name = next(k for k in ab if k.startswith("cfc (time in the gate)"))
    cfc = ab[name]["accuracy"]
    others = {k: v["accuracy"] for k, v in ab.items() if k != name}
    best = max(others, key=lambda k: others[k])
    if others[best] >= cfc - 0.002:
        return (
            f"Honestly: `{best}` matches or beats the CfC here "
            f"({others[best]:.4f} against {cfc:.4f}); the council's case rests on its "
            "monotone construction, explanations and calibration, not on accuracy "
            "the baselines cannot reach."
        )
    return (
        f"The CfC with time in its gate is the most accurate variant ({cfc:.4f}); the "
        f"closest baseline is `{best}` ({others[best]:.4f})."
    )


def _weights(m: dict[str, Any]) -> str:
    return ", ".join(f"{k} {w:.2f}" for k, w in zip(m["members"], m["vote_weights"], strict=True))


def outcome_card(m: dict[str, Any]) -> str:
    """The card of a council trained on outcomes (council.train, target "outcome")."""
    t, s = m["test"], m["settings"]
    core, time = s.get("core", "cfc"), s.get("time", "gate")
    cell = "CfC" if core == "cfc" else "GRU"
    cell += (
        "" if time == "gate" else " (log(1 + dt) as an input)" if time == "input" else " (no time)"
    )
    flags = "" if (core, time) == ("cfc", "gate") else f" --core {core} --time {time}"
    mono = t["monotonicity"]
    deny, approve = t["band"]
    return "\n".join(
        [
            f"# Model card: the {cell} council trained on outcomes",
            "",
            f"Written by `gpu-agent council train --target outcome --seed {s['seed']}{flags}` "
            "on the "
            f"CPU in {m['seconds']} s. Every figure below comes from that run (also in "
            "`metrics.json`).",
            "",
            "## What it learns",
            f"Members {', '.join(m['members'])}: each a {cell} cell over the project's record "
            "with monotone evidence accumulators, as the reference-trained council, "
            f"{m['params']} parameters in all. Each learns whether a request that ran ended "
            "without waste (its work not lost to an idle release or a budget cut, under a "
            "tenth of its hours held idle with no work left, at least 20 % utilisation; "
            "council.dataset.wasteful). Only requests that ran have an outcome: the logging "
            "policy (the "
            f"reference rules) ran {_pct(s['explore'])} of those it denied anyway, seeded, "
            "and each request that ran weighs 1 / the chance it had to run.",
            "",
            "## Data",
            f"{s['worlds']} synthetic worlds ({s['world_projects']} projects over "
            f"{s['world_days']:g} days each), each split by time: the first 60 % trains "
            f"({m['data']['train']} voted requests), the next 10 % sets each member's weight "
            f"in the vote ({_weights(m)}), the temperature (T = {m['temperature']:.3f}) and "
            f"the band ({m['data']['validation']}), the last "
            f"30 % is the test ({m['data']['test']}); on the test slice every request's "
            "outcome is known, ran or not, because the worlds are simulated.",
            "",
            "## Test slice",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| AUC of 1 - p(approve) for a wasteful outcome | {_auc(t['waste_auc'])} |",
            f"| expected calibration error against the outcome | {t['ece']:.4f} |",
            f"| band: denied at p <= {deny:.3f}, approved at p >= {approve:.3f} | |",
            f"| approved requests that ended wasteful | {_pct(t['auto_approved_waste_rate'])} |"
            if t["auto_approved_waste_rate"] is not None
            else "| approved requests that ended wasteful | none approved |",
            f"| voted requests sent to a human | {_pct(t['human_share'])} |",
            f"| voted requests denied that would not have been wasted | "
            f"{_pct(t['good_work_denied_share'])} |",
            f"| wasteful requests among all voted | {_pct(t['waste_rate'])} |",
            f"| monotonicity violations on the grid sweep | {mono['violations']} of "
            f"{mono['checks']} checks |",
            "",
            "## Known limits",
            "- The band asks that at most 5 % of what it approves ends wasteful and that at "
            "most 0.5 % of the requests are good work denied, each with 95 % confidence on "
            "the threshold slice (a Wilson upper bound): the requests it cannot tell "
            f"that surely ({_pct(t['human_share'])} of the test slice's) fall between its "
            "thresholds and go to a human. `gpu-agent council evaluate` compares it with the "
            "rules, a logistic regression on the same outcomes and a heuristic that reads each "
            "project's habits.",
            "- Utilisation profiles come from the simulated fleet, calibrated on one H200 "
            "recording.",
            "",
        ]
    )


def evaluation_section(
    result: Mapping[str, Any], rows: Sequence[Sequence[str]], fleet: str | None = None
) -> str:
    """The card's section of `council evaluate`'s figures for these weights (the first row
    of `rows`, council.evaluate.figure_rows) beside its baselines; `fleet`: the fleet
    file's name where one was given (its band, guarded share)."""
    seeds, world = result["seeds"], result["world"]
    header, first, *rest = rows
    body = [["these weights", *first[1:]], *rest]
    return "\n".join(
        [
            EVALUATED,
            "",
            "`gpu-agent council evaluate --weights THIS/council.pt"
            + ("" if fleet is None else f" --fleet {fleet}")
            + " --card` wrote this section: "
            f"on the last 30 % of {len(seeds)} world{'s' * (len(seeds) != 1)} never trained "
            "on (seeds "
            f"{', '.join(map(str, seeds))}; {world['projects']} projects over "
            f"{world['days']:g} days each), mean ± sd over the worlds, beside the baselines.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + " --- |" * len(header),
            *("| " + " | ".join(r) + " |" for r in body),
            "",
        ]
    )


def with_section(card: str, section: str) -> str:
    """`card` with `section` in place of its evaluation section, else before its limits."""
    start = card.find(EVALUATED)
    if start >= 0:
        end = card.find("\n## ", start + len(EVALUATED))
        return card[:start] + section + ("\n" + card[end + 1 :] if end >= 0 else "")
    at = card.find(LIMITS)
    return card + "\n" + section if at < 0 else card[:at] + section + "\n" + card[at:]
