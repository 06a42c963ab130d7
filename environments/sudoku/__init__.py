"""Sudoku (4x4 for tiny CPU models, 9x9 for real ones): fill the grid, answer it inside <answer>.

Puzzles are generated with a unique solution (``generate.py``); the held-out split's puzzles never
appear in training. ``app.py`` scores with ``rewards.sudoku``: 1.0 for a complete valid grid that
keeps every given; partial credit is off unless ``partial_credit`` is set.
"""

import random
from dataclasses import dataclass
from functools import cache

from environments.sudoku.generate import generate_rows, warmup_response


@cache
def _rows(size: int, difficulty: str, n_train: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    held_out = generate_rows(n_eval, seed, "eval", size, difficulty)
    train = generate_rows(n_train, seed, "train", size, difficulty, exclude={r["puzzle"] for r in held_out})
    return {"train": train, "eval": held_out}


@dataclass(frozen=True)
class Tasks:
    size: int = 4
    difficulty: str | int = "easy"  # easy, medium, hard or a number of blank cells
    n_train: int = 400
    n_eval: int = 40
    seed: int = 0
    partial_credit: bool = False
    warmup_correct: float = 1.0  # share of warm-up answers that are right (the rest break one row)

    def rows(self, split: str) -> list[dict]:
        rows = _rows(self.size, self.difficulty, self.n_train, self.n_eval, self.seed)[split]
        return [row | {"partial_credit": self.partial_credit} for row in rows]

    def gold_response(self, row: dict) -> str:
        return warmup_response(row)

    def warmup_response(self, row: dict, rng: random.Random) -> str:
        if rng.random() < self.warmup_correct:
            return warmup_response(row)
        blanks = [i for i, c in enumerate(row["puzzle"]) if c in "0."]
        cells = list(row["solution"])
        i, j = rng.sample(blanks, 2) if len(blanks) > 1 else (blanks[0], blanks[0])
        cells[i], cells[j] = cells[j], cells[i]
        if cells[i] == cells[j]:  # swapping equal digits breaks nothing: bump one instead
            cells[i] = str(int(cells[i]) % row["size"] + 1)
        return warmup_response(row | {"solution": "".join(cells)})
