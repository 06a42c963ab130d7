"""From tasks to scored rollouts: tokenise prompts, sample G episodes each, verify every one.

A task without tools is one turn: the completion is the answer. A task with tools is an episode on
the environment's server: after each assistant turn the tool calls in it (read by vLLM's tool-call
parser) go to the server, their results are appended through the chat template, and the model goes
on, until a turn without tool calls, a turn cut off by length, ``max_turns``, or a full context.
The environment's tokens stay in the sequence but are masked out of the loss.

A task of a server NeMo Gym plays with its gymnasium_agent is an episode opened by /reset (its observation ends
the episode's own prompt); every model turn goes to /step, whose tool outputs and observation are the
environment's turn, until the server ends the episode; its reward is the sum of the steps' rewards.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gymrl.config import RolloutConfig, SamplingConfig
from gymrl.envs.base import Environment, Episode, GymnasiumEpisode, Task
from gymrl.envs.client import (
    Usage,
    function_call_item,
    function_call_output_item,
    message_item,
    reasoning_item,
    responses_api_response,
)
from gymrl.models.chat import environment_turn_ids, render_prompt
from gymrl.rollout.engine import Completion, PromptTooLongError, SpecStats
from gymrl.rollout.pool import EnginePool
from gymrl.rollout.tool_calls import ParsedTurn, ToolCallParser
from rewards.types import RewardResult


@dataclass
class Rollout:
    """One sampled episode of one task, with what the trainer and the traces need."""

    task_id: str
    env: str
    prompt_ids: list[int]
    completion_ids: list[int]  # every token after the prompt: the model's and the environment's
    completion_mask: list[int]  # 1 on the model's tokens (trained on), 0 on the environment's
    logprobs: list[float]  # behaviour policy per completion token (0.0 on the environment's)
    text: str  # the last assistant turn's text (the answer)
    finish_reason: str  # stop | length | max_turns | context_full
    reward: float
    reason: str
    policy_version: int  # the oldest policy version that sampled any of its tokens
    engine_id: int = 0  # the engine that sampled its turns
    breakdown: dict[str, float] = field(default_factory=dict)
    turns: list[dict[str, Any]] = field(default_factory=list)  # chat messages after the prompt, for traces
    temperature: float = 1.0  # sampled at (tool tasks: sampling.tool_temperature); the trainer scores at it too
    versions: list[int] = field(default_factory=list)  # per completion token: the version that sampled it
    spec: SpecStats | None = None  # its turns' speculative drafts (None: off)
    # (start, end) completion positions where the engine banned the stop tokens (sampling.min_tokens): the engine's
    # behaviour logprobs are of that masked distribution, so the trainer scores those positions with it too.
    stop_banned: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.versions:  # built without per-token versions (a test, a replay): all policy_version
            self.versions = [self.policy_version] * len(self.completion_ids)

    @property
    def num_model_tokens(self) -> int:
        return sum(self.completion_mask)


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]  # grouped: consecutive runs of group_size share a task
    group_size: int
    generate_seconds: float
    verify_seconds: float
    tool_seconds: float = 0.0
    spec: SpecStats | None = None  # speculative decoding over the whole batch, every turn (None: off)

    @property
    def num_tokens(self) -> int:
        """Tokens the policy generated (the environment's are not counted)."""
        return sum(r.num_model_tokens for r in self.rollouts)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Batches of one group size as one, in order; times add up (concurrent batches overlap: the
        caller measures their wall span itself)."""
        return RolloutBatch([r for b in batches for r in b.rollouts], batches[0].group_size,
                            sum(b.generate_seconds for b in batches), sum(b.verify_seconds for b in batches),
                            sum(b.tool_seconds for b in batches), SpecStats.total([b.spec for b in batches]))


def encode_prompt(tokenizer, task: Task, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt token ids: the task's messages (and tools) through the model's chat template."""
    return render_prompt(tokenizer, task.messages, task.tools, template_kwargs)


def check_prompts_fit(tokenizer, tasks: list[Task], max_tokens: int, max_model_len: int,
                      template_kwargs: dict[str, Any] | None = None) -> None:
    """Fail before any engine starts if a task's prompt leaves no room for ``max_tokens``."""
    for task in tasks:
        n = len(encode_prompt(tokenizer, task, template_kwargs))
        if n + max_tokens > max_model_len:
            raise PromptTooLongError(
                f"task '{task.id}' of env '{task.env}': prompt has {n} tokens; with sampling.max_tokens={max_tokens} "
                f"it exceeds engine.max_model_len={max_model_len}"
            )


class EpisodeState:
    """A rollout being built: the token sequence so far, the chat history and the verify items."""

    def __init__(self, task: Task, prompt_ids: list[int], episode: Episode, sampling: SamplingConfig | None = None):
        self.task, self.prompt_ids, self.episode = task, prompt_ids, episode
        self.sampling = sampling  # every turn of the episode samples with it
        self.completion_ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []  # the environment's tokens get the version of the turn before them
        self.spec: list[SpecStats | None] = []
        self.turns: list[dict[str, Any]] = []  # assistant and tool messages, as chat messages
        self.items: list[dict[str, Any]] = []  # the same turns as Responses-API output items
        self.usage = Usage()  # the model calls' prompt and generated tokens, summed
        self.pending_calls: list = []
        self.pending_messages: list[dict[str, Any]] = []  # a gymnasium server's reply to the last turn, as messages
        self.turn_start = 0  # where the last model turn's items begin
        self.text = ""
        self.finish_reason = "stop"
        self.engine_id: int | None = None
        self.stop_banned: list[tuple[int, int]] = []

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def oldest_version(self, default: int) -> int:
        """The oldest policy version among the model's tokens (``default`` for an empty completion)."""
        return min((v for v, m in zip(self.versions, self.mask) if m), default=default)

    def add_model_turn(self, c: Completion, parser: ToolCallParser | None, parsed: ParsedTurn | None = None,
                       max_model_len: int | None = None) -> None:
        """``parsed``: the turn's tool calls as a server already read them (an OpenAI endpoint); else ``parser``
        reads them from the text. ``max_model_len``: the engine's, which caps the turn's min_tokens as it caps
        max_tokens (``engine.sampling_params``)."""
        if self.sampling is not None and self.sampling.min_tokens:
            banned = min(self.sampling.min_tokens, self.sampling.max_tokens, len(c.token_ids))
            if max_model_len is not None:
                banned = min(banned, max_model_len - len(self.ids))
            if banned > 0:
                self.stop_banned.append((len(self.completion_ids), len(self.completion_ids) + banned))
        self.usage = self.usage.add_call(len(self.ids), len(c.token_ids))
        self.completion_ids += c.token_ids
        self.mask += [1] * len(c.token_ids)
        self.logprobs += c.logprobs
        self.versions += c.versions
        self.spec.append(c.spec)
        self.text, self.finish_reason = c.text, c.finish_reason
        if self.engine_id is None:
            self.engine_id = c.engine_id
        self.turns.append({"role": "assistant", "content": c.text})
        self.turn_start = len(self.items)
        if parsed is None and parser is not None and (self.task.tools or parser.reasoning_parser is not None):
            parsed = parser.parse(c.text, self.task.tools, self.ids[:len(self.ids) - len(c.token_ids)], c.token_ids)
        self.pending_calls = parsed.tool_calls if parsed is not None and c.finish_reason == "stop" else []
        if parsed is not None and parsed.reasoning:  # the reasoning parser's share, as a served agent gets it
            self.items.append(reasoning_item(parsed.reasoning))
        if not self.pending_calls:
            self.items.append(message_item(parsed.content if parsed is not None and parsed.reasoning is not None
                                           else c.text))
            return
        if parsed.content.strip():
            self.items.append(message_item(parsed.content))
        self.items += [function_call_item(call.name, call.raw_arguments, call.call_id) for call in self.pending_calls]
        self.turns[-1]["tool_calls"] = [{"name": c.name, "arguments": c.raw_arguments} for c in self.pending_calls]

    def response(self) -> dict[str, Any]:
        """The episode as /verify gets it: its output items and its token usage, as simple_agent sends them."""
        return responses_api_response(self.items, self.usage)

    @property
    def continues(self) -> bool:
        """Whether the environment answers the last turn: its tool calls, or a gymnasium episode not yet ended."""
        return not self.episode.done if isinstance(self.episode, GymnasiumEpisode) else bool(self.pending_calls)

    def step(self) -> None:
        """The last model turn through a gymnasium server's /step. Its tool outputs (there, not here, the server
        runs the turn's calls) and observation wait in ``pending_messages`` unless the episode ended."""
        result = self.episode.step(self.items[self.turn_start:])
        self.pending_calls = []
        if result.done:
            return
        self.items += result.items()
        names = {i.get("call_id"): i.get("name") for i in self.items if i.get("type") == "function_call"}
        self.pending_messages = [{"role": "tool", "content": o["output"], "tool_call_id": o["call_id"],
                                  "name": names.get(o["call_id"], "")} for o in result.tool_outputs]
        if result.observation:
            self.pending_messages.append({"role": "user", "content": result.observation})

    def environment_turn(self) -> list[dict[str, Any]]:
        """The environment's answer to the last turn, as chat messages: the tools' results, or /step's reply."""
        if not isinstance(self.episode, GymnasiumEpisode):
            return self.call_tools()
        messages, self.pending_messages = self.pending_messages, []
        return messages

    def call_tools(self) -> list[dict[str, Any]]:
        """Call the pending tools in order on the server; returns their results as tool messages."""
        tool_messages = []
        for call in self.pending_calls:
            output = self.episode.call_tool(call.name, call.arguments)
            self.items.append(function_call_output_item(call.call_id, output))
            tool_messages.append({"role": "tool", "content": output, "tool_call_id": call.call_id, "name": call.name})
        self.pending_calls = []
        return tool_messages

    def add_environment_turn(self, tokenizer, tool_messages: list[dict[str, Any]],
                             template_kwargs: dict[str, Any] | None = None) -> None:
        """Append the tool results through the chat template: tokens the policy does not train on."""
        env_ids = environment_turn_ids(tokenizer, self.task.messages + self.turns, tool_messages, self.task.tools,
                                       template_kwargs)
        self.turns += tool_messages
        self.completion_ids += env_ids
        self.mask += [0] * len(env_ids)
        self.logprobs += [0.0] * len(env_ids)
        self.versions += [self.versions[-1] if self.versions else 0] * len(env_ids)


def turn_seed(episode_seed: int, turn: int) -> int:
    """The seed of an episode's later turn: fixed by the episode's seed and the turn, and unlike the seeds
    vLLM gives the other samples of the group (episode_seed + i)."""
    return hash((episode_seed, turn)) & 0x7FFF_FFFF


def play_episode(env: Environment, task: Task, assistant_turns: list[str], parser: ToolCallParser) -> tuple[RewardResult, list[dict[str, Any]]]:
    """Play fixed assistant turns (a gold answer, a scripted agent) against the real server, running
    their tool calls; returns the verdict and the turns with the server's tool results."""
    state = EpisodeState(task, [], env.open_episode(task))
    for text in assistant_turns:
        state.add_model_turn(Completion([], [], text, "stop"), parser)
        if isinstance(state.episode, GymnasiumEpisode):
            state.step()
            if not state.continues:
                break
        state.turns += state.environment_turn()
    if isinstance(state.episode, GymnasiumEpisode):
        return state.episode.verdict(), state.turns
    return state.episode.verify(state.items), state.turns


def verify_states(envs: dict[str, Environment], states: list[EpisodeState]) -> list[RewardResult]:
    """Every episode's verdict. Episodes without session state (no tools) of one environment go to its server in one
    /verify_batch round trip; the rest (and servers without that route) one /verify each, 8 at a time."""
    verdicts: list[RewardResult | None] = [s.episode.verdict() if isinstance(s.episode, GymnasiumEpisode) else None
                                           for s in states]  # summed as the episode was played
    by_env: dict[str, list[int]] = {}
    for k, s in enumerate(states):
        if verdicts[k] is None and not s.task.tools and not s.episode.cookies:
            by_env.setdefault(s.task.env, []).append(k)
    for env, ks in by_env.items():
        batch = envs[env].verify_batch([(states[k].task, states[k].response()) for k in ks])
        for k, v in zip(ks, batch or []):
            verdicts[k] = v
    rest = [k for k, v in enumerate(verdicts) if v is None]
    if rest:
        with ThreadPoolExecutor(8) as threads:
            for k, v in zip(rest, threads.map(lambda k: states[k].episode.verify(states[k].response()), rest)):
                verdicts[k] = v
    return verdicts


class RolloutRunner:
    """Turns tasks into rollouts on the engine pool, scored by the environments' servers."""

    def __init__(self, pool: EnginePool, envs: dict[str, Environment], tokenizer,
                 rollout: RolloutConfig | None = None, max_model_len: int | None = None):
        self.pool = pool
        self.envs = envs
        self.tokenizer = tokenizer
        self.cfg = rollout or RolloutConfig()
        self.max_model_len = max_model_len
        self._parser: ToolCallParser | None = None
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    @property
    def parser(self) -> ToolCallParser:
        if self._parser is None:
            self._parser = ToolCallParser(self.cfg.tool_call_parser, self.tokenizer, self.cfg.reasoning_parser)
        return self._parser

    def prompt_ids(self, task: Task) -> list[int]:
        key = (task.env, task.id)
        ids = self._prompt_cache.get(key)
        if ids is None:
            ids = self._prompt_cache[key] = encode_prompt(self.tokenizer, task, self.cfg.chat_template_kwargs)
        return ids

    def run(self, tasks: list[Task], group_size: int, sampling: SamplingConfig, policy_version: int,
            seed: int | None = None) -> RolloutBatch:
        """``sampling`` for tasks without tools; tasks with tools get ``sampling.for_tools()`` on every turn.
        ``seed`` fixes every sampled token: episode k (task k // group_size) samples its first turn with
        seed + k and later turns with seeds derived from it, whatever else the engines are doing."""
        parser = self.parser if self.cfg.reasoning_parser is not None or any(t.tools for t in tasks) else None
        tool_sampling = sampling.for_tools()

        def sampling_of(task: Task) -> SamplingConfig:
            return tool_sampling if task.tools else sampling

        with ThreadPoolExecutor(8) as threads:
            episodes = list(threads.map(lambda t: self.envs[t.env].open_episode(t), [t for t in tasks for _ in range(group_size)]))
        states = [EpisodeState(e.task, encode_prompt(self.tokenizer, e.task, self.cfg.chat_template_kwargs)
                               if e.own_prompt else self.prompt_ids(e.task), e, sampling_of(e.task)) for e in episodes]
        position = {id(s): k for k, s in enumerate(states)}  # an episode's index: its seed is seed + index
        generate_seconds = tool_seconds = 0.0

        started = time.perf_counter()
        if any(e.own_prompt for e in episodes):  # each episode its own prompt, its own seed: the same seeds
            first = self.pool.generate([s.prompt_ids for s in states], 1, [s.sampling for s in states],
                                       seeds=None if seed is None else [seed + k for k in range(len(states))])
        else:
            first = self.pool.generate([self.prompt_ids(t) for t in tasks], group_size,
                                       [sampling_of(t) for t in tasks],
                                       seeds=None if seed is None else [seed + j * group_size for j in range(len(tasks))])
        generate_seconds += time.perf_counter() - started
        spec = [first.spec]
        active, completions = states, [c for group in first.groups for c in group]
        for turn in range(1, self.cfg.max_turns + 1):
            for state, c in zip(active, completions):
                state.add_model_turn(c, parser, max_model_len=self.max_model_len)
            stepped = [s for s in active if isinstance(s.episode, GymnasiumEpisode)]
            if stepped:  # gymnasium_agent steps after every model call, the last one too
                started = time.perf_counter()
                with ThreadPoolExecutor(8) as threads:
                    list(threads.map(EpisodeState.step, stepped))
                tool_seconds += time.perf_counter() - started
            active = [s for s in active if s.continues]
            if not active:
                break
            if turn == self.cfg.max_turns:
                for s in active:
                    s.finish_reason = "max_turns"
                break
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as threads:
                results = list(threads.map(EpisodeState.environment_turn, active))
            for state, tool_messages in zip(active, results):
                state.add_environment_turn(self.tokenizer, tool_messages, self.cfg.chat_template_kwargs)
            tool_seconds += time.perf_counter() - started
            full = [s for s in active if self.max_model_len is not None and len(s.ids) >= self.max_model_len]
            for s in full:
                s.finish_reason = "context_full"
            capped = [s for s in active if s.episode.env.max_steps and turn >= s.episode.env.max_steps and s not in full]
            for s in capped:  # a NeMo Gym agent's max_steps: its last model call's tools ran, then it stops
                s.finish_reason = "max_turns"
            active = [s for s in active if s not in full and s not in capped]
            if not active:
                break
            started = time.perf_counter()
            # A later turn goes back to the engine of the first: its prefix is in that engine's cache.
            turn_seeds = None if seed is None else [turn_seed(seed + position[id(s)], turn) for s in active]
            turn_reply = self.pool.generate([s.ids for s in active], 1, [s.sampling for s in active],
                                            [s.engine_id for s in active], turn_seeds)
            generate_seconds += time.perf_counter() - started
            completions = [g[0] for g in turn_reply.groups]
            spec.append(turn_reply.spec)

        started = time.perf_counter()
        verdicts = verify_states(self.envs, states)
        rollouts = [
            Rollout(s.task.id, s.task.env, s.prompt_ids, s.completion_ids, s.mask, s.logprobs, s.text, s.finish_reason,
                    v.reward, v.reason, s.oldest_version(policy_version), s.engine_id or 0, v.breakdown, s.turns,
                    s.sampling.temperature, s.versions, SpecStats.total(s.spec), s.stop_banned)
            for s, v in zip(states, verdicts)
        ]
        return RolloutBatch(rollouts, group_size, generate_seconds, time.perf_counter() - started, tool_seconds,
                            SpecStats.total(spec))
