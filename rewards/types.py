"""The one result type every reward function returns."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    """A score in [0, 1] and the verifier's reason, kept in traces so a reward can be explained."""

    reward: float
    reason: str
