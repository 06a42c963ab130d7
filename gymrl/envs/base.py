"""The harness's view of an environment: task rows from its plugin, verification by its NeMo Gym server.

A plugin is a package ``environments/<name>/`` with
- ``Tasks``: a dataclass whose fields are the environment's options (``env.args`` in a run config) and
  whose ``rows(split)`` returns NeMo Gym JSONL rows (``responses_create_params`` plus the ground truth
  the verifier needs); optional ``warmup_response(row, rng)`` and ``gold_response(row)``;
- ``app.py``: the NeMo Gym resources server whose ``/verify`` scores a response.
"""

import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from gymrl.envs.client import EnvClient
from rewards.types import RewardResult

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Task:
    """One prompt for the policy, the environment it came from and its full row (the ground truth)."""

    id: str
    env: str
    messages: list[dict[str, str]]
    row: dict[str, Any] = field(default_factory=dict, repr=False)


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages from a row's Responses-API ``input`` (a string or a list of messages)."""
    given = row["responses_create_params"]["input"]
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages = []
    for m in given:
        content = m["content"]
        if not isinstance(content, str):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content)
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": content})
    return messages


class Environment:
    """Tasks of one plugin; ``verify`` goes to its server once :meth:`attach` has connected one."""

    def __init__(self, name: str, tasks: Any):
        self.name = name
        self.config = dataclasses.asdict(tasks)  # identifies the task set (tiny-model cache key)
        self._tasks = tasks
        self._client: EnvClient | None = None

    def attach(self, client: EnvClient) -> None:
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def tasks(self, split: Split) -> list[Task]:
        return [
            Task(str(row.get("id", f"{split}-{i}")), self.name, row_messages(row), row)
            for i, row in enumerate(self._tasks.rows(split))
        ]

    def verify(self, task: Task, response: str) -> RewardResult:
        if self._client is None:
            raise RuntimeError(f"environment '{self.name}' has no server attached")
        reply = self._client.verify(task.row, response)
        return RewardResult(float(reply["reward"]), str(reply.get("reason", "")))

    def verify_many(self, pairs: list[tuple[Task, str]], workers: int = 8) -> list[RewardResult]:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda p: self.verify(*p), pairs))

    def gold_response(self, task: Task) -> str | None:
        gold = getattr(self._tasks, "gold_response", None)
        return gold(task.row) if gold else None

    def warmup_examples(self, n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
        """(prompt messages, response) pairs for a tiny model's supervised warm-up, over both splits."""
        if not hasattr(self._tasks, "warmup_response"):
            raise ValueError(f"environment '{self.name}' defines no warmup_response(row, rng)")
        rng = random.Random(seed)
        rows = self._tasks.rows("train") + self._tasks.rows("eval")
        picks = [rng.choice(rows) for _ in range(n)]
        return [(row_messages(row), self._tasks.warmup_response(row, rng)) for row in picks]
