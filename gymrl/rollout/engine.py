"""A vLLM engine hosted by a Ray actor, and a pool of them.

The actor holds one ``vllm.LLM``. It samples G completions per prompt with the logprob of each
sampled token (the behaviour logprobs the GRPO ratio needs), scores fixed sequences (prompt
logprobs, used to check that a weight push landed), and loads new weights in place through
``collective_rpc`` into the workers' ``WeightSyncExtension``.

With ``engine.speculative_config`` set, every generate call also reports how the drafts fared
(:class:`SpecStats`, from vLLM's ``vllm:spec_decode_*`` counters). A speculative config that this vLLM
build cannot run does not stop the run: the engine starts without it and says why in ``ready()``.
"""

import logging
import os
import time
from dataclasses import dataclass

import ray

from gymrl.config import EngineConfig, SamplingConfig

WORKER_EXTENSION = "gymrl.rollout.weight_sync.WeightSyncExtension"
Sampling = SamplingConfig | list[SamplingConfig]  # one for every prompt, or one per prompt
log = logging.getLogger(__name__)

# vLLM's speculative-decoding counters (vllm/v1/spec_decode/metrics.py, SpecDecodingProm), read with
# LLM.get_metrics(); cumulative over the engine's life, so a call's figures are the counters' deltas.
SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


class PromptTooLongError(ValueError):
    """A prompt that leaves no room for a completion inside the engine's context."""


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    engine_id: int = 0


@dataclass(frozen=True)
class SpecStats:
    """Speculative-decoding counts over one or more generate calls (summed over requests and engines)."""

    drafts: int = 0  # verify steps that checked a draft (a request's step with no draft is not counted)
    draft_tokens: int = 0  # tokens proposed
    accepted_tokens: int = 0  # proposed tokens the target model accepted

    def __add__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats(self.drafts + other.drafts, self.draft_tokens + other.draft_tokens,
                         self.accepted_tokens + other.accepted_tokens)

    def __sub__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                         self.accepted_tokens - other.accepted_tokens)

    @property
    def acceptance(self) -> float | None:
        """Accepted / proposed draft tokens; None when nothing was proposed."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens produced per verify step, the bonus token included: 1 + accepted / drafts, as vLLM
        defines its "mean acceptance length" (SpecDecodingLogging.log in vllm/v1/spec_decode/metrics.py).
        None when no draft was checked."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    @staticmethod
    def total(parts: "list[SpecStats | None]") -> "SpecStats | None":
        """The sum of the parts that are not None; None when all are (speculative decoding off)."""
        present = [p for p in parts if p is not None]
        return sum(present, SpecStats()) if present else None


@dataclass
class Generation:
    """What a generate call returns: the completions, one group per prompt, and how the drafts fared."""

    groups: list[list[Completion]]
    spec: SpecStats | None = None  # None: speculative decoding off on the engine(s)


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
        kwargs["disable_log_stats"] = False  # the spec-decode counters live in vLLM's stat loggers
    return kwargs


def actor_resources(cfg: EngineConfig) -> dict[str, float]:
    """Ray resources of one engine actor: its CPUs, and on cuda one GPU per tensor-parallel rank."""
    return {"num_cpus": cfg.cpus_per_engine, "num_gpus": cfg.tensor_parallel_size if cfg.device == "cuda" else 0}


class RolloutEngine:
    """One vLLM engine. Run it as a Ray actor with :func:`start_engines`."""

    speculative = False  # drafts are on (a class default, for engines built without __init__ in tests)
    spec_fallback: str | None = None  # why the configured speculative decoding is off, if it is

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int, engine_id: int = 0):
        if cfg.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM

        self.engine_id = engine_id
        self.max_model_len = cfg.max_model_len
        self.policy_version = 0
        started = time.perf_counter()
        kwargs = engine_kwargs(model_path, cfg, seed, engine_id)
        try:
            self.llm = LLM(**kwargs)
            self.speculative = cfg.speculative_config is not None
        except Exception as err:  # noqa: BLE001 - any failure of the speculative build falls back
            if cfg.speculative_config is None:
                raise
            # Rollouts go on without drafts: the reason is logged here and returned by ready().
            self.spec_fallback = (f"engine.speculative_config {cfg.speculative_config.model_dump()} does not run "
                                  f"here ({type(err).__name__}: {err}); engine {engine_id} runs without it")
            log.warning(self.spec_fallback)
            kwargs.pop("speculative_config")
            kwargs.pop("disable_log_stats")
            self.llm = LLM(**kwargs)
        self.load_seconds = time.perf_counter() - started
        self._spec_seen = self._spec_counters()

    def ready(self) -> dict:
        return {"engine_id": self.engine_id, "load_seconds": self.load_seconds, "pid": os.getpid(),
                "speculative": self.speculative, "spec_fallback": self.spec_fallback}

    def _spec_counters(self) -> SpecStats | None:
        """vLLM's cumulative spec-decode counters (summed over their labels); None when drafts are off."""
        if not self.speculative:
            return None
        counts = dict.fromkeys(SPEC_COUNTERS.values(), 0)
        for metric in self.llm.get_metrics():
            if metric.name in SPEC_COUNTERS:
                counts[SPEC_COUNTERS[metric.name]] += metric.value
        return SpecStats(**counts)

    def _spec_delta(self) -> SpecStats | None:
        """The spec-decode counts since the previous call (one generate call's worth)."""
        now = self._spec_counters()
        if now is None:
            return None
        delta, self._spec_seen = now - self._spec_seen, now
        return delta

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

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> Generation:
        """``n`` completions for each tokenised prompt, with the sampled tokens' logprobs."""
        groups = []
        for out in self._sample(prompts, n, sampling):
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs)]
                group.append(Completion(ids, lps, c.text, c.finish_reason or "length", self.engine_id))
            groups.append(group)
        return Generation(groups, self._spec_delta())

    def timed_generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> tuple[int, float, SpecStats | None]:
        """(completion tokens, seconds, spec stats) of vLLM's own generate call: the raw baseline for benchmarks."""
        started = time.perf_counter()
        outputs = self._sample(prompts, n, sampling)
        seconds = time.perf_counter() - started
        return sum(len(c.token_ids) for out in outputs for c in out.outputs), seconds, self._spec_delta()

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first given its prefix (teacher forcing)."""
        from vllm import SamplingParams, TokensPrompt

        self._check_lengths(sequences, 1)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        self._spec_delta()  # a scoring call's drafts (if any) belong to no rollout
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
    """Start ``cfg.num_engines`` engine actors and wait until each has loaded its model; an engine that
    had to drop the speculative config says why, printed once for the pool."""
    actor_cls = ray.remote(**actor_resources(cfg))(RolloutEngine)
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    actors = [
        actor_cls.options(runtime_env={"env_vars": env}).remote(model_path, cfg, seed, i)
        for i in range(cfg.num_engines)
    ]
    fallbacks = [info["spec_fallback"] for info in ray.get([a.ready.remote() for a in actors]) if info["spec_fallback"]]
    if fallbacks:
        extra = f" (and {len(fallbacks) - 1} more engine(s) the same way)" if len(fallbacks) > 1 else ""
        log.warning("speculative decoding off: %s%s", fallbacks[0], extra)
    return actors


class EnginePool:
    """Spreads prompt groups over engine actors (a group stays on one engine, for its prefix cache)."""

    def __init__(self, actors: list):
        self.actors = actors

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> Generation:
        """``sampling``: one for all prompts, or a list with one per prompt. The spec stats are the sum
        over the engines that took part (None when speculative decoding is off)."""
        shards = [(a, list(range(i, len(prompts), len(self.actors)))) for i, a in enumerate(self.actors)]
        shards = [(actor, shard) for actor, shard in shards if shard]
        pick = (lambda shard: [sampling[j] for j in shard]) if isinstance(sampling, list) else (lambda shard: sampling)
        futures = [actor.generate.remote([prompts[j] for j in shard], n, pick(shard)) for actor, shard in shards]
        results: list[list[Completion]] = [[] for _ in prompts]
        replies: list[Generation] = ray.get(futures)
        for (_, shard), reply in zip(shards, replies):
            for j, group in zip(shard, reply.groups):
                results[j] = group
        return Generation(results, SpecStats.total([r.spec for r in replies]))

    def push_weights(self, blob: bytes, version: int) -> float:
        """Load new weights into every engine; returns the wall time of the push."""
        started = time.perf_counter()
        ref = ray.put(blob)
        ray.get([a.load_weights.remote(ref, version) for a in self.actors])
        return time.perf_counter() - started

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        return ray.get(self.actors[0].score.remote(sequences))
