"""Everything a run needs, started once: the environment, the policy, Ray and the engine pool.

``gymrl train``, ``gymrl bench`` and the test suite all start through :func:`start_session`, so the
expensive part (Ray plus one vLLM engine per actor) is built in one place and shared.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from gymrl.config import ModelConfig, RunConfig
from gymrl.envs.base import Environment
from gymrl.envs.registry import load_environment
from gymrl.models.checkpoint import load_policy
from gymrl.models.tiny import build_tiny_model
from gymrl.rollout.engine import EnginePool, start_engines
from gymrl.rollout.runner import RolloutRunner, check_prompts_fit


def resolve_model_path(cfg: ModelConfig, env: Environment) -> Path:
    """The policy checkpoint to use: the configured tiny model (built and cached) or ``cfg.path``."""
    if cfg.build_tiny is not None:
        return build_tiny_model(cfg.build_tiny, env, cfg.cache_dir)
    if not (cfg.path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: no HF checkpoint (config.json) at '{cfg.path}'")
    return cfg.path


def init_ray(cfg: RunConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(
        address=cfg.ray_address,
        num_cpus=cfg.ray_num_cpus if cfg.ray_address is None else None,
        include_dashboard=False,
        log_to_driver=bool(os.environ.get("GYMRL_VERBOSE")),
        logging_level=logging.WARNING,
    )


@dataclass
class Session:
    cfg: RunConfig
    env: Environment
    model_path: Path
    policy: object  # transformers PreTrainedModel, on the trainer side
    tokenizer: object
    pool: EnginePool
    runner: RolloutRunner


def start_session(cfg: RunConfig) -> Session:
    env = load_environment(cfg.env.name, cfg.env.args)
    model_path = resolve_model_path(cfg.model, env)
    policy, tokenizer = load_policy(model_path)
    tasks = env.tasks("train") + env.tasks("eval")
    check_prompts_fit(tokenizer, tasks, cfg.sampling.max_tokens, cfg.engine.max_model_len)
    init_ray(cfg)
    pool = EnginePool(start_engines(str(model_path.resolve()), cfg.engine, cfg.seed))
    runner = RolloutRunner(pool, env, tokenizer)
    return Session(cfg, env, model_path, policy, tokenizer, pool, runner)
