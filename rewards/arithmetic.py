"""Reward for arithmetic answers written as ``<answer>N</answer>`` after an optional ``<think>`` block.

Only the text after the last ``</think>`` counts: an answer that appears only inside the thinking
part earns nothing, and a response that opens ``<think>`` and never closes it (cut off by max_tokens
mid-thought) is all thinking and earns 0. Exactly one answer tag is allowed, so a response cannot
hedge with several.
"""

import re

from rewards.types import RewardResult

_ANSWER = re.compile(r"<answer>\s*(-?[0-9]+)\s*</answer>")  # ASCII digits only: \d also matches other scripts


def strip_thinking(response: str) -> str | None:
    """The part of a response after its reasoning block (all of it when there is none); None when a
    ``<think>`` is never closed (all thinking)."""
    head, sep, tail = response.rpartition("</think>")
    if sep:
        return tail
    return None if "<think>" in response else response


def score_arithmetic(response: str, expected: int) -> RewardResult:
    """1.0 for exactly one ``<answer>`` equal to ``expected`` outside the thinking part, else 0.0."""
    tail = strip_thinking(response)
    if tail is None:
        return RewardResult(0.0, "unclosed <think>: the whole response is thinking")
    answers = _ANSWER.findall(tail)
    if not answers:
        return RewardResult(0.0, "no <answer>N</answer> after the thinking part")
    if len(answers) > 1:
        return RewardResult(0.0, f"{len(answers)} answers given; exactly one is allowed")
    got = int(answers[0])
    if got != expected:
        return RewardResult(0.0, f"answered {got}, expected {expected}")
    return RewardResult(1.0, "correct")
