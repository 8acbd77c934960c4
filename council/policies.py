"""The council a fleet file asks for by its policy: the shipped (or named) neural weights, or
the reference rules; and no council at all, the baseline both are measured against. Apart
from voting, which both policies' members vote through."""

from __future__ import annotations

from council.features import RequestFeatures
from council.guardrails import guardrails
from council.voting import Council, gpu_hours_asked, gpu_hours_at_risk, worth_guarding
from fleet.config import CouncilSettings
from fleet.models import CouncilDecision, CouncilOutcome


def council_for(settings: CouncilSettings) -> Council:
    """The council of `settings.policy`; each is imported only when chosen."""
    if settings.policy == "reference":
        from council.rules import ReferenceCouncil

        return ReferenceCouncil()
    from council.neural_council import NeuralCouncil

    return NeuralCouncil.load(settings.weights)


NO_COUNCIL_P = 0.5  # with no council, the chance of waste is unknown: an even one


def approve_all(features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
    """The baseline with no council: every request approved; where the fleet guards by the
    GPU-hours at risk (`guard_gpu_hours`), those at risk at an even chance of waste with
    guardrails, so that guarding by size alone is a baseline too."""
    at_risk = gpu_hours_at_risk(NO_COUNCIL_P, gpu_hours_asked(features), settings)
    if at_risk is not None and worth_guarding(at_risk, settings):
        # the fleet's guardrails, but no cheaper type: with no council nothing ranks the risk
        rails = guardrails(NO_COUNCIL_P, settings, at_risk).model_copy(
            update={"cheaper_type": False}
        )
        return CouncilDecision(
            outcome=CouncilOutcome.GUARDED,
            probability=NO_COUNCIL_P,
            votes=[],
            quorum=settings.quorum,
            policy="none",
            summary=f"approved with guardrails: no council; {at_risk:.1f} GPU-hours at risk",
            guardrails=rails,
        )
    return CouncilDecision(
        outcome=CouncilOutcome.APPROVED,
        probability=1.0,
        votes=[],
        quorum=settings.quorum,
        policy="none",
        summary="approved: no council",
    )


class NoCouncil:
    """No council at all: every request it is asked about is approved (the baseline a
    council is measured against: council evaluate's approve-all, `gpu-agent simulate
    --policies gpu-agent-no-council`)."""

    name = "none"

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
        return approve_all(features, settings)
