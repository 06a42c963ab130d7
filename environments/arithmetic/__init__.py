"""Single-digit arithmetic (``a+b``, ``a-b``) with the answer in ``<answer>N</answer>``.

Task rows are NeMo Gym JSONL rows: the request (``responses_create_params``) plus ``expected``, the
ground truth that ``app.py``'s verifier reads. The held-out eval split is a fixed, seeded subset of
the facts that training never samples. The warm-up text teaches the answer format but is deliberately
unreliable: only ``warmup_correct`` of its answers are right, the rest are the off-by-one mistake, so
the starting policy prefers a wrong answer under greedy decoding and RL has something real to fix.
"""

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Tasks:
    max_operand: int = 9
    eval_fraction: float = 0.2
    warmup_correct: float = 0.3
    seed: int = 0

    def _facts(self) -> list[tuple[int, str, int, int]]:
        n = range(self.max_operand + 1)
        return [(a, "+", b, a + b) for a in n for b in n] + [(a, "-", b, a - b) for a in n for b in n if a >= b]

    def rows(self, split: str) -> list[dict]:
        facts = self._facts()
        random.Random(self.seed).shuffle(facts)
        n_eval = max(1, int(len(facts) * self.eval_fraction))
        chosen = facts[:n_eval] if split == "eval" else facts[n_eval:]
        return [
            {
                "id": f"{a}{op}{b}",
                "responses_create_params": {"input": [{"role": "user", "content": f"What is {a}{op}{b}?"}]},
                "expected": result,
            }
            for a, op, b, result in chosen
        ]

    def warmup_response(self, row: dict, rng: random.Random) -> str:
        answer = row["expected"] if rng.random() < self.warmup_correct else row["expected"] + 1
        return f"<think>{row['id']}</think><answer>{answer}</answer>"

    def gold_response(self, row: dict) -> str:
        return f"<think>{row['id']}</think><answer>{row['expected']}</answer>"
