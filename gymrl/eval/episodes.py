"""Episodes against an OpenAI-compatible endpoint, built from the rollout runner's parts.

The endpoint applies the chat template itself, so an episode is a list of chat messages, not a token
sequence; everything else is the training path's: the environment's episode (session, tool routes,
/verify), :class:`EpisodeState` (turns, Responses-API items, tool calls), vLLM's tool-call parsers, and
:class:`Rollout` for the trace store. A turn whose calls gymrl read from the text goes back with its raw
text (the template renders the model's own words, as in training); a turn the server parsed goes back
with the server's ``content`` and ``tool_calls``.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gymrl.config import RolloutConfig, SamplingConfig
from gymrl.envs.base import Environment, GymnasiumEpisode, Task
from gymrl.eval.endpoint import ChatEndpoint
from gymrl.models.chat import chat_tools
from gymrl.rollout.engine import Completion
from gymrl.rollout.runner import EpisodeState, Rollout, encode_prompt
from gymrl.rollout.tool_calls import ToolCallParser


def _assistant_message(text: str, calls: list, server_parsed: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls and server_parsed:
        message["tool_calls"] = [{"id": c.call_id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.raw_arguments}} for c in calls]
    return message


class EndpointRunner:
    """``run(tasks, samples, sampling, on_done)``: ``samples`` episodes of each task, at most
    ``endpoint.cfg.concurrency`` at once; returns their rollouts grouped by task, in task order."""

    def __init__(self, endpoint: ChatEndpoint, envs: dict[str, Environment], rollout: RolloutConfig,
                 tokenizer=None):
        self.endpoint, self.envs, self.cfg, self.tokenizer = endpoint, envs, rollout, tokenizer
        self.parser = ToolCallParser(rollout.tool_call_parser, tokenizer) if tokenizer is not None else None

    def _ids(self, text: str, finish_reason: str) -> list[int]:
        """A turn's tokens by the local tokenizer (the end-of-turn token closes a finished turn)."""
        if self.tokenizer is None:
            return []
        closed = text + self.tokenizer.eos_token if finish_reason == "stop" else text
        return self.tokenizer(closed, add_special_tokens=False)["input_ids"]

    def episode(self, task: Task, sampling: SamplingConfig) -> Rollout:
        kwargs = self.cfg.chat_template_kwargs
        episode = self.envs[task.env].open_episode(task)  # its task's messages end with /reset's observation, if any
        prompt_ids = encode_prompt(self.tokenizer, episode.task, kwargs) if self.tokenizer is not None else []
        state = EpisodeState(episode.task, prompt_ids, episode, sampling)
        messages = list(episode.task.messages)
        for turn in range(1, self.cfg.max_turns + 1):
            reply = self.endpoint.chat(messages, chat_tools(task.tools), sampling, kwargs)
            ids = self._ids(reply.text, reply.finish_reason)
            state.add_model_turn(Completion(ids, [0.0] * len(ids), reply.text, reply.finish_reason), self.parser,
                                 reply.parsed)
            calls = state.pending_calls
            if isinstance(episode, GymnasiumEpisode):  # gymnasium_agent steps after every model call, the last too
                state.step()
            if not state.continues:
                break
            if turn == self.cfg.max_turns:
                state.finish_reason = "max_turns"
                break
            messages.append(_assistant_message(reply.text, calls, reply.parsed is not None))
            tool_messages = state.environment_turn()
            messages += tool_messages
            if self.tokenizer is not None:
                state.add_environment_turn(self.tokenizer, tool_messages, kwargs)
            else:
                state.turns += tool_messages
            if state.episode.env.max_steps and turn >= state.episode.env.max_steps:  # a NeMo Gym agent's limit
                state.finish_reason = "max_turns"
                break
        # token counts only where the local tokenizer counted the turns
        verdict = episode.verdict() if isinstance(episode, GymnasiumEpisode) else \
            episode.verify(state.response() if self.tokenizer is not None else state.items)
        return Rollout(task.id, task.env, state.prompt_ids, state.completion_ids, state.mask, state.logprobs,
                       state.text, state.finish_reason, verdict.reward, verdict.reason, 0, 0, verdict.breakdown,
                       state.turns, sampling.temperature)

    def run(self, tasks: list[Task], samples: int, sampling: SamplingConfig,
            on_done: Callable[[], None] = lambda: None) -> list[Rollout]:
        tool_sampling = sampling.for_tools()

        def one(task: Task) -> Rollout:
            rollout = self.episode(task, tool_sampling if task.tools else sampling)
            on_done()
            return rollout

        threads = ThreadPoolExecutor(self.endpoint.cfg.concurrency)
        try:
            futures = [threads.submit(one, t) for t in tasks for _ in range(samples)]
            return [f.result() for f in futures]
        finally:  # on an error, episodes not yet started are dropped rather than each waiting out its timeout
            threads.shutdown(wait=True, cancel_futures=True)
