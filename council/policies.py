"""The council a fleet file asks for by its policy: the shipped (or named) neural weights, or
the reference rules; and no council at all, the baseline both are measured against. Apart
from voting, which both policies' members vote through."""

from __future__ import annotations

from council.features import RequestFeatures
from council.voting import Council
from fleet.config import CouncilSettings
from fleet.models import CouncilDecision, CouncilOutcome


def council_for(settings: CouncilSettings) -> Council:
    """The council of `settings.policy`; each is imported only when chosen."""
    if settings.policy == "reference":
        from council.rules import ReferenceCouncil

        return ReferenceCouncil()
    from council.neural_council import NeuralCouncil

    return NeuralCouncil.load(settings.weights)


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


class NoCouncil:
    """No council at all: every request it is asked about is approved (the baseline a
    council is measured against: council evaluate's approve-all, `gpu-agent simulate
    --policies gpu-agent-no-council`)."""

    name = "none"

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
        return approve_all(features, settings)
