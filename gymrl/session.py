"""Everything a run needs, started once: environments and their servers, the policy, Ray, the engines.

``gymrl train``, ``gymrl bench`` and the test suite all start through :func:`start_session`, so the
expensive part (Ray plus one vLLM engine per actor, one NeMo Gym server per environment) is built in
one place, shared, and stopped by :meth:`Session.close`.
"""

import functools
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import ray

from gymrl.config import ModelConfig, RunConfig
from gymrl.envs.base import Environment
from gymrl.envs.client import EnvClient
from gymrl.envs.launcher import ServerSupervisor
from gymrl.envs.sources import check_tool_routes, gym_python_of, open_environments, server_process
from gymrl.models.checkpoint import load_policy
from gymrl.models.checkpoint_files import inspect_checkpoint
from gymrl.models.tiny import build_tiny_model
from gymrl.resources import check_resources, ray_gpus
from gymrl.rollout.pool import EnginePool, start_engine, start_engines
from gymrl.rollout.runner import RolloutRunner, check_prompts_fit
from gymrl.rollout.tool_calls import parser_class
from gymrl.rollout.vllm_checks import (
    check_cpu_mamba_spec,
    check_cpu_mla,
    check_engine_args,
    check_mtp,
    check_speculative,
    reasoning_parser_class,
    reasoning_plugin_path,
)


class WarmupMix:
    """The warm-up text of several environments, mixed by their weights (for one tiny model)."""

    def __init__(self, envs: list[Environment], weights: list[float]):
        self.name = "+".join(e.name for e in envs)
        self.config = {e.name: {"weight": w, **e.config} for e, w in zip(envs, weights)}
        self._envs, self._weights = envs, weights

    def warmup_examples(self, n: int, seed: int) -> list:
        total = sum(self._weights)
        examples = []
        for i, (env, w) in enumerate(zip(self._envs, self._weights)):
            examples += env.warmup_examples(round(n * w / total), seed + i)
        random.Random(seed).shuffle(examples)
        return examples


def resolve_model_path(cfg: ModelConfig, envs: list[Environment], weights: list[float]) -> Path:
    """The policy checkpoint to use: the configured tiny model (built and cached) or ``cfg.path``."""
    if cfg.build_tiny is not None:
        source = envs[0] if len(envs) == 1 else WarmupMix(envs, weights)
        return build_tiny_model(cfg.build_tiny, source, cfg.cache_dir)
    if not (cfg.path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: no HF checkpoint (config.json) at '{cfg.path}'")
    return cfg.path


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster at ``ray_address``, or, without one, start a local Ray of the run's own: ``address="local"``
    never attaches to a cluster that ``ray start`` left running here, nor to one that RAY_ADDRESS names (Ray
    would, and then refuse the local cluster's num_cpus and num_gpus)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    local = cfg.ray_address is None
    if local:
        env = os.environ.get("RAY_ADDRESS")
        logging.getLogger(__name__).log(
            logging.WARNING if env else logging.INFO,
            "no ray_address: starting a local Ray cluster of its own; set ray_address to join a running one%s",
            f" (RAY_ADDRESS={env} is not used)" if env else "")
    ray.init(
        address="local" if local else cfg.ray_address,
        num_cpus=cfg.ray_num_cpus if local else None,
        num_gpus=ray_gpus(cfg) if local else None,  # the trainer's own GPU is not Ray's to give to an engine
        include_dashboard=False,
        log_to_driver=bool(os.environ.get("GYMRL_VERBOSE")),
        logging_level=logging.WARNING,
    )


def start_env_servers(cfg: RunConfig, envs: dict[str, Environment], log_dir: Path) -> list[ServerSupervisor]:
    """Start a supervised server for each environment without a ``url``; attach a client to every environment
    (a server given by ``url`` is someone else's to keep alive: its client only retries)."""
    servers: list[ServerSupervisor] = []
    sc = cfg.env_servers
    gym_python = gym_python_of(cfg)
    try:
        for env_cfg in cfg.envs:
            url, supervisor = env_cfg.url, None
            if url is None:
                server = server_process(envs[env_cfg.name], gym_python, log_dir)
                supervisor = ServerSupervisor(server, sc.start_timeout_s, sc.max_restarts, sc.health_interval_s)
                servers.append(supervisor)
                url = server.start(sc.start_timeout_s).url
                supervisor.start()
            envs[env_cfg.name].attach(EnvClient(env_cfg.name, url, sc.request_timeout_s, sc.retries,
                                                 supervisor=supervisor))
            if envs[env_cfg.name].nemo_gym:
                check_tool_routes(envs[env_cfg.name])
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@dataclass
class Session:
    cfg: RunConfig
    envs: dict[str, Environment]
    model_path: Path
    policy: object  # transformers PreTrainedModel, on the trainer side
    tokenizer: object
    pool: EnginePool
    runner: RolloutRunner
    servers: list[ServerSupervisor] = field(default_factory=list)

    def close(self) -> None:
        """Stop the environment servers and the engine actors (Ray itself stays up for others)."""
        self.pool.stop()
        for server in self.servers:
            server.stop()
        for env in self.envs.values():
            env.close()


def start_session(cfg: RunConfig) -> Session:
    check_resources(cfg)  # CPUs, GPUs, KV-cache memory this machine cannot give: fail before anything starts
    envs = open_environments(cfg)
    tasks = [t for env in envs.values() for split in ("train", "eval") for t in env.tasks(split)]
    if any(t.tools for t in tasks):
        parser_class(cfg.rollout.tool_call_parser)  # a bad parser name fails now, not after the model build
    spec = cfg.engine.speculative_config
    if spec is not None:
        check_speculative(spec)
    if cfg.engine.extra_args:
        check_engine_args(cfg.engine.extra_args)
    model_path = resolve_model_path(cfg.model, list(envs.values()), [e.weight for e in cfg.envs])
    if cfg.rollout.reasoning_parser is not None:
        reasoning_parser_class(cfg.rollout.reasoning_parser, reasoning_plugin_path(cfg, model_path))
    info = inspect_checkpoint(model_path)
    if spec is not None:
        check_mtp(spec, info, cfg.engine.dtype)
    check_cpu_mla(cfg.engine, info.mla)
    check_cpu_mamba_spec(cfg.engine, info.mamba)
    if cfg.train.mtp_loss_weight > 0:
        from gymrl.models.mtp import check_mtp_training

        check_mtp_training(info.model_type, info.mtp_layers, model_path)
    policy, tokenizer = load_policy(model_path, cfg.train.dtype)
    if cfg.train.lora is not None:  # a bad target_modules fails now, not after the engines start
        from gymrl.models.lora import check_targets

        check_targets(policy, cfg.train.lora)
    check_prompts_fit(tokenizer, tasks, cfg.sampling.max_tokens, cfg.engine.max_model_len,
                      cfg.rollout.chat_template_kwargs)
    servers = start_env_servers(cfg, envs, Path(cfg.run_dir) / "env_logs")
    try:
        init_ray(cfg)
        path = str(model_path.resolve())
        pool = EnginePool(start_engines(path, cfg.engine, cfg.seed),
                          restart=functools.partial(start_engine, path, cfg.engine, cfg.seed),
                          max_restarts=cfg.engine.max_restarts, timeout_s=cfg.rollout.timeout_s)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    runner = RolloutRunner(pool, envs, tokenizer, cfg.rollout, cfg.engine.max_model_len)
    return Session(cfg, envs, model_path, policy, tokenizer, pool, runner, servers)
