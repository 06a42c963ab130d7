"""Thinking is not acting: with ``rollout.reasoning_parser`` set, a turn is split into reasoning, content and
tool calls by the parser that ``vllm serve --reasoning-parser R --tool-call-parser T`` composes, tool calls are
read from the content only, and /verify gets the reasoning as a reasoning item. Episodes run on the real
tool_use server; the model's turns are fixed texts tokenised by the tiny model's tokenizer."""

import pytest

from environments.tool_use import tool_call_text
from gymrl.envs.client import EnvClient
from gymrl.envs.launcher import EnvServer
from gymrl.envs.registry import load_environment
from gymrl.models.chat import render_prompt
from gymrl.models.tokenizer import build_tokenizer
from gymrl.rollout.engine import Completion
from gymrl.rollout.runner import EpisodeState
from gymrl.rollout.tool_calls import ToolCallParser

FORMATS = {"qwen3_coder": "qwen3_coder", "hermes": "json"}  # vLLM's parser -> the tool_use plugin's format


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([])


@pytest.fixture(scope="module")
def server():
    with EnvServer("tool_use") as s:
        yield s


def calc_task(server, fmt):
    env = load_environment("tool_use", {"tool_format": FORMATS[fmt]})
    env.attach(EnvClient("tool_use", server.url))
    return env, next(t for t in env.tasks("eval") if t.row["kind"] == "calc")


def play(env, task, texts, parser, tokenizer) -> EpisodeState:
    """The fixed turns as an engine would return them (token ids by the tokenizer), tools run on the server,
    their results appended through the chat template, until a turn without tool calls."""
    state = EpisodeState(task, render_prompt(tokenizer, task.messages, task.tools), env.open_episode(task))
    for text in texts:
        ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        state.add_model_turn(Completion(ids, [0.0] * len(ids), text, "stop", versions=[0] * len(ids)), parser)
        if not state.pending_calls:
            break
        state.add_environment_turn(tokenizer, state.call_tools())
    return state


def call_of(task, fmt) -> str:
    return tool_call_text("calculator", {"expression": task.row["id"].removeprefix("calc-")}, FORMATS[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tool_call_inside_the_reasoning_is_not_run(server, tokenizer, fmt):
    env, task = calc_task(server, fmt)
    answer = f"<answer>{task.row['expected']}</answer>"
    text = f"<think>I could write {call_of(task, fmt)} here</think>{answer}"
    state = play(env, task, [text], ToolCallParser(fmt, tokenizer, "deepseek_r1"), tokenizer)
    assert [i["type"] for i in state.items] == ["reasoning", "message"]
    assert "<tool_call>" in state.items[0]["summary"][0]["text"]
    assert state.items[1]["content"][0]["text"] == answer
    # one model turn and nothing from the environment: every completion token is the model's, all in the loss
    assert len(state.turns) == 1 and state.completion_ids and set(state.mask) == {1}
    # Without the reasoning parser the same text runs the call (the skew this option removes).
    plain = play(env, task, [text, answer], ToolCallParser(fmt, tokenizer), tokenizer)
    assert [t["role"] for t in plain.turns] == ["assistant", "tool", "assistant"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_call_after_the_reasoning_runs_and_only_the_environments_tokens_leave_the_loss(server, tokenizer, fmt):
    env, task = calc_task(server, fmt)
    answer = f"<answer>{task.row['expected']}</answer>"
    turns = [f"<think>I need the calculator</think>{call_of(task, fmt)}", f"<think>it said so</think>{answer}"]
    state = play(env, task, turns, ToolCallParser(fmt, tokenizer, "deepseek_r1"), tokenizer)
    assert [i["type"] for i in state.items] == ["reasoning", "function_call", "function_call_output", "reasoning",
                                                "message"]
    assert state.items[-1]["content"][0]["text"] == answer
    assert state.episode.verify(state.items).reward == 1.0
    model = tokenizer.decode([i for i, m in zip(state.completion_ids, state.mask) if m])
    environment = tokenizer.decode([i for i, m in zip(state.completion_ids, state.mask) if not m])
    assert "I need the calculator" in model and "it said so" in model and answer in model  # reasoning is trained on
    assert str(task.row["expected"]) in environment and "calculator" not in environment and "think" not in environment


def test_the_split_is_the_served_one(tokenizer):
    """vLLM 0.32's nemotron_v3 and qwen3 parsers end the reasoning at a ``<tool_call>`` (vllm serve returns such a
    call as a call); deepseek_r1 keeps it in the reasoning. gymrl reads each as the server does."""
    call = tool_call_text("calculator", {"expression": "1+2"}, "qwen3_coder")
    tools = [{"name": "calculator", "description": "d", "parameters": {"type": "object", "properties": {
        "expression": {"type": "string"}}, "required": ["expression"]}}]
    text = f"<think>let me see {call}</think>"
    served = {name: ToolCallParser("qwen3_coder", tokenizer, name).parse(text, tools)
              for name in ("nemotron_v3", "qwen3", "deepseek_r1")}
    assert [c.arguments for c in served["nemotron_v3"].tool_calls] == [{"expression": "1+2"}]
    assert served["nemotron_v3"].reasoning.strip() == "let me see"
    assert [c.name for c in served["qwen3"].tool_calls] == ["calculator"]
    assert served["deepseek_r1"].tool_calls == [] and call in served["deepseek_r1"].reasoning
    # Without tools nothing is read as a call, and without a reasoning parser the text stays whole.
    assert ToolCallParser("qwen3_coder", tokenizer, "deepseek_r1").parse(f"<think>x</think>{call}", None).tool_calls == []
    plain = ToolCallParser("qwen3_coder", tokenizer).parse("<think>x</think><answer>3</answer>", tools)
    assert plain.content == "<think>x</think><answer>3</answer>" and plain.reasoning is None


def test_an_unknown_reasoning_parser_is_named(tokenizer):
    with pytest.raises(Exception, match="nonesuch"):
        ToolCallParser("qwen3_coder", tokenizer, "nonesuch")
