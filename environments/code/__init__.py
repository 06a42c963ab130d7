"""Code: write a small Python function; its unit tests run in the sandbox (``rewards.sandbox``).

The reward is the fraction of tests passed (``mode: all`` gives 1 only when every test passes). The
model's code runs only inside the sandbox: its own process group, no network, an unprivileged user,
limits on CPU time, memory, processes, open files and output, a private temp dir, killed whole.
A user set is a JSONL file (``path``) with ``prompt``, ``tests`` (a list of assert lines) and
``entry_point``.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from environments.code.problems import TEMPLATES, make_problem


def _row(i: int, split: str, prompt: str, problem: dict, mode: str) -> dict:
    return {
        "id": f"code-{split}-{i}-{problem['entry_point']}",
        "responses_create_params": {"input": [{"role": "user", "content": prompt}]},
        "tests": problem["tests"],
        "entry_point": problem["entry_point"],
        "reference": problem.get("reference"),
        "mode": mode,
    }


@dataclass(frozen=True)
class Tasks:
    n_train: int = 80
    n_eval: int = 16
    seed: int = 0
    mode: str = "fraction"
    path: str | None = None  # a user JSONL set (rows with prompt, tests, entry_point)

    def rows(self, split: str) -> list[dict]:
        if self.path:
            lines = Path(self.path).read_text().splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            return [_row(i, split, r["prompt"], r, self.mode) for i, r in enumerate(records)]
        rng = random.Random(f"code:{self.seed}:{split}")
        n = self.n_train if split == "train" else self.n_eval
        offset = 0 if split == "train" else len(TEMPLATES) // 2  # eval starts on other templates
        rows = []
        for i in range(n):
            p = make_problem(i + offset, rng)
            prompt = f"Write a Python function `{p['entry_point']}` that {p['description']}. Answer with one ```python block."
            rows.append(_row(i, split, prompt, p, self.mode))
        return rows

    def gold_response(self, row: dict) -> str:
        return f"<think></think>```python\n{row['reference']}\n```"

    def warmup_response(self, row: dict, rng: random.Random) -> str:
        return self.gold_response(row)
