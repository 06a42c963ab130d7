"""A vLLM engine hosted by a Ray actor, and a pool of them.

The actor holds one ``vllm.LLM``. It samples G completions per prompt with the logprob of each
sampled token (the behaviour logprobs the GRPO ratio needs), scores fixed sequences (prompt
logprobs, used to check that a weight push landed), and loads new weights in place through
``collective_rpc`` into the workers' ``WeightSyncExtension``.
"""

import os
import time
from dataclasses import dataclass

import ray

from gymrl.config import EngineConfig, SamplingConfig

WORKER_EXTENSION = "gymrl.rollout.weight_sync.WeightSyncExtension"
Sampling = SamplingConfig | list[SamplingConfig]  # one for every prompt, or one per prompt


class PromptTooLongError(ValueError):
    """A prompt that leaves no room for a completion inside the engine's context."""


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    engine_id: int = 0


def engine_kwargs(model_path: str, cfg: EngineConfig, seed: int, engine_id: int = 0) -> dict:
    """The arguments of ``vllm.LLM`` for one engine (``gymrl train --dry-run`` prints them)."""
    kwargs = dict(
        model=model_path,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        tensor_parallel_size=cfg.tensor_parallel_size,
        seed=seed + engine_id,
        worker_extension_cls=WORKER_EXTENSION,
        # Behaviour logprobs after temperature, to match the trainer's log_softmax(logits / T).
        logprobs_mode="processed_logprobs",
        **cfg.extra_args,
    )
    if cfg.speculative_config is not None:
        kwargs["speculative_config"] = cfg.speculative_config.model_dump()
    return kwargs


def actor_resources(cfg: EngineConfig) -> dict[str, float]:
    """Ray resources of one engine actor: its CPUs, and on cuda one GPU per tensor-parallel rank."""
    return {"num_cpus": cfg.cpus_per_engine, "num_gpus": cfg.tensor_parallel_size if cfg.device == "cuda" else 0}


class RolloutEngine:
    """One vLLM engine. Run it as a Ray actor with :func:`start_engines`."""

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int, engine_id: int = 0):
        if cfg.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM

        self.engine_id = engine_id
        self.max_model_len = cfg.max_model_len
        self.policy_version = 0
        started = time.perf_counter()
        self.llm = LLM(**engine_kwargs(model_path, cfg, seed, engine_id))
        self.load_seconds = time.perf_counter() - started

    def ready(self) -> dict:
        return {"engine_id": self.engine_id, "load_seconds": self.load_seconds, "pid": os.getpid()}

    def _check_lengths(self, prompts: list[list[int]], room: int) -> None:
        for i, prompt in enumerate(prompts):
            if len(prompt) + room > self.max_model_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(prompt)} tokens; with {room} more it exceeds "
                    f"engine.max_model_len={self.max_model_len}"
                )

    def _sample(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list:
        from vllm import SamplingParams, TokensPrompt

        self._check_lengths(prompts, 1)
        per_prompt = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        # A later turn of an episode may have less room left than max_tokens: it gets what is left.
        params = [
            SamplingParams(
                n=n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=min(s.max_tokens, self.max_model_len - len(p)),
                logprobs=0,  # 0 = only the sampled token's logprob
            )
            for p, s in zip(prompts, per_prompt)
        ]
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[list[Completion]]:
        """``n`` completions for each tokenised prompt, with the sampled tokens' logprobs."""
        groups = []
        for out in self._sample(prompts, n, sampling):
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs)]
                group.append(Completion(ids, lps, c.text, c.finish_reason or "length", self.engine_id))
            groups.append(group)
        return groups

    def timed_generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> tuple[int, float]:
        """(completion tokens, seconds) of vLLM's own generate call: the raw baseline for benchmarks."""
        started = time.perf_counter()
        outputs = self._sample(prompts, n, sampling)
        seconds = time.perf_counter() - started
        return sum(len(c.token_ids) for out in outputs for c in out.outputs), seconds

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first given its prefix (teacher forcing)."""
        from vllm import SamplingParams, TokensPrompt

        self._check_lengths(sequences, 1)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        return [
            [step[tok].logprob for tok, step in zip(seq[1:], out.prompt_logprobs[1:])]
            for seq, out in zip(sequences, outputs)
        ]

    def load_weights(self, blob: bytes, version: int) -> float:
        """Load a packed state dict into the live engine; returns the seconds it took."""
        started = time.perf_counter()
        self.llm.collective_rpc("gymrl_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.policy_version = version
        return time.perf_counter() - started

    def version(self) -> int:
        return self.policy_version


def start_engines(model_path: str, cfg: EngineConfig, seed: int) -> list:
    """Start ``cfg.num_engines`` engine actors and wait until each has loaded its model."""
    actor_cls = ray.remote(**actor_resources(cfg))(RolloutEngine)
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    actors = [
        actor_cls.options(runtime_env={"env_vars": env}).remote(model_path, cfg, seed, i)
        for i in range(cfg.num_engines)
    ]
    ray.get([a.ready.remote() for a in actors])
    return actors


class EnginePool:
    """Spreads prompt groups over engine actors (a group stays on one engine, for its prefix cache)."""

    def __init__(self, actors: list):
        self.actors = actors

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> list[list[Completion]]:
        """``sampling``: one for all prompts, or a list with one per prompt."""
        shards = [(a, list(range(i, len(prompts), len(self.actors)))) for i, a in enumerate(self.actors)]
        shards = [(actor, shard) for actor, shard in shards if shard]
        pick = (lambda shard: [sampling[j] for j in shard]) if isinstance(sampling, list) else (lambda shard: sampling)
        futures = [actor.generate.remote([prompts[j] for j in shard], n, pick(shard)) for actor, shard in shards]
        results: list[list[Completion]] = [[] for _ in prompts]
        for (_, shard), groups in zip(shards, ray.get(futures)):
            for j, group in zip(shard, groups):
                results[j] = group
        return results

    def push_weights(self, blob: bytes, version: int) -> float:
        """Load new weights into every engine; returns the wall time of the push."""
        started = time.perf_counter()
        ref = ray.put(blob)
        ray.get([a.load_weights.remote(ref, version) for a in self.actors])
        return time.perf_counter() - started

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        return ray.get(self.actors[0].score.remote(sequences))
