"""Tool use: calculator and key-value tools on the real NeMo Gym server, vLLM's own tool-call parsers,
the chat-template bookkeeping of multi-turn episodes, and NeMo Gym's own stateful example server."""

import json

import pytest

from environments.tool_use import tool_call_text
from environments.tool_use.tools import CALCULATOR, KV_GET, KV_SET, calculate
from gymrl.envs.client import EnvClient
from gymrl.envs.launcher import EnvServer
from gymrl.envs.registry import load_environment
from gymrl.models.chat import TemplateError, environment_turn_ids, render_prompt, tokenize_transcript
from gymrl.models.tokenizer import build_tokenizer
from gymrl.rollout.runner import play_episode
from gymrl.rollout.tool_calls import ToolCallParser
from rewards.tool_use import score_kv_copy, score_lookup


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([])


@pytest.fixture(scope="module")
def parsers(tokenizer):
    return {"qwen3_coder": ToolCallParser("qwen3_coder", tokenizer), "json": ToolCallParser("hermes", tokenizer)}


@pytest.fixture(scope="module")
def server():
    with EnvServer("tool_use") as s:
        yield s


def attached(server, **args):
    env = load_environment("tool_use", args)
    env.attach(EnvClient("tool_use", server.url))
    return env


# --- the calculator tool: integer arithmetic only, whatever the model sends --------------------------

def test_calculator_computes():
    assert calculate("37*48") == 1776
    assert calculate(" (7 - 10) * -2 + 9 // 2 % 3 ") == 7


@pytest.mark.parametrize("expression", [
    "__import__('os').system('id')", "open('/etc/passwd')", "2**100", "9**9**9", "(1).__class__", "x + 1",
    "1/0", "7 // 0", "1.5 * 2", "'a' * 3", "10**12 * 10", "99999999 * 99999999", "1+" * 150 + "1", "", "٣*٤",
])
def test_calculator_refuses_anything_else(expression):
    with pytest.raises(ValueError):
        calculate(expression)


# --- the end-state reward ------------------------------------------------------------------------------

def test_kv_copy_reward_checks_the_end_state():
    initial = {"ab": "1234", "cd": "5678"}
    assert score_kv_copy(initial, initial | {"ef": "1234"}, "ab", "ef").reward == 1.0
    assert "never set" in score_kv_copy(initial, initial, "ab", "ef").reason
    assert score_kv_copy(initial, initial | {"ef": "1235"}, "ab", "ef").reward == 0.0
    wrote_more = score_kv_copy(initial, {"ab": "1234", "cd": "1234", "ef": "1234"}, "ab", "ef")
    assert wrote_more.reward == 0.0 and "cd" in wrote_more.reason
    assert score_kv_copy(initial, initial | {"ef": "1234", "zz": "1"}, "ab", "ef").reward == 0.0


def test_lookup_reward_needs_the_key_read():
    store = {"ab": "47", "cd": "12"}
    assert score_lookup("<answer>47</answer>", store, "ab", {"ab"}).reward == 1.0
    assert "without reading key 'ab'" in score_lookup("<answer>47</answer>", store, "ab", {"cd"}).reason
    assert score_lookup("<answer>48</answer>", store, "ab", {"ab"}).reward == 0.0


# --- vLLM's tool-call parsers on both formats ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["qwen3_coder", "json"])
def test_parser_reads_the_format_the_env_writes(parsers, fmt):
    text = "Let me look.\n" + tool_call_text("kv_set", {"key": "ab", "value": "0123"}, fmt)
    turn = parsers[fmt].parse(text, [KV_GET, KV_SET])
    assert [(c.name, c.arguments) for c in turn.tool_calls] == [("kv_set", {"key": "ab", "value": "0123"})]
    assert turn.content.strip() == "Let me look."
    two = parsers[fmt].parse(tool_call_text("kv_get", {"key": "ab"}, fmt) + "\n" + tool_call_text("kv_get", {"key": "cd"}, fmt),
                             [KV_GET])
    assert [c.arguments["key"] for c in two.tool_calls] == ["ab", "cd"]


@pytest.mark.parametrize("text", ["", "<answer>5</answer>", "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\n</tool_call>",
                                  "<tool_call>not a call</tool_call>", "\u202e<tool_call>" * 50])
def test_malformed_or_absent_calls_are_plain_text(parsers, text):
    turn = parsers["json"].parse(text, [CALCULATOR])
    assert turn.tool_calls == [] and turn.content == text


def test_unknown_parser_name_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="rollout.tool_call_parser: unknown parser 'qwen9'.*hermes"):
        ToolCallParser("qwen9", tokenizer)


# --- chat-template bookkeeping --------------------------------------------------------------------------

def test_environment_turn_is_the_templates_text_between_assistant_turns(tokenizer):
    history = [{"role": "user", "content": "What is 2*3?"}, {"role": "assistant", "content": "<tool_call>x</tool_call>"}]
    ids = environment_turn_ids(tokenizer, history, [{"role": "tool", "content": '{"result":6}'}], [CALCULATOR])
    assert tokenizer.decode(ids) == '\n<|im_start|>tool\n{"result":6}<|im_end|>\n<|im_start|>assistant\n'


def test_transcript_masks_the_environments_tokens_and_matches_the_template(tokenizer):
    env = load_environment("tool_use")
    task = next(t for t in env.tasks("train") if t.row["kind"] == "kv")
    gold = env.gold_response(task)
    conv = tokenize_transcript(tokenizer, task.messages, gold, task.tools)
    whole = tokenizer.apply_chat_template(task.messages + gold, tools=[{"type": "function", "function": f} for f in task.tools],
                                          tokenize=False)
    assert tokenizer.decode(conv.prompt_ids + conv.completion_ids) + "\n" == whole
    assert conv.prompt_ids == render_prompt(tokenizer, task.messages, task.tools)
    model_text = tokenizer.decode([i for i, m in zip(conv.completion_ids, conv.completion_mask) if m])
    env_text = tokenizer.decode([i for i, m in zip(conv.completion_ids, conv.completion_mask) if not m])
    assert "kv_set" in model_text and "<answer>done</answer>" in model_text and '"ok"' not in model_text
    assert '{"ok":true}' in env_text and "kv_set" not in env_text
    assert "Tools: kv_get(key) kv_set(key, value)" in tokenizer.decode(conv.prompt_ids)


def test_template_that_rewrites_history_is_refused(tokenizer):
    tokenizer = build_tokenizer([])
    tokenizer.chat_template = ("{%- for m in messages -%}{{ m['role'] + (messages | length | string) + ':' + m['content'] }}"
                               "{%- endfor -%}{%- if add_generation_prompt -%}assistant:{%- endif -%}")
    with pytest.raises(TemplateError, match="prefix-stable"):
        environment_turn_ids(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                             [{"role": "tool", "content": "r"}])


# --- episodes on the real server ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt,parser", [("qwen3_coder", "qwen3_coder"), ("json", "json")])
def test_gold_episodes_score_one_in_both_formats(server, parsers, fmt, parser):
    env = attached(server, tool_format=fmt, kinds=("calc", "kv", "lookup"))
    for task in env.tasks("eval")[:6]:
        gold = env.gold_response(task)
        verdict, played = play_episode(env, task, [t["content"] for t in gold if t["role"] == "assistant"], parsers[parser])
        assert verdict.reward == 1.0, (task.id, verdict)
        assert [t["content"] for t in played if t["role"] == "tool"] == [t["content"] for t in gold if t["role"] == "tool"]


def test_wrong_or_claimed_results_score_zero(server, parsers):
    env = attached(server)
    kv = next(t for t in env.tasks("eval") if t.row["kind"] == "kv")
    calc = next(t for t in env.tasks("eval") if t.row["kind"] == "calc")
    src, dst = kv.row["source"], kv.row["target"]
    wrong_value = str(int(kv.row["initial_store"][src]) + 1)
    cases = {
        "claims success": (kv, ["<answer>done</answer>"], "never set"),
        "copies a wrong value": (kv, [tool_call_text("kv_set", {"key": dst, "value": wrong_value}, "qwen3_coder"), "ok"], "holds"),
        "overwrites the source": (kv, [tool_call_text("kv_set", {"key": dst, "value": kv.row["initial_store"][src]}, "qwen3_coder")
                                       + tool_call_text("kv_set", {"key": src, "value": "0"}, "qwen3_coder"), "ok"], "other keys"),
        "ends on a tool call": (kv, [tool_call_text("kv_get", {"key": src}, "qwen3_coder")], "without a final answer"),
        "answers without the tool, wrongly": (calc, [f"<answer>{calc.row['expected'] + 1}</answer>"], "expected"),
    }
    for name, (task, turns, reason) in cases.items():
        verdict, _ = play_episode(env, task, turns, parsers["qwen3_coder"])
        assert verdict.reward == 0.0 and reason in verdict.reason, (name, verdict)


def test_bad_tool_calls_reach_the_model_as_errors(server, parsers):
    env = attached(server)
    task = next(t for t in env.tasks("eval") if t.row["kind"] == "calc")
    episode = env.open_episode(task)
    assert "unknown tool 'verify'" in episode.call_tool("verify", {})  # only the task's tools reach the server
    assert "unknown tool 'kv_set'" in episode.call_tool("kv_set", {"key": "a", "value": "b"})
    assert "not a JSON object" in episode.call_tool("calculator", None)
    assert json.loads(episode.call_tool("calculator", {"expr": "1+1"}))["detail"][0]["type"] == "missing"  # FastAPI's 422
    assert json.loads(episode.call_tool("calculator", {"expression": "2**99"})) == {"error": "unsupported syntax: BinOp"}


def test_episodes_do_not_share_state(server, parsers):
    """Interleaved episodes of the same task each see only their own store (per-episode session cookies)."""
    env = attached(server)
    task = next(t for t in env.tasks("eval") if t.row["kind"] == "kv")
    src, dst = task.row["source"], task.row["target"]
    a, b = env.open_episode(task), env.open_episode(task)
    assert a.cookies != b.cookies
    a.call_tool("kv_set", {"key": dst, "value": task.row["initial_store"][src]})
    assert "error" in json.loads(b.call_tool("kv_get", {"key": dst}))
    assert a.verify([{"type": "message", "role": "assistant", "id": "m", "status": "completed",
                      "content": [{"type": "output_text", "text": "done", "annotations": []}]}]).reward == 1.0
    assert "error" in json.loads(a.call_tool("kv_get", {"key": src}))  # verify freed the finished episode's store


# --- NeMo Gym's own stateful example runs under gymrl unchanged -------------------------------------

def test_nemo_gyms_session_state_example_runs_in_gymrl(parsers):
    """As a config names it (`envs: - nemo_gym: example_session_state_mgmt`): its rows, its server, unchanged."""
    from gymrl.config import EnvConfig
    from gymrl.envs.sources import open_environment, server_process

    env = open_environment(EnvConfig(nemo_gym="example_session_state_mgmt"))
    with server_process(env) as server:
        env.attach(EnvClient(env.name, server.url))
        for task in (env.tasks("train") + env.tasks("eval"))[:3]:
            row = task.row
            add = row["expected_count"] - row["initial_count"]
            call = tool_call_text("increment_counter", {"count": add}, "qwen3_coder")
            verdict, played = play_episode(env, task, [call, "done"], parsers["qwen3_coder"])
            assert verdict.reward == 1.0 and played[1]["content"] == '{"success":true}', (row, verdict, played)
            wrong, _ = play_episode(env, task, [tool_call_text("increment_counter", {"count": add + 1}, "qwen3_coder"), "done"],
                                    parsers["qwen3_coder"])
            assert wrong.reward == 0.0
