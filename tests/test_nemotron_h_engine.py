"""A tiny Nemotron-H (Mamba-2 + attention + MLP; vLLM's CPU build has no non-gated MoE, so no E layers) served by
the real vLLM CPU engine: its prompt logprobs match the trainer's, and pushes land, Mamba's A_log and dt_bias
included. About 60 s (build 17 s, engine start 40 s)."""

from pathlib import Path

import pytest
import ray
import torch

from gymrl.config import load_config
from gymrl.envs.registry import load_environment
from gymrl.models.checkpoint import load_policy
from gymrl.rollout.engine import EnginePool, start_engines
from gymrl.rollout.runner import encode_prompt
from gymrl.rollout.weight_sync import pack_policy, reload_order
from gymrl.session import init_ray, resolve_model_path
from gymrl.train.policy import pad_batch, token_logprobs

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TOL = 2e-3  # float32 on both sides; measured 1.7e-5


def test_reload_order_puts_a_log_last_and_keeps_the_rest_in_order():
    names = ["model.embeddings.weight", "model.layers.0.mixer.A_log", "model.layers.0.mixer.D",
             "model.layers.0.mixer.dt_bias", "model.layers.2.mixer.A_log", "lm_head.weight"]
    ordered = [name for name, _ in reload_order({n: torch.zeros(1) for n in names})]
    assert ordered == ["model.embeddings.weight", "model.layers.0.mixer.D", "model.layers.0.mixer.dt_bias",
                       "lm_head.weight", "model.layers.0.mixer.A_log", "model.layers.2.mixer.A_log"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = load_config(DEMO_CONFIG, {
        "model.cache_dir": str(tmp_path_factory.mktemp("models")),
        "model.build_tiny": {"architecture": "nemotron_h", "hybrid_pattern": "M*-", "num_hidden_layers": 3,
                             "head_dim": 64, "warmup_steps": 60, "mtp_steps": 5}})
    env = load_environment(cfg.envs[0].name, cfg.envs[0].args)
    path = resolve_model_path(cfg.model, [env], [1.0])
    policy, tokenizer = load_policy(path)
    prompts = [encode_prompt(tokenizer, t, cfg.rollout.chat_template_kwargs) for t in env.tasks("train")[:4]]
    init_ray(cfg)
    (actor,) = start_engines(str(path.resolve()), cfg.engine, cfg.seed)
    yield EnginePool([actor]), policy, tokenizer, [p + p[:8] for p in prompts]
    ray.kill(actor)


def trainer_logprobs(policy, tokenizer, seqs) -> list[torch.Tensor]:
    ids, attn, _ = pad_batch([s[:1] for s in seqs], [s[1:] for s in seqs], tokenizer.pad_token_id)
    with torch.no_grad():
        out = token_logprobs(policy, ids, attn)
    return [row[: len(s) - 1] for row, s in zip(out, seqs)]


def max_gap(engine_scores, trainer) -> float:
    return max((torch.tensor(e) - t).abs().max().item() for e, t in zip(engine_scores, trainer))


def test_engine_matches_the_trainer_and_takes_pushes(engine):
    pool, policy, tokenizer, seqs = engine
    before = pool.score(seqs)
    assert max_gap(before, trainer_logprobs(policy, tokenizer, seqs)) < TOL
    pool.push_weights(pack_policy(policy), 1)  # unchanged weights: nothing moves
    assert max_gap(pool.score(seqs), [torch.tensor(s) for s in before]) < 1e-5
    state = {k: v.clone() for k, v in policy.state_dict().items()}  # state_dict() aliases the parameters
    moved = {k: v * 0.5 if k.endswith(("dt_bias", "A_log", "embeddings.weight")) else v for k, v in state.items()}
    policy.load_state_dict(moved)
    try:
        pool.push_weights(pack_policy(policy), 2)
        after = pool.score(seqs)
        assert max_gap(after, [torch.tensor(s) for s in before]) > 20 * TOL  # the push moved the engine (0.15) ...
        assert max_gap(after, trainer_logprobs(policy, tokenizer, seqs)) < TOL  # ... onto the trainer's weights
    finally:
        policy.load_state_dict(state)
