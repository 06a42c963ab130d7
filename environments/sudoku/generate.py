"""Sudoku task rows (4x4 or 9x9, unique solution) in NeMo Gym's JSONL format.

A row is ``{"responses_create_params": {"input": [{"role": "user", "content": PROMPT}]}, "puzzle",
"size", "solution", "difficulty", "id", "split"}``; ``puzzle`` and ``solution`` are row-major digit
strings (``0`` = blank), the ground truth ``rewards.sudoku.score_sudoku`` reads. Rows are
deterministic in ``(seed, split)``, the two splits draw from differently seeded generators, no
puzzle repeats within one call, and ``exclude`` keeps another set's puzzles out (e.g. the eval
split's puzzles out of the training split).

    python -m environments.sudoku.generate --n 100 --size 4 --out data/train.jsonl
    python -m environments.sudoku.generate --n 50 --size 4 --split eval --out data/eval.jsonl
"""

import argparse
import random
from collections.abc import Iterable

from environments.jsonl import read_jsonl, write_jsonl
from rewards.sudoku import generate_puzzle


def grid_lines(cells: str, size: int) -> list[str]:
    return [cells[r * size : (r + 1) * size] for r in range(size)]


def prompt(puzzle: str, size: int) -> str:
    box = "2x2" if size == 4 else "3x3"
    grid = "\n".join(grid_lines(puzzle, size))
    return (
        f"Solve this {size}x{size} sudoku. Replace each 0 with a digit 1-{size} so that every row, "
        f"column and {box} box has each digit once.\n{grid}\n"
        f"Answer with the full grid as {size} lines of {size} digits inside <answer></answer>."
    )


def generate_rows(
    n: int,
    seed: int = 0,
    split: str = "train",
    size: int = 4,
    difficulty: str | int = "easy",
    exclude: Iterable[str] = (),
) -> list[dict]:
    """``n`` sudoku rows; ``difficulty`` is easy/medium/hard or a number of blank cells."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"sudoku:{seed}:{split}:{size}:{difficulty}")
    seen = set(exclude)
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 20 * n + 100:
            raise ValueError(f"could not find {n} distinct {size}x{size} {difficulty} puzzles (got {len(rows)})")
        puzzle, solution = generate_puzzle(size, difficulty, rng)
        if puzzle in seen:
            continue
        seen.add(puzzle)
        rows.append(
            {
                "responses_create_params": {"input": [{"role": "user", "content": prompt(puzzle, size)}]},
                "puzzle": puzzle,
                "size": size,
                "solution": solution,
                "difficulty": difficulty,
                "id": f"sudoku{size}-{split}-{seed}-{len(rows)}",
                "split": split,
            }
        )
    return rows


def warmup_response(row: dict) -> str:
    """The ideal response for ``row``: an empty thinking part and the solved grid."""
    return "<think></think><answer>" + "\n".join(grid_lines(row["solution"], row["size"])) + "</answer>"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, required=True, help="number of rows")
    p.add_argument("--size", type=int, default=4, choices=(4, 9))
    p.add_argument("--difficulty", default="easy", help="easy, medium, hard or a number of blank cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "eval"))
    p.add_argument("--exclude", action="append", default=[], help="JSONL whose puzzles to leave out (repeatable)")
    p.add_argument("--out", required=True, help="output JSONL path")
    args = p.parse_args(argv)
    difficulty = int(args.difficulty) if args.difficulty.isdigit() else args.difficulty
    exclude = [row["puzzle"] for path in args.exclude for row in read_jsonl(path)]
    rows = generate_rows(args.n, args.seed, args.split, size=args.size, difficulty=difficulty, exclude=exclude)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
