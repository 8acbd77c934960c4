"""The council a fleet file asks for by its policy: the shipped (or named) neural weights, or
the reference rules. Apart from voting, which both policies' members vote through."""

from __future__ import annotations

from council.voting import Council
from fleet.config import CouncilSettings


def council_for(settings: CouncilSettings) -> Council:
    """The council of `settings.policy`; each is imported only when chosen."""
    if settings.policy == "reference":
        from council.rules import ReferenceCouncil

        return ReferenceCouncil()
    from council.neural_council import NeuralCouncil

    return NeuralCouncil.load(settings.weights)
