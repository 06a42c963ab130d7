"""``gymrl eval``: a model measured on environments' held-out tasks, as a run directory of its own.

The model is an OpenAI-compatible endpoint the user runs (``vllm serve``, llama.cpp's server) or a
checkpoint that gymrl serves itself on its vLLM engine pool. Either way the environments' servers are
started as for training, their /verify scores every episode, the rollouts go to the run's ``traces.db``
(split ``eval``, step 0; ``gymrl traces`` and the viewer read it) and ``report.json``/``report.md`` hold
mean reward, pass@1 and pass@k per environment with 95% intervals.
"""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gymrl.config import RunConfig, SamplingConfig
from gymrl.envs.base import Environment, Task
from gymrl.eval.report import EnvReport, summarize, write_report
from gymrl.rollout.runner import Rollout, RolloutBatch, RolloutRunner
from gymrl.traces.store import TRACE_FILE, TraceWriter, run_metadata


class Backend(Protocol):
    def run(self, tasks: list[Task], samples: int, sampling: SamplingConfig,
            on_done: Callable[[], None]) -> list[Rollout]: ...


class EngineBackend:
    """gymrl's own engine pool through the training rollout runner, in batches of about ``concurrency``
    episodes (so the progress bar moves and the engine's queue stays bounded)."""

    def __init__(self, runner: RolloutRunner, concurrency: int):
        self.runner, self.concurrency = runner, concurrency

    def run(self, tasks: list[Task], samples: int, sampling: SamplingConfig,
            on_done: Callable[[], None]) -> list[Rollout]:
        rollouts = []
        chunk = max(1, self.concurrency // samples)
        for start in range(0, len(tasks), chunk):
            batch = self.runner.run(tasks[start:start + chunk], samples, sampling, 0)
            rollouts += batch.rollouts
            for _ in batch.rollouts:
                on_done()
        return rollouts


@dataclass
class EvalResult:
    run_dir: Path
    reports: list[EnvReport]
    seconds: float


def eval_tasks(cfg: RunConfig, envs: dict[str, Environment], n: int | None) -> list[Task]:
    """The first ``n`` held-out tasks of each environment (all when None), in config order."""
    return [t for e in cfg.envs for t in envs[e.name].tasks("eval")[:n]]


def check_sampling(sampling: SamplingConfig, samples: int) -> None:
    if samples > 1 and sampling.temperature == 0:
        raise ValueError(f"--samples {samples} with temperature 0 would repeat one greedy answer; "
                         "give --temperature above 0 (or --samples 1)")


def evaluate(cfg: RunConfig, tasks: list[Task], backend: Backend, samples: int, sampling: SamplingConfig,
             source: str, on_done: Callable[[], None] = lambda: None) -> EvalResult:
    """Run ``samples`` episodes of every task on ``backend`` (the tasks' environments have servers attached),
    then write the traces and the report into ``cfg.run_dir``."""
    check_sampling(sampling, samples)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    started = time.perf_counter()
    rollouts = backend.run(tasks, samples, sampling, on_done)
    seconds = time.perf_counter() - started
    settings = {"samples": samples, "sampling": sampling.model_dump(), "tasks": len(tasks)}
    traces = TraceWriter(run_dir / TRACE_FILE, run_metadata(json.loads(cfg.model_dump_json()))
                         | {"eval": {"source": source, **settings}})
    try:
        traces.write_batch(RolloutBatch(rollouts, samples, seconds, 0.0), tasks, 0, "eval")
    finally:
        traces.close()
    reports = summarize(rollouts, samples)
    write_report(run_dir, reports, source, settings | {"seconds": seconds})
    return EvalResult(run_dir, reports, seconds)


def run_eval(cfg: RunConfig, endpoint: str | None, checkpoint: Path | None, n: int | None, samples: int,
             sampling: SamplingConfig, on_start: Callable[[int], Callable[[], None]] = lambda total: lambda: None
             ) -> EvalResult:
    """Everything ``gymrl eval`` starts, stopped again at the end: the environments' servers, and the
    endpoint's client or (``checkpoint``) Ray and an engine pool serving the checkpoint's policy.
    ``on_start(episodes)`` returns the callback each finished episode calls (a progress bar)."""
    import ray
    from transformers import AutoTokenizer

    from gymrl.envs.sources import open_environments
    from gymrl.eval.endpoint import ChatEndpoint
    from gymrl.eval.episodes import EndpointRunner
    from gymrl.rollout.pool import EnginePool, start_engines
    from gymrl.rollout.runner import check_prompts_fit
    from gymrl.session import init_ray, start_env_servers
    from gymrl.train.checkpoint import find_checkpoint, policy_folder

    if (endpoint is None) == (checkpoint is None):
        raise ValueError("give --endpoint URL or --checkpoint RUN_DIR/STEP (one of them)")
    check_sampling(sampling, samples)
    envs = open_environments(cfg)
    tasks = eval_tasks(cfg, envs, n)
    model_path = policy_folder(find_checkpoint(checkpoint)) if checkpoint is not None else cfg.endpoint.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True) if model_path is not None else None
    if model_path is not None:  # the run's config names it: the trace viewer decodes tokens with it
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": Path(model_path).resolve()})})
    client = ChatEndpoint(endpoint, cfg.endpoint) if endpoint is not None else None  # an unreachable one fails here
    if checkpoint is not None:
        check_prompts_fit(tokenizer, tasks, sampling.max_tokens, cfg.engine.max_model_len, cfg.rollout.chat_template_kwargs)
    actors: list = []
    servers = start_env_servers(cfg, envs, Path(cfg.run_dir) / "env_logs")
    try:
        if client is not None:
            backend: Backend = EndpointRunner(client, envs, cfg.rollout, tokenizer)
            source = f"{client.base} (model {client.model})"
        else:
            init_ray(cfg)
            actors = start_engines(str(model_path.resolve()), cfg.engine, cfg.seed)
            backend = EngineBackend(RolloutRunner(EnginePool(actors), envs, tokenizer, cfg.rollout,
                                                  cfg.engine.max_model_len), cfg.endpoint.concurrency)
            source = f"checkpoint {checkpoint} on gymrl's vLLM engine"
        return evaluate(cfg, tasks, backend, samples, sampling, source, on_start(len(tasks) * samples))
    finally:
        for actor in actors:
            ray.kill(actor)
        for server in servers:
            server.stop()
        for env in envs.values():
            env.close()
        if client is not None:
            client.close()
