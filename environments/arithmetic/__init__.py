"""Single-digit arithmetic (``a+b``, ``a-b``) with the answer in ``<answer>N</answer>``.

The held-out eval split is a fixed, seeded subset of the facts that training never samples. The
warm-up text teaches the answer format but is deliberately unreliable: only ``warmup_correct`` of its
answers are right, the rest are the off-by-one mistake, so the starting policy prefers a wrong answer
under greedy decoding and RL has something real to fix.
"""

import random
from dataclasses import dataclass

from gymrl.envs.base import Split, Task
from rewards.arithmetic import score_arithmetic
from rewards.types import RewardResult


@dataclass
class ArithmeticEnv:
    name: str = "arithmetic"
    max_operand: int = 9
    eval_fraction: float = 0.2
    warmup_correct: float = 0.3
    seed: int = 0

    def _facts(self) -> list[tuple[int, str, int, int]]:
        n = range(self.max_operand + 1)
        adds = [(a, "+", b, a + b) for a in n for b in n]
        subs = [(a, "-", b, a - b) for a in n for b in n if a >= b]
        return adds + subs

    def _split(self) -> dict[str, list[tuple[int, str, int, int]]]:
        facts = self._facts()
        random.Random(self.seed).shuffle(facts)
        n_eval = max(1, int(len(facts) * self.eval_fraction))
        return {"eval": facts[:n_eval], "train": facts[n_eval:]}

    @staticmethod
    def _task(a: int, op: str, b: int, result: int) -> Task:
        return Task(
            id=f"{a}{op}{b}",
            messages=[{"role": "user", "content": f"What is {a}{op}{b}?"}],
            ground_truth={"expected": result},
        )

    def tasks(self, split: Split) -> list[Task]:
        return [self._task(*fact) for fact in self._split()[split]]

    def verify(self, task: Task, response: str) -> RewardResult:
        return score_arithmetic(response, int(task.ground_truth["expected"]))

    def warmup_examples(self, n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
        rng = random.Random(seed)
        facts = self._facts()
        examples = []
        for _ in range(n):
            a, op, b, result = rng.choice(facts)
            answer = result if rng.random() < self.warmup_correct else result + 1
            examples.append((self._task(a, op, b, result).messages, f"<think>{a}{op}{b}</think><answer>{answer}</answer>"))
        return examples


def load(**kwargs) -> ArithmeticEnv:
    """Plugin entry point: ``env: {name: arithmetic, args: {...}}`` in a run config."""
    return ArithmeticEnv(**kwargs)
