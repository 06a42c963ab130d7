"""Math problems with checkable answers, answer in \\boxed{}, scored by math-verify equivalence.

By default the tasks are generated arithmetic and algebra at levels 1-4 (``generate.py``); point
``train_path`` / ``eval_path`` at any JSONL or local ``datasets`` file (fields ``problem``/``question``
and ``answer``/``solution``) to use your own set instead.
"""

import random
from dataclasses import dataclass
from functools import cache

from environments.math.generate import generate_rows, load_math_dataset, load_math_jsonl, warmup_response


@cache
def _generated(levels: tuple[int, ...], n_train: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    held_out = generate_rows(n_eval, seed, "eval", levels)
    train = generate_rows(n_train, seed, "train", levels, exclude={r["responses_create_params"]["input"][0]["content"] for r in held_out})
    return {"train": train, "eval": held_out}


def _load(path: str, split: str) -> list[dict]:
    return load_math_jsonl(path, split) if path.endswith(".jsonl") else load_math_dataset(path, split)


@dataclass(frozen=True)
class Tasks:
    levels: tuple[int, ...] = (1, 2, 3, 4)
    n_train: int = 400
    n_eval: int = 40
    seed: int = 0
    train_path: str | None = None
    eval_path: str | None = None
    warmup_correct: float = 1.0  # share of warm-up answers that are right (the rest are off by one)

    def rows(self, split: str) -> list[dict]:
        path = self.train_path if split == "train" else self.eval_path
        if path:
            return _load(path, split)
        return _generated(tuple(self.levels), self.n_train, self.n_eval, self.seed)[split]

    def gold_response(self, row: dict) -> str:
        return warmup_response(row)

    def warmup_response(self, row: dict, rng: random.Random) -> str:
        if rng.random() < self.warmup_correct:
            return warmup_response(row)
        answer = row["expected_answer"]
        wrong = str(int(answer) + 1) if answer.lstrip("-").isdigit() else answer + "1"
        return warmup_response(row | {"expected_answer": wrong})
