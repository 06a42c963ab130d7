"""The harness's view of an environment: task rows from its plugin, verification by its NeMo Gym server.

A plugin is a package ``environments/<name>/`` with
- ``Tasks``: a dataclass whose fields are the environment's options (``env.args`` in a run config) and
  whose ``rows(split)`` returns NeMo Gym JSONL rows (``responses_create_params`` plus the ground truth
  the verifier needs); optional ``warmup_response(row, rng)`` and ``gold_response(row)``, each a
  response text or, for tool use, the turns (assistant and tool messages) of an episode;
- ``app.py``: the NeMo Gym resources server whose ``/verify`` scores a response.

A task whose row lists ``tools`` is played as a multi-turn episode: its session is seeded on the
server, the model's tool calls go to the server's tool routes, and /verify sees every turn.
"""

import dataclasses
import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gymrl.envs import gymnasium
from gymrl.envs.client import Cookies, EnvClient, EnvServerError, EpisodeLost, responses_api_response
from gymrl.utf8 import clean
from rewards.types import RewardResult

MAX_TOOL_ARGUMENT_CHARS = 64 * 1024  # a tool call's JSON arguments; a longer call is refused, never sent
MAX_TOOL_OUTPUT_CHARS = 64 * 1024  # a tool's reply as the model reads it; the rest is cut off, with a note

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Task:
    """One prompt for the policy, the environment it came from and its full row (the ground truth)."""

    id: str
    env: str
    messages: list[dict[str, str]]
    row: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The tools the model may call (Responses-API function definitions from the row)."""
        return self.row.get("responses_create_params", {}).get("tools") or []


Response = str | list[dict[str, Any]]  # a response text, or an episode's turns as chat messages


@dataclass(frozen=True)
class WarmupExample:
    """A prompt and a good-enough response for a tiny model's supervised warm-up."""

    messages: list[dict[str, str]]
    response: Response
    tools: list[dict[str, Any]] = field(default_factory=list)


def message_text(message: dict[str, Any]) -> str:
    """A Responses-API message's text: its content, or the text of its content parts."""
    content = message.get("content")
    return content if isinstance(content, str) else "".join(
        p.get("text", "") for p in content or [] if isinstance(p, dict))


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages from a row's Responses-API ``input`` (a string or a list of messages)."""
    given = row["responses_create_params"]["input"]
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return [{"role": "system" if m["role"] == "developer" else m["role"], "content": message_text(m)} for m in given]


@dataclass(frozen=True)
class ServerSpec:
    """How to start a server other than a gymrl plugin's (a NeMo Gym resources server, unchanged)."""

    module: str  # the package whose app.py holds the server
    options: dict[str, Any] = field(default_factory=dict)  # its config's keys
    cwd: Path | None = None  # the folder it runs in (NeMo Gym runs a server in its own folder)
    requirements_of: str | None = None  # the NeMo Gym server whose requirements.txt it needs installed


class Environment:
    """Tasks of one plugin, or of NeMo Gym JSONL files; ``verify`` goes to its server once :meth:`attach` has
    connected one. ``server``: how to start a server other than the plugin's own (None for a plugin)."""

    def __init__(self, name: str, tasks: Any, server: ServerSpec | None = None, nemo_gym: bool = False,
                 max_steps: int | None = None, gymnasium: bool = False):
        """``nemo_gym``: play every episode as NeMo Gym's simple_agent does (a session seeded on the server even
        without tools, /verify with its cookies); ``max_steps``: that agent's limit of model calls, the tool
        calls of the last one still run. ``gymnasium``: play them as its gymnasium_agent does instead
        (:class:`GymnasiumEpisode`)."""
        self.name, self.server, self.nemo_gym, self.max_steps = name, server, nemo_gym, max_steps
        self.gymnasium = gymnasium
        self.config = dataclasses.asdict(tasks)  # identifies the task set (tiny-model cache key)
        self._tasks = tasks
        self._client: EnvClient | None = None
        self._batch_verify: bool | None = None  # whether the server has /verify_batch (None: not asked yet)

    def attach(self, client: EnvClient) -> None:
        self._client = client
        self._batch_verify = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def tasks(self, split: Split) -> list[Task]:
        return [
            Task(str(row.get("id", f"{split}-{i}")), self.name, row_messages(row), row)
            for i, row in enumerate(self._tasks.rows(split))
        ]

    @property
    def client(self) -> EnvClient:
        if self._client is None:
            raise RuntimeError(f"environment '{self.name}' has no server attached")
        return self._client

    def open_episode(self, task: Task) -> "Episode":
        """A new episode of ``task`` on the server: its session is seeded when the task has tools (reset, for a
        gymnasium server)."""
        if self.gymnasium:
            observation, cookies = gymnasium.reset(self.client, task.row)
            return GymnasiumEpisode(self, task, cookies, observation)
        return Episode(self, task, self.client.seed_session(task.row) if task.tools or self.nemo_gym else {})

    def verify(self, task: Task, output: str | list[dict[str, Any]] | dict[str, Any],
               cookies: Cookies | None = None) -> RewardResult:
        """Score a response text, an episode's Responses-API output items, or its whole response (with its usage),
        with its session cookies."""
        # lone surrogates cannot go out as UTF-8
        return self._verdict(self.client.verify(task.row, clean(output), cookies))

    def verify_batch(self, pairs: list[tuple[Task, str | list[dict[str, Any]] | dict[str, Any]]]) -> list[RewardResult] | None:
        """Score many responses (of tasks without session state) in one POST /verify_batch; None when the server
        has no such route (an external NeMo Gym server, or one whose verify reads its session)."""
        if not pairs or self._batch_verify is False:
            return None if self._batch_verify is False else []
        payload = {"requests": [t.row | {"response": clean(o) if isinstance(o, dict) else responses_api_response(clean(o))}
                                for t, o in pairs]}
        try:
            reply = self.client.post("/verify_batch", payload)
        except EnvServerError as err:
            if self._batch_verify is None and ("404" in str(err) or "405" in str(err)):
                self._batch_verify = False  # asked once: this server verifies one rollout a request
                return None
            raise
        replies = reply.get("responses") if isinstance(reply, dict) else None
        if not isinstance(replies, list) or len(replies) != len(pairs):
            raise EnvServerError(f"env '{self.name}': /verify_batch did not answer {len(pairs)} verdicts: {str(reply)[:200]}")
        self._batch_verify = True
        return [self._verdict(r) for r in replies]

    def _verdict(self, reply: Any) -> RewardResult:
        """A /verify reply as a reward; one without a finite numeric reward is the server's fault, not a 0."""
        if not isinstance(reply, dict) or isinstance(reply.get("reward"), bool) or \
                not isinstance(reply.get("reward"), (int, float)) or not math.isfinite(reply["reward"]):
            raise EnvServerError(f"env '{self.name}': /verify replied without a finite numeric reward: {str(reply)[:200]}")
        breakdown = {k: float(v) for k, v in (reply.get("breakdown") or {}).items() if isinstance(v, (int, float))}
        return RewardResult(float(reply["reward"]), str(reply.get("reason", "")), breakdown)

    def verify_many(self, pairs: list[tuple[Task, str]], workers: int = 8) -> list[RewardResult]:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda p: self.verify(*p), pairs))

    def gold_response(self, task: Task) -> Response | None:
        gold = getattr(self._tasks, "gold_response", None)
        return gold(task.row) if gold else None

    def warmup_examples(self, n: int, seed: int) -> list[WarmupExample]:
        """Prompts and responses for a tiny model's supervised warm-up, drawn over both splits."""
        if not hasattr(self._tasks, "warmup_response"):
            raise ValueError(f"environment '{self.name}' defines no warmup_response(row, rng)")
        rng = random.Random(seed)
        rows = self._tasks.rows("train") + self._tasks.rows("eval")
        picks = [rng.choice(rows) for _ in range(n)]
        return [
            WarmupExample(row_messages(row), self._tasks.warmup_response(row, rng),
                          row["responses_create_params"].get("tools") or [])
            for row in picks
        ]


class Episode:
    """One rollout's conversation with the server: its session cookies, its tool calls, its verdict."""

    own_prompt = False  # whether its task's messages are its own (a /reset observation), not shared by its group

    def __init__(self, env: Environment, task: Task, cookies: Cookies):
        self.env, self.task, self.cookies = env, task, cookies
        self.generation = env.client.generation if cookies else 0  # the server run its session lives on
        self._tool_names = {t.get("name") or t.get("function", {}).get("name") for t in task.tools}

    def call_tool(self, name: str, arguments: dict[str, Any] | None) -> str:
        """The tool's output for the model. Only the task's own tools reach the server (never /verify or
        /seed_session); a bad call gets an error the model can read, as NeMo Gym's agents give. Arguments
        longer than ``MAX_TOOL_ARGUMENT_CHARS`` (as JSON) are refused without a request; a reply longer
        than ``MAX_TOOL_OUTPUT_CHARS`` is cut there, with a note saying how much was left out."""
        name = clean(name)
        if name not in self._tool_names:
            shown = name if len(name) <= 80 else name[:80] + "..."
            return json.dumps({"error": f"unknown tool {shown!r}; available: {sorted(self._tool_names)}"})
        if arguments is None:
            return json.dumps({"error": "tool call arguments are not a JSON object"})
        arguments = clean(arguments)
        size = len(json.dumps(arguments, ensure_ascii=False))
        if size > MAX_TOOL_ARGUMENT_CHARS:
            return json.dumps({"error": f"tool call arguments are {size} characters long; the limit is "
                                        f"{MAX_TOOL_ARGUMENT_CHARS}"})
        output, self.cookies = self.env.client.call_tool(name, arguments, self.cookies)
        self._check_session()
        if len(output) > MAX_TOOL_OUTPUT_CHARS:
            cut = len(output) - MAX_TOOL_OUTPUT_CHARS
            output = output[:MAX_TOOL_OUTPUT_CHARS] + f"\n[tool output truncated: {cut} more characters]"
        return output

    def verify(self, output: list[dict[str, Any]] | dict[str, Any]) -> RewardResult:
        self._check_session()
        verdict = self.env.verify(self.task, output, self.cookies)
        self._check_session()
        return verdict

    def _check_session(self) -> None:
        """A stateful episode cannot go on, or be scored, on a server restarted since its session began."""
        if self.cookies and self.env.client.generation != self.generation:
            raise EpisodeLost(f"env server '{self.env.name}' restarted during the episode of task '{self.task.id}'; "
                              "its session state is gone")


class GymnasiumEpisode(Episode):
    """An episode as NeMo Gym's gymnasium_agent plays it: opened by /reset, whose observation is a user message
    after the task's prompt (so the episode's prompt is its own), each model turn sent to /step, its reward the sum
    of the steps' rewards (a GymnasiumServer has no /verify)."""

    def __init__(self, env: Environment, task: Task, cookies: Cookies, observation: str | None):
        if observation is not None:
            task = dataclasses.replace(task, messages=task.messages + [{"role": "user", "content": observation}])
        super().__init__(env, task, cookies)
        self.own_prompt = observation is not None
        self.reward, self.steps, self.done = 0.0, 0, False
        self.info: dict[str, Any] = {}

    def step(self, turn: list[dict[str, Any]]) -> gymnasium.Step:
        """/step with one model turn's output items; the reply's reward is added to the episode's."""
        self._check_session()
        result, self.cookies = gymnasium.step(self.env.client, self.task.row, clean(turn), self.cookies)
        self._check_session()
        self.reward += result.reward
        self.steps, self.done, self.info = self.steps + 1, result.done, result.info
        return result

    def verdict(self) -> RewardResult:
        ended = "ended" if self.done else "not ended"
        return RewardResult(self.reward, f"{self.steps} steps, {ended}; last info: {json.dumps(self.info, default=str)[:300]}")
