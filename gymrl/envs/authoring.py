"""Tools for environment authors: scaffold a new plugin, and check one against its real server.

``check_environment`` is the data-and-verifier cross-check: every sampled task's gold answer must
score 1.0 through the running NeMo Gym server, and known-bad answers must score 0.0, before any
training time is spent on it.
"""

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from gymrl.envs.client import EnvClient
from gymrl.envs.launcher import DEFAULT_GYM_PYTHON, EnvServer
from gymrl.envs.registry import ENV_ROOT, load_environment

# Answers no task should accept: nothing, a refusal, and an answer hidden in the thinking part.
BAD_RESPONSES = ("", "I don't know.", "<think><answer>0</answer></think>")

SCAFFOLD = {
    "__init__.py": '''"""{title}: reverse a word; the answer goes in <answer>...</answer>."""

import random
from dataclasses import dataclass

WORDS = ["gym", "reward", "policy", "token", "engine", "verify", "sample", "group", "train", "model"]


@dataclass(frozen=True)
class Tasks:
    seed: int = 0

    def rows(self, split: str) -> list[dict]:
        words = WORDS[:8] if split == "train" else WORDS[8:]
        return [
            {{"id": word, "responses_create_params": {{"input": [{{"role": "user", "content": f"Reverse the word {{word}}."}}]}},
             "expected": word[::-1]}}
            for word in words
        ]

    def gold_response(self, row: dict) -> str:
        return f"<answer>{{row['expected']}}</answer>"

    def warmup_response(self, row: dict, rng: random.Random) -> str:
        return self.gold_response(row)
''',
    "app.py": '''"""NeMo Gym resources server for {name}: /verify scores the answer text."""

import re

from gymrl.envs.nemo_server import TextVerifyServer
from rewards.types import RewardResult


class {cls}Server(TextVerifyServer):
    def score(self, row, text):
        answers = re.findall(r"<answer>(.*?)</answer>", text.rpartition("</think>")[2], re.S)
        if len(answers) != 1:
            return RewardResult(0.0, f"expected exactly one <answer>, found {{len(answers)}}")
        ok = answers[0].strip() == row["expected"]
        return RewardResult(float(ok), "correct" if ok else f"answered {{answers[0].strip()!r}}")
''',
    "configs/{name}.yaml": '''{name}:
  resources_servers:
    {name}:
      entrypoint: app.py
      domain: other
      verified: false
      description: {title}
''',
    "README.md": '''# {name}

{title}. `__init__.py` holds the task rows (NeMo Gym JSONL rows: `responses_create_params` plus the
ground truth) and the gold answer; `app.py` is the NeMo Gym resources server whose `/verify` scores a
response. Check it with `gymrl envs test {name}`; serve it with `gymrl envs serve {name}`.
''',
}


def scaffold(name: str, root: Path = ENV_ROOT) -> Path:
    """Write a working example environment ``environments/<name>/`` that passes its own checks."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"environment name '{name}' must be a Python identifier in lower case")
    target = root / name
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    values = {"name": name, "title": name.replace("_", " ").capitalize(), "cls": name.title().replace("_", "")}
    for rel, text in SCAFFOLD.items():
        path = target / rel.format(**values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(**values))
    return target


@dataclass
class CheckReport:
    env: str
    gold_checked: int = 0
    bad_checked: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.gold_checked > 0

    def summary(self) -> str:
        p50 = statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} problems)"
        return (f"{self.env}: {verdict}: {self.gold_checked} gold answers, {self.bad_checked} bad answers checked; "
                f"/verify p50 {p50:.1f} ms")


def check_environment(name: str, max_tasks: int = 20, gym_python: Path = DEFAULT_GYM_PYTHON,
                      tool_call_parser: str = "qwen3_coder") -> CheckReport:
    """Start the environment's server and check gold and bad answers on up to ``max_tasks`` per split.

    A gold answer is a text, or for tool use the turns of an episode: its assistant turns are played
    against the server (their tool calls run for real, read by ``tool_call_parser``), and the tool
    results must equal the gold ones, so warm-up text matches what the server really says.
    """
    env = load_environment(name)
    report = CheckReport(name)
    parser = None
    with EnvServer(name, gym_python) as server:
        env.attach(EnvClient(name, server.url))
        try:
            for split in ("train", "eval"):
                for task in env.tasks(split)[:max_tasks]:
                    gold = env.gold_response(task)
                    if gold is None:
                        report.failures.append(f"{name} defines no gold_response(row): cannot check its data")
                        return report
                    if task.tools and parser is None:
                        from gymrl.models.tokenizer import build_tokenizer
                        from gymrl.rollout.tool_calls import ToolCallParser

                        # The parsers want a tokenizer; any will do for text that is already decoded.
                        parser = ToolCallParser(tool_call_parser, build_tokenizer([]))
                    for response, want in [(gold, 1.0)] + [(bad, 0.0) for bad in BAD_RESPONSES]:
                        started = time.perf_counter()
                        got = _score(env, task, response, parser, report, split)
                        report.latencies_ms.append(1000 * (time.perf_counter() - started))
                        if got.reward != want:
                            shown = response if isinstance(response, str) else response[0]["content"]
                            report.failures.append(f"{split} task '{task.id}': {shown[:60]!r} scored {got.reward} "
                                                   f"({got.reason}), expected {want}")
                    report.gold_checked += 1
                    report.bad_checked += len(BAD_RESPONSES)
        finally:
            env.close()
    return report


def _score(env, task, response, parser, report: CheckReport, split: str):
    """One response's verdict: a text goes straight to /verify; a tool task's is played as an episode."""
    if not task.tools:
        return env.verify(task, response)
    from gymrl.models.chat import as_turns
    from gymrl.rollout.runner import play_episode

    turns = as_turns(response)
    verdict, played = play_episode(env, task, [t["content"] for t in turns if t["role"] == "assistant"], parser)
    want = [t["content"] for t in turns if t["role"] == "tool"]
    got = [t["content"] for t in played if t["role"] == "tool"]
    if want != got:
        report.failures.append(f"{split} task '{task.id}': the server's tool results {got} differ from the gold "
                               f"episode's {want}")
    return verdict
