"""The small interface between the harness and an environment.

An environment hands out tasks (chat messages plus the ground truth its verifier needs) and scores a
response to one. In-process environments implement it directly; NeMo Gym servers implement it over HTTP.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from rewards.types import RewardResult

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Task:
    """One prompt for the policy and the ground truth to score its answers."""

    id: str
    messages: list[dict[str, str]]
    ground_truth: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    name: str

    def tasks(self, split: Split) -> list[Task]:
        """All tasks of a split; ``eval`` tasks are held out from training."""
        ...

    def verify(self, task: Task, response: str) -> RewardResult:
        """Score one response (the model's text after the prompt)."""
        ...

    def warmup_examples(self, n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
        """(prompt messages, response text) pairs for the supervised warm-up of a tiny model."""
        ...
