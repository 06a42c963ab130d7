"""From tasks to scored rollouts: tokenise prompts, sample G completions each, verify every one."""

import time
from dataclasses import dataclass

from gymrl.envs.base import Environment, Task
from gymrl.config import SamplingConfig
from gymrl.rollout.engine import EnginePool, PromptTooLongError


@dataclass
class Rollout:
    """One sampled completion of one task, with what the trainer and the traces need."""

    task_id: str
    env: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour policy, per completion token
    text: str
    finish_reason: str
    reward: float
    reason: str
    policy_version: int


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]  # grouped: consecutive runs of group_size share a task
    group_size: int
    generate_seconds: float
    verify_seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(r.completion_ids) for r in self.rollouts)


def encode_prompt(tokenizer, task: Task) -> list[int]:
    """Prompt token ids: the task's messages through the model's chat template, ready to generate."""
    return list(tokenizer.apply_chat_template(task.messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def check_prompts_fit(tokenizer, tasks: list[Task], max_tokens: int, max_model_len: int) -> None:
    """Fail before any engine starts if a task's prompt leaves no room for ``max_tokens``."""
    for task in tasks:
        n = len(encode_prompt(tokenizer, task))
        if n + max_tokens > max_model_len:
            raise PromptTooLongError(
                f"task '{task.id}' of env '{task.env}': prompt has {n} tokens; with sampling.max_tokens={max_tokens} "
                f"it exceeds engine.max_model_len={max_model_len}"
            )


class RolloutRunner:
    """Turns tasks into rollouts; single-turn for now (multi-turn tool use lives in its own issue)."""

    def __init__(self, pool: EnginePool, envs: dict[str, Environment], tokenizer):
        self.pool = pool
        self.envs = envs
        self.tokenizer = tokenizer
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    def prompt_ids(self, task: Task) -> list[int]:
        key = (task.env, task.id)
        ids = self._prompt_cache.get(key)
        if ids is None:
            ids = self._prompt_cache[key] = encode_prompt(self.tokenizer, task)
        return ids

    def run(self, tasks: list[Task], group_size: int, sampling: SamplingConfig, policy_version: int) -> RolloutBatch:
        prompts = [self.prompt_ids(t) for t in tasks]
        started = time.perf_counter()
        groups = self.pool.generate(prompts, group_size, sampling)
        generated = time.perf_counter()
        pairs = [(task, c) for task, group in zip(tasks, groups) for c in group]
        verdicts: list = [None] * len(pairs)
        for name, env in self.envs.items():  # one batch of concurrent /verify calls per environment
            idx = [i for i, (task, _) in enumerate(pairs) if task.env == name]
            for i, verdict in zip(idx, env.verify_many([(pairs[i][0], pairs[i][1].text) for i in idx])):
                verdicts[i] = verdict
        rollouts = [
            Rollout(task.id, task.env, self.prompt_ids(task), c.token_ids, c.logprobs, c.text, c.finish_reason,
                    v.reward, v.reason, policy_version)
            for (task, c), v in zip(pairs, verdicts)
        ]
        return RolloutBatch(rollouts, group_size, generated - started, time.perf_counter() - generated)
