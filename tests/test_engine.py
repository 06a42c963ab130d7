"""The real vLLM engine on a real Ray actor: sampling, logprobs, and weight pushes into it."""

import pytest
import torch

from gymrl.config import SamplingConfig
from gymrl.rollout.engine import PromptTooLongError
from gymrl.rollout.weight_sync import pack_state_dict
from gymrl.train.policy import logprobs_from_logits, pad_batch, stop_banned_mask, stop_token_ids, token_logprobs

# Engine and trainer both run the model in float32 on CPU; measured differences are ~1e-6 (summation
# order in the fused vLLM kernels vs PyTorch). 1e-4 leaves room for that and is far below the
# effect of one optimizer step (> 1e-2 below).
LOGPROB_TOL = 1e-4


def trainer_logprobs(session, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids, attn, mask = pad_batch([prompt], [completion], session.tokenizer.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(session.policy, ids, attn)
    return lp[0][mask[0].bool()]


def test_generates_groups_with_behaviour_logprobs(fresh_session):
    s = fresh_session
    tasks = s.envs["arithmetic"].tasks("train")[:3]
    batch = s.runner.run(tasks, 4, SamplingConfig(max_tokens=24), policy_version=0)
    assert len(batch.rollouts) == 12
    assert [r.task_id for r in batch.rollouts] == [t.id for t in tasks for _ in range(4)]
    for r in batch.rollouts:
        assert 0 < len(r.completion_ids) <= 24 and len(r.logprobs) == len(r.completion_ids)
        assert r.reward in (0.0, 1.0) and r.reason
        assert r.text == s.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
        # The engine's behaviour logprobs are the trainer's logprobs of the same tokens.
        ours = trainer_logprobs(s, r.prompt_ids, r.completion_ids)
        assert torch.allclose(ours, torch.tensor(r.logprobs), atol=LOGPROB_TOL)


def test_min_tokens_behaviour_logprobs_match_the_trainer(fresh_session):
    """With sampling.min_tokens the engine samples with the stop tokens banned and reports the logprobs of that
    masked distribution; the trainer, told where the ban held, scores the same tokens the same way."""
    s = fresh_session
    tasks = s.envs["arithmetic"].tasks("train")[:2]
    batch = s.runner.run(tasks, 2, SamplingConfig(max_tokens=24, min_tokens=24), policy_version=0)
    stop = stop_token_ids(s.tokenizer, s.policy)
    for r in batch.rollouts:
        assert len(r.completion_ids) == 24 and r.stop_banned == [(0, 24)]
        ids, attn, mask = pad_batch([r.prompt_ids], [r.completion_ids], s.tokenizer.pad_token_id)
        banned = stop_banned_mask([len(r.prompt_ids)], [r.stop_banned], ids.shape[1])
        with torch.no_grad():
            logits = s.policy(input_ids=ids, attention_mask=attn).logits
        ours = logprobs_from_logits(logits, ids, 1.0, banned, stop)[0][mask[0].bool()]
        assert torch.allclose(ours, torch.tensor(r.logprobs), atol=LOGPROB_TOL)


def test_weight_push_lands_in_the_live_engine(fresh_session):
    s = fresh_session
    task = s.envs["arithmetic"].tasks("eval")[0]
    prompt = s.runner.prompt_ids(task)
    completion = s.tokenizer.encode("<think>1+1</think><answer>2</answer>") + [s.tokenizer.eos_token_id]
    sequence = prompt + completion
    before = torch.tensor(s.pool.score([sequence])[0])

    # One real optimizer step of the trainer: raise the likelihood of this completion.
    opt = torch.optim.SGD(s.policy.parameters(), lr=0.5)
    ids, attn, mask = pad_batch([prompt], [completion], s.tokenizer.pad_token_id)
    loss = -(token_logprobs(s.policy, ids, attn) * mask).sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        trainer_after = token_logprobs(s.policy, ids, attn)[0][len(prompt) - 1 :]

    seconds = s.pool.push_weights(pack_state_dict(s.policy.state_dict()), version=1)
    after = torch.tensor(s.pool.score([sequence])[0])
    engine_after = after[len(prompt) - 1 :]
    assert seconds > 0
    assert (after - before).abs().max() > 1e-2, "the push did not change the engine's logprobs"
    assert torch.allclose(engine_after, trainer_after, atol=LOGPROB_TOL), (engine_after - trainer_after).abs().max()

    assert s.pool.stats()[0].policy_version == 1


def test_prompt_longer_than_context_is_a_clear_error(fresh_session):
    too_long = list(range(10, 10 + fresh_session.cfg.engine.max_model_len))
    with pytest.raises(PromptTooLongError, match="exceeds engine.max_model_len"):
        fresh_session.pool.generate([too_long], 2, SamplingConfig(max_tokens=4))
