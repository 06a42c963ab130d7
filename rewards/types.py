"""The one result type every reward function returns."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardResult:
    """A score in [0, 1] and the verifier's reason, kept in traces so a reward can be explained."""

    reward: float
    reason: str
    breakdown: dict[str, float] = field(default_factory=dict)  # parts of the score, e.g. tests passed
