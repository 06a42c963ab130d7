"""Multi-turn tool-use rollouts on the real engine and the real tool_use server: tool calls parsed by
vLLM's parser, tool results appended through the chat template and masked out of the loss, every turn
kept, and the trainer's logprobs lining up with the engine's across the environment's tokens."""

import json
from pathlib import Path

import pytest
import torch

from gymrl.train.loop import GRPOTrainer
from gymrl.train.policy import pad_batch, token_logprobs

ROOT = Path(__file__).resolve().parents[1]
TOOL_CONFIG = ROOT / "configs" / "tool_use.yaml"


@pytest.fixture(scope="module")
def tool_session(tmp_path_factory):
    from gymrl.config import load_config
    from gymrl.session import start_session

    cfg = load_config(TOOL_CONFIG, {"run_dir": str(tmp_path_factory.mktemp("tool_run")),
                                    "model.cache_dir": str(ROOT / ".cache" / "models")})
    s = start_session(cfg)
    yield s
    s.close()


@pytest.fixture(scope="module")
def batch(tool_session):
    tasks = tool_session.envs["tool_use"].tasks("eval")[:16]
    return tool_session.runner.run(tasks, 4, tool_session.cfg.sampling, policy_version=0)


def test_episodes_call_tools_over_several_turns(batch):
    rollouts = batch.rollouts
    assert len(rollouts) == 64
    multi = [r for r in rollouts if sum(t["role"] == "assistant" for t in r.turns) >= 2]
    assert len(multi) >= len(rollouts) // 2, [r.turns for r in rollouts[:4]]
    for r in multi:
        roles = [t["role"] for t in r.turns]
        assert roles[0] == "assistant" and roles[1] == "tool" and "tool_calls" in r.turns[0]
    # Sampled at temperature 1 the model sometimes garbles a name ("kv_getanswer"): that call gets an
    # error back as its tool result, and the episode goes on. Most first calls name a real tool.
    named = [r.turns[0]["tool_calls"][0]["name"] in ("calculator", "kv_get", "kv_set") for r in multi]
    assert sum(named) >= 0.75 * len(multi), [r.turns[0] for r in multi]
    assert batch.tool_seconds > 0
    # The model reads its task: most calculator calls carry the task's own expression, and the
    # server's result comes back as the tool turn.
    calc = [r for r in multi if r.task_id.startswith("calc-") and r.turns[0]["tool_calls"][0]["name"] == "calculator"]
    exact = [r for r in calc if json.loads(r.turns[0]["tool_calls"][0]["arguments"]).get("expression") == r.task_id[5:]]
    assert len(exact) >= len(calc) // 2 > 0, [r.turns[0] for r in calc]
    for r in exact:
        a, b = map(int, r.task_id[5:].split("*"))
        assert json.loads(r.turns[1]["content"]) == {"result": a * b}


def test_environment_tokens_are_masked_and_hold_the_tool_results(tool_session, batch):
    tok = tool_session.tokenizer
    for r in batch.rollouts:
        assert len(r.completion_ids) == len(r.completion_mask) == len(r.logprobs)
        env_text = tok.decode([i for i, m in zip(r.completion_ids, r.completion_mask) if not m])
        for turn in r.turns:
            if turn["role"] == "tool":
                assert turn["content"] in env_text  # the server's own reply, e.g. {"result":1776}
        assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.completion_mask) if not m)
        assert all(lp < 0.0 or lp == pytest.approx(0.0, abs=1e-3) for lp, m in zip(r.logprobs, r.completion_mask) if m)
    assert batch.num_tokens == sum(sum(r.completion_mask) for r in batch.rollouts)


def test_trainer_logprobs_match_the_engine_across_environment_turns(tool_session, batch):
    """Position bookkeeping across the masked environment tokens: the trainer's logprob of every model
    token (with the tool results in context) equals the one vLLM sampled it with."""
    multi = [r for r in batch.rollouts if 0 in r.completion_mask][:8]
    assert multi
    ids, attn, mask = pad_batch([r.prompt_ids for r in multi], [r.completion_ids for r in multi],
                                tool_session.tokenizer.pad_token_id, [r.completion_mask for r in multi])
    with torch.no_grad():
        logps = token_logprobs(tool_session.policy, ids, attn, tool_session.cfg.sampling.temperature)
    for i, r in enumerate(multi):
        begin = len(r.prompt_ids) - 1
        got = logps[i, begin : begin + len(r.completion_ids)]
        own = torch.tensor(r.completion_mask, dtype=torch.bool)
        assert mask[i, begin : begin + len(r.completion_ids)].bool().tolist() == own.tolist()
        assert torch.allclose(got[own], torch.tensor(r.logprobs)[own], atol=1e-4)


def test_a_grpo_step_on_multi_turn_rollouts(tool_session, batch):
    trainer = GRPOTrainer(tool_session)
    result = trainer.step(batch)
    assert torch.isfinite(torch.tensor(result.loss)) and result.logprob_gap < 1e-4
    assert trainer.push_weights() > 0
