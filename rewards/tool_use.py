"""Rewards for tool-use episodes, judged by what happened on the server, not only by what the model says.

A key-value copy task succeeds when the target key holds the source key's original value and no
other key was changed or added: a model that writes everywhere, or only claims success, earns 0.
A lookup succeeds when the answer is the stored value and the episode read that key: a guess that
happens to be right earns 0.
"""

from rewards.arithmetic import score_arithmetic
from rewards.types import RewardResult


def score_kv_copy(initial: dict[str, str], final: dict[str, str], source: str, target: str) -> RewardResult:
    """1.0 when ``final`` is ``initial`` plus ``target`` set to ``initial[source]``, else 0.0."""
    want = dict(initial) | {target: initial[source]}
    if final.get(target) is None:
        return RewardResult(0.0, f"key {target!r} was never set")
    if final[target] != initial[source]:
        return RewardResult(0.0, f"key {target!r} holds {final[target][:40]!r}, expected {initial[source]!r}")
    if final != want:
        changed = sorted(k for k in set(final) | set(want) if final.get(k) != want.get(k))
        return RewardResult(0.0, f"other keys changed: {', '.join(changed)[:100]}")
    return RewardResult(1.0, "correct end state")


def score_lookup(response: str, store: dict[str, str], key: str, read: set[str]) -> RewardResult:
    """1.0 when the episode read ``key`` with its tool and answered ``<answer>store[key]</answer>``, else 0.0."""
    if key not in read:
        return RewardResult(0.0, f"answered without reading key {key!r}")
    return score_arithmetic(response, int(store[key]))
