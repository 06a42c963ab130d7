r"""Math task rows in NeMo Gym's JSONL format: generated arithmetic/algebra, or loaded from a user set.

A row is ``{"responses_create_params": {"input": [{"role": "user", "content": PROMPT}]},
"expected_answer", "level", "id", "split"}``; ``expected_answer`` is the gold that
``rewards.math.score_math`` compares with (an integer or a reduced fraction ``p/q``), and the prompt
asks for the answer in ``\boxed{}``.

Generated levels (deterministic in ``(seed, split)``; no problem repeats within one call, and
``exclude`` keeps another set's problems out):

1. ``a+b`` or ``a-b`` with a, b in 0..99
2. ``a*b+c`` with a, b in 2..12 and c in 0..20
3. solve ``a*x+b=c`` for an integer x in -10..10 (a in 2..9, b in -20..20, sign of a random)
4. ``p/q + r/s`` or ``p/q - r/s`` with q, s in 2..9 and 0 < p < q, 0 < r < s: a reduced fraction
   or an integer

User data: ``load_math_jsonl(path)`` reads any JSONL file and ``load_math_dataset(path)`` anything
``datasets`` reads from a local path (json/jsonl/csv/parquet file, or a ``save_to_disk`` folder);
nothing is fetched from a hub. The problem comes from ``problem`` or ``question`` and the answer from
``answer`` or ``solution`` (or the fields you name); an answer taken from a full worked solution is
its last ``\boxed{}`` (or, GSM8K style, what follows its last ``####``).

    python -m environments.math.generate --n 200 --levels 1,2,3,4 --out data/train.jsonl
    python -m environments.math.generate --from-jsonl my.jsonl --split eval --out data/eval.jsonl
"""

import argparse
import json
import random
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path

from environments.jsonl import write_jsonl
from rewards.math import extract_boxed

LEVELS = (1, 2, 3, 4)
INSTRUCTION = "Put the final answer in \\boxed{}."
PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "solution")


def _level1(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a}+{b}?", str(a + b)
    return f"What is {a}-{b}?", str(a - b)


def _level2(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(0, 20)
    return f"What is {a}*{b}+{c}?", str(a * b + c)


def _level3(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(2, 9) * rng.choice((1, -1))
    x, b = rng.randint(-10, 10), rng.randint(-20, 20)
    c = a * x + b
    lhs = f"{a}x" + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")
    return f"Solve for x: {lhs} = {c}. What is x?", str(x)


def _fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _level4(rng: random.Random) -> tuple[str, str]:
    q, s = rng.randint(2, 9), rng.randint(2, 9)
    p, r = rng.randint(1, q - 1), rng.randint(1, s - 1)
    if rng.random() < 0.5:
        value, op = Fraction(p, q) + Fraction(r, s), "+"
    else:
        value, op = Fraction(p, q) - Fraction(r, s), "-"
    return f"What is {p}/{q} {op} {r}/{s}? Give the answer as a reduced fraction.", _fraction(value)


GENERATORS: dict[int, Callable[[random.Random], tuple[str, str]]] = {1: _level1, 2: _level2, 3: _level3, 4: _level4}


def make_row(problem: str, answer: str, level, row_id: str, split: str) -> dict:
    return {
        "responses_create_params": {"input": [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]},
        "expected_answer": answer,
        "level": level,
        "id": row_id,
        "split": split,
    }


def generate_rows(
    n: int,
    seed: int = 0,
    split: str = "train",
    levels: Iterable[int] = LEVELS,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """``n`` generated rows; each row's level is drawn uniformly from ``levels``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    levels = sorted(set(levels))
    unknown = [lv for lv in levels if lv not in GENERATORS]
    if unknown or not levels:
        raise ValueError(f"levels must be a non-empty subset of {list(GENERATORS)}, got {levels}")
    rng = random.Random(f"math:{seed}:{split}")
    seen = set(exclude)
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise ValueError(f"could not find {n} distinct problems at levels {levels} (got {len(rows)})")
        level = rng.choice(levels)
        problem, answer = GENERATORS[level](rng)
        if problem in seen:
            continue
        seen.add(problem)
        rows.append(make_row(problem, answer, level, f"math-{split}-{seed}-{len(rows)}", split))
    return rows


def warmup_response(row: dict) -> str:
    """The ideal response for ``row``: an empty thinking part and the boxed answer."""
    return f"<think></think>\\boxed{{{row['expected_answer']}}}"


def problem_of(row: dict) -> str:
    """The problem text of a row (the user message without the answer-format instruction)."""
    content = row["responses_create_params"]["input"][-1]["content"]
    return content.removesuffix(f"\n{INSTRUCTION}")


# --- user data -----------------------------------------------------------------------------------


def _pick(record: dict, field: str | None, candidates: tuple[str, ...], what: str, where: str) -> tuple[str, str]:
    names = (field,) if field else candidates
    for name in names:
        if record.get(name) not in (None, ""):
            return name, str(record[name])
    raise ValueError(f"{where}: no {what} field (looked for {', '.join(names)})")


def rows_from_records(
    records: Iterable[dict],
    split: str = "train",
    problem_field: str | None = None,
    answer_field: str | None = None,
    source: str = "user",
) -> list[dict]:
    r"""Task rows from user records. The answer field's value is used as is, except that a value
    holding ``\boxed{}`` (a worked solution) gives its last boxed content, and one holding ``####``
    (GSM8K style) the number after the last ``####``. A longer answer (over 200 characters) with
    neither is refused. A record's ``level`` and ``id`` are kept when present."""
    rows = []
    for i, record in enumerate(records):
        where = f"{source} record {i}"
        _, problem = _pick(record, problem_field, PROBLEM_FIELDS, "problem", where)
        _, answer = _pick(record, answer_field, ANSWER_FIELDS, "answer", where)
        boxed, _ = extract_boxed(answer)
        if boxed:
            answer = boxed[-1]
        elif "####" in answer:  # GSM8K style: the worked solution ends with "#### 72"
            answer = answer.rpartition("####")[2].replace(",", "")
        elif "\\boxed" in answer or len(answer) > 200:
            raise ValueError(f"{where}: the answer has no usable \\boxed{{}} and is not a short final answer")
        answer = answer.strip()
        if not answer:
            raise ValueError(f"{where}: empty answer")
        row_id = str(record["id"]) if record.get("id") not in (None, "") else f"{source}-{split}-{i}"
        rows.append(make_row(problem.strip(), answer, record.get("level"), row_id, split))
    return rows


def load_math_jsonl(
    path: str | Path, split: str = "train", problem_field: str | None = None, answer_field: str | None = None
) -> list[dict]:
    """Task rows from a user JSONL file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON: {err}") from None
    return rows_from_records(records, split, problem_field, answer_field, source=path.stem)


def load_math_dataset(
    path: str | Path,
    split: str = "train",
    problem_field: str | None = None,
    answer_field: str | None = None,
    data_split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """Task rows from a local file or ``save_to_disk`` folder read with ``datasets`` (never a hub).

    ``data_split`` picks the split inside the data (a file loads as ``train``); ``split`` is the
    rows' train/eval label; ``cache_dir`` is where ``datasets`` keeps its Arrow copy of a file
    (its default cache when None).
    """
    import datasets  # imported on use: it is heavy, and generating rows does not need it

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: load_math_dataset reads local files only")
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
    else:
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"{path}: unknown file type (use .jsonl, .json, .csv or .parquet)")
        data = datasets.load_dataset(kind, data_files=str(path), cache_dir=str(cache_dir) if cache_dir else None)
    if isinstance(data, datasets.DatasetDict):
        data = data[data_split]
    return rows_from_records(data, split, problem_field, answer_field, source=path.stem)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, help="number of generated rows")
    p.add_argument("--levels", default="1,2,3,4", help="comma-separated levels to draw from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=("train", "eval"))
    p.add_argument("--exclude", action="append", default=[], help="JSONL rows whose problems to leave out")
    p.add_argument("--from-jsonl", help="convert a user JSONL file instead of generating")
    p.add_argument("--from-dataset", help="convert a local datasets file or save_to_disk folder")
    p.add_argument("--problem-field")
    p.add_argument("--answer-field")
    p.add_argument("--out", required=True, help="output JSONL path")
    args = p.parse_args(argv)
    if args.from_jsonl:
        rows = load_math_jsonl(args.from_jsonl, args.split, args.problem_field, args.answer_field)
    elif args.from_dataset:
        rows = load_math_dataset(args.from_dataset, args.split, args.problem_field, args.answer_field)
    elif args.n is not None:
        exclude = []
        for path in args.exclude:
            with open(path, encoding="utf-8") as f:
                exclude += [problem_of(json.loads(line)) for line in f if line.strip()]
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
        rows = generate_rows(args.n, args.seed, args.split, levels=levels, exclude=exclude)
    else:
        p.error("give --n, --from-jsonl or --from-dataset")
    if args.n is not None and (args.from_jsonl or args.from_dataset):
        rows = rows[: args.n]
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
