"""A vLLM engine hosted by a Ray actor (:mod:`gymrl.rollout.pool` starts the actors and spreads work over them).

The actor holds one ``AsyncLLM``, so requests run side by side with everything else the actor does:
it samples G completions per prompt with the logprob of each sampled token (the behaviour logprobs the
GRPO ratio needs), scores fixed sequences (prompt logprobs, used to check that a weight push landed),
and loads new weights while requests are running. A weight update pauses the scheduler with the
requests kept, loads the weights through ``collective_rpc`` into the workers' ``WeightSyncExtension``
(no pickled functions), labels the engine with the new policy version and resumes: no request is lost
or restarted, and vLLM records which version sampled each output token (``weight_versions``).

With ``engine.speculative_config`` set, each completion also reports how its drafts fared
(:class:`SpecStats`, from vLLM's per-request spec-decode metrics). A speculative config that this vLLM
build cannot run does not stop the run: the engine starts without it and says why in ``ready()``.
"""

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

from gymrl.config import EngineConfig, SamplingConfig
from gymrl.resources import ray_node

WORKER_EXTENSION = "gymrl.rollout.weight_sync.WeightSyncExtension"
Sampling = SamplingConfig | list[SamplingConfig]  # one for every prompt, or one per prompt
log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """A prompt that leaves no room for a completion inside the engine's context."""


@dataclass(frozen=True)
class SpecStats:
    """Speculative-decoding counts over one or more completions (summed over requests and engines)."""

    drafts: int = 0  # verify steps that checked a draft (a request's step with no draft is not counted)
    draft_tokens: int = 0  # tokens proposed
    accepted_tokens: int = 0  # proposed tokens the target model accepted

    def __add__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats(self.drafts + other.drafts, self.draft_tokens + other.draft_tokens,
                         self.accepted_tokens + other.accepted_tokens)

    @property
    def acceptance(self) -> float | None:
        """Accepted / proposed draft tokens; None when nothing was proposed."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens produced per verify step, the bonus token included: 1 + accepted / drafts, as vLLM
        defines its "mean acceptance length" (RequestSpecDecodeMetrics.to_dict in vllm/v1/metrics/stats.py).
        None when no draft was checked."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    @staticmethod
    def total(parts: "list[SpecStats | None]") -> "SpecStats | None":
        """The sum of the parts that are not None; None when all are (speculative decoding off)."""
        present = [p for p in parts if p is not None]
        return sum(present, SpecStats()) if present else None

    def __sub__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                         self.accepted_tokens - other.accepted_tokens)

    @staticmethod
    def of_counters() -> "SpecStats":
        """vLLM's process-wide spec-decode counters (Prometheus, summed over engines): the source on vLLM
        builds without per-request spec-decode metrics (0.22, the GPU machine's); diff two readings."""
        from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

        total: dict[str, float] = {}
        for m in get_metrics_snapshot():
            if isinstance(m, Counter):
                total[m.name] = total.get(m.name, 0) + m.value
        return SpecStats(*(int(total.get(f"vllm:spec_decode_num_{k}", 0))
                           for k in ("drafts", "draft_tokens", "accepted_tokens")))

    @staticmethod
    def of_request(metrics) -> "SpecStats | None":
        """From vLLM's ``RequestSpecDecodeMetrics`` of one completion (a histogram of accepted drafts)."""
        if metrics is None:
            return None
        return SpecStats(drafts=sum(metrics.histogram), draft_tokens=metrics.num_draft_tokens,
                         accepted_tokens=sum(j * count for j, count in enumerate(metrics.histogram)))


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    engine_id: int = 0
    versions: list[int] = field(default_factory=list)  # the policy version that sampled each token
    spec: SpecStats | None = None  # this completion's drafts (None: speculative decoding off)


@dataclass
class Generation:
    """What a generate call returns: the completions, one group per prompt, and how the drafts fared."""

    groups: list[list[Completion]]
    spec: SpecStats | None = None  # None: speculative decoding off on the engine(s)


@dataclass
class EngineStats:
    """An engine's counters since it started; the pool turns two readings into per-step rates."""

    engine_id: int
    in_flight: int  # sequences submitted and not finished now (the engine's queue depth)
    peak_in_flight: int  # the most in flight at once since the last reading that opened a new peak window
    sequences_done: int
    tokens: int  # completion tokens generated
    busy_seconds: float  # wall time with at least one sequence in flight
    policy_version: int


@dataclass
class WeightUpdate:
    """How one engine took a new policy version."""

    engine_id: int
    version: int
    pause_seconds: float  # the scheduler was paused this long: pause, load, relabel, resume
    load_seconds: float  # of which loading the tensors into the workers
    in_flight: int  # sequences that were running or waiting when the update landed
    recomputed_kv: bool


def _has_engine_arg(name: str) -> bool:
    """Whether this vLLM build takes engine argument ``name`` (0.22 on the GPU machine lacks some of 0.32's)."""
    import dataclasses

    from vllm import AsyncEngineArgs

    return name in {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def engine_kwargs(model_path: str, cfg: EngineConfig, seed: int, engine_id: int = 0) -> dict:
    """The engine arguments of one engine (``gymrl train --dry-run`` prints them)."""
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
        disable_log_stats=not cfg.log_stats,
        **cfg.extra_args,
    )
    if cfg.sleep_while_training:
        kwargs["enable_sleep_mode"] = True
    if cfg.speculative_config is not None:
        kwargs["speculative_config"] = cfg.speculative_config.model_dump()
        if _has_engine_arg("per_request_spec_decode_metrics"):
            kwargs["per_request_spec_decode_metrics"] = "summary"  # each completion says how its drafts fared
        else:  # older vLLM: the drafts are counted by its stat loggers (SpecStats.of_counters)
            kwargs["disable_log_stats"] = False
    return kwargs


def _build_engine(kwargs: dict):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


def sampling_params(prompts: list[list[int]], n: int, sampling: Sampling, max_model_len: int,
                    seeds: list[int | None] | None = None) -> list:
    """vLLM's SamplingParams of each prompt: ``n`` samples with the sampled token's logprob, the final
    output only. A later turn of an episode may have less room left than max_tokens: it gets what is left.
    ``seeds``: one per prompt (vLLM gives the i-th of its n samples seed + i), so a request samples the same
    tokens whatever else the engine is running; None draws from the engine's generator."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    per_prompt = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    return [
        SamplingParams(
            n=n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=min(s.max_tokens, max_model_len - len(p)),
            min_tokens=min(s.min_tokens, s.max_tokens, max_model_len - len(p)),
            logprobs=0,  # 0 = only the sampled token's logprob
            output_kind=RequestOutputKind.FINAL_ONLY,
            seed=seed,
        )
        for p, s, seed in zip(prompts, per_prompt, seeds or [None] * len(prompts))
    ]


def version_per_token(spans, n_tokens: int, default: int) -> list[int]:
    """vLLM's weight-version spans of one completion as one version per token (``default`` where
    vLLM gave no label)."""
    versions = [default] * n_tokens
    for span in spans or []:
        versions[span.start:span.end] = [int(span.version)] * (span.end - span.start)
    return versions


class RolloutEngine:
    """One vLLM engine. Run it as a Ray actor with :func:`gymrl.rollout.pool.start_engines` (an async actor: its
    requests and a weight update run concurrently on the actor's event loop)."""

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int, engine_id: int = 0):
        if cfg.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        self.engine_id = engine_id
        self.max_model_len = cfg.max_model_len
        self.policy_version = 0
        self._update: dict | None = None  # the weight update in progress (open_weight_update)
        self.spec_fallback: str | None = None  # why the configured speculative decoding is off, if it is
        self._ids = itertools.count()
        self._in_flight = self._peak = self._done = self._tokens = 0
        self._busy = 0.0
        self._busy_since: float | None = None
        started = time.perf_counter()
        kwargs = engine_kwargs(model_path, cfg, seed, engine_id)
        try:
            self.llm = _build_engine(kwargs)
            self.speculative = cfg.speculative_config is not None
        except Exception as err:  # noqa: BLE001 - any failure of the speculative build falls back
            if cfg.speculative_config is None:
                raise
            # Rollouts go on without drafts: the reason is logged here and returned by ready().
            self.spec_fallback = (f"engine.speculative_config {cfg.speculative_config.model_dump()} does not run "
                                  f"here ({type(err).__name__}: {err}); engine {engine_id} runs without it")
            log.warning(self.spec_fallback)
            kwargs.pop("speculative_config")
            kwargs.pop("per_request_spec_decode_metrics", None)
            self.llm = _build_engine(kwargs)
            self.speculative = False
        # vLLM without per-request spec-decode metrics (0.22): timed_generate counts the drafts process-wide.
        self._count_spec = self.speculative and "per_request_spec_decode_metrics" not in kwargs
        self.load_seconds = time.perf_counter() - started

    async def _label(self, version: int) -> None:
        """Label the tokens sampled from now on with ``version`` (vLLM builds without labels: 0.22)."""
        if hasattr(self.llm, "update_weight_version"):
            await self.llm.update_weight_version(str(version))

    async def ready(self) -> dict:
        await self.llm.collective_rpc("gymrl_fix_kernels")  # before any request: see vllm_fixes.py
        await self._label(self.policy_version)  # label the first tokens
        return {"engine_id": self.engine_id, "load_seconds": self.load_seconds, "pid": os.getpid(),
                "speculative": self.speculative, "spec_fallback": self.spec_fallback}

    def _check_lengths(self, prompts: list[list[int]], room: int) -> None:
        for i, prompt in enumerate(prompts):
            if len(prompt) + room > self.max_model_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(prompt)} tokens; with {room} more it exceeds "
                    f"engine.max_model_len={self.max_model_len}"
                )

    def _track(self, sequences: int) -> None:
        """Count sequences in (positive) or out (negative) of flight, and the busy time."""
        now = time.perf_counter()
        if self._in_flight == 0 and sequences > 0:
            self._busy_since = now
        self._in_flight += sequences
        self._peak = max(self._peak, self._in_flight)
        if self._in_flight == 0 and self._busy_since is not None:
            self._busy += now - self._busy_since
            self._busy_since = None

    async def _request(self, prompt: list[int], params):
        """One request to the engine; returns its final output."""
        from vllm import TokensPrompt

        final = None
        self._track(params.n)
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                               f"{self.engine_id}-{next(self._ids)}"):
                final = out
        finally:
            self._track(-params.n)
        self._done += params.n
        self._tokens += sum(len(c.token_ids) for c in final.outputs)
        return final

    async def _sample(self, prompts: list[list[int]], n: int, sampling: Sampling,
                      seeds: list[int | None] | None = None) -> list:
        self._check_lengths(prompts, 1)
        params = sampling_params(prompts, n, sampling, self.max_model_len, seeds)
        return await asyncio.gather(*(self._request(p, sp) for p, sp in zip(prompts, params)))

    async def generate(self, prompts: list[list[int]], n: int, sampling: Sampling,
                       seeds: list[int | None] | None = None) -> Generation:
        """``n`` completions for each tokenised prompt, with the sampled tokens' logprobs and versions."""
        groups = []
        for out in await self._sample(prompts, n, sampling, seeds):
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for tok, step in zip(ids, c.logprobs)]
                versions = version_per_token(getattr(c, "weight_versions", None), len(ids), self.policy_version)
                group.append(Completion(ids, lps, c.text, c.finish_reason or "length", self.engine_id, versions,
                                        SpecStats.of_request(getattr(c, "spec_decode_metrics", None))))
            groups.append(group)
        return Generation(groups, SpecStats.total([c.spec for g in groups for c in g]))

    async def timed_generate(self, prompts: list[list[int]], n: int, sampling: Sampling) -> tuple[int, float, SpecStats | None]:
        """(completion tokens, seconds, spec stats) of vLLM's own generate calls: the raw baseline for benchmarks."""
        counted = self._count_spec
        before = SpecStats.of_counters() if counted else None
        started = time.perf_counter()
        outputs = await self._sample(prompts, n, sampling)
        seconds = time.perf_counter() - started
        completions = [c for out in outputs for c in out.outputs]
        if counted:
            await asyncio.sleep(0.1)  # the last step's stats reach the loggers just after its outputs
            spec = SpecStats.of_counters() - before
        else:
            spec = SpecStats.total([SpecStats.of_request(getattr(c, "spec_decode_metrics", None)) for c in completions])
        return sum(len(c.token_ids) for c in completions), seconds, spec

    async def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first given its prefix (teacher forcing)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_lengths(sequences, 1)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, output_kind=RequestOutputKind.FINAL_ONLY)
        outputs = await asyncio.gather(*(self._request(s, params) for s in sequences))
        return [
            [step[tok].logprob for tok, step in zip(seq[1:], out.prompt_logprobs[1:])]
            for seq, out in zip(sequences, outputs)
        ]

    async def load_weights(self, blob: bytes, version: int, recompute_kv: bool = False,
                           method: str = "gymrl_load_weights") -> WeightUpdate:
        """Load a packed state dict into the live engine while its requests wait in place.

        The scheduler pauses with every request kept; the workers load the tensors; the engine's
        weight label becomes ``version``, so every token sampled from here on records it; then the
        requests go on. ``method``: the worker method that takes ``blob`` (``gymrl_load_weights_ipc`` for a CUDA
        IPC payload, :func:`gymrl.rollout.weight_sync.cuda_ipc_payload`). ``recompute_kv``: drop all cached KV, so running requests recompute their
        context with the new weights (otherwise they keep the KV computed before the update, and
        prefix-cache hits may too, until the cache turns over).
        """
        await self.open_weight_update(recompute_kv)
        await self.load_weight_part(method, blob)
        return await self.close_weight_update(version)

    # A weight update in parts (a bucketed push, :meth:`gymrl.rollout.pool.EnginePool.update_weights_in_parts`):
    # open (pause), any number of worker calls, close (relabel, resume). :meth:`load_weights` is the one-part case.

    async def open_weight_update(self, recompute_kv: bool = False) -> None:
        """Pause the scheduler with every request kept (``recompute_kv``: and drop all cached KV)."""
        if self._update is not None:
            raise RuntimeError(f"engine {self.engine_id}: a weight update is already open")
        self._update = {"started": time.perf_counter(), "in_flight": self._in_flight, "load_s": 0.0,
                        "recompute_kv": recompute_kv}
        try:
            await self.llm.pause_generation(mode="keep", clear_cache=recompute_kv)
        except BaseException:
            self._update = None
            raise

    async def load_weight_part(self, method: str, payload: bytes | None) -> bool:
        """Run worker method ``method`` (with ``payload``) inside the open update; False when none is open (an
        engine started during the update: it is loaded whole afterwards). A failure resumes the requests."""
        if self._update is None:
            return False
        loading = time.perf_counter()
        try:
            await self.llm.collective_rpc(method, args=() if payload is None else (payload,))
        except BaseException:
            self._update = None
            await self.llm.resume_generation()
            raise
        self._update["load_s"] += time.perf_counter() - loading
        return True

    async def close_weight_update(self, version: int) -> WeightUpdate | None:
        """Label the engine ``version`` and resume the requests; None when no update is open."""
        update, self._update = self._update, None
        if update is None:
            return None
        try:
            # Nothing in flight: the whole prefix cache can go (with requests running this is a no-op).
            await self.llm.reset_prefix_cache()
            await self._label(version)
            self.policy_version = version
        finally:
            await self.llm.resume_generation()
        return WeightUpdate(self.engine_id, version, time.perf_counter() - update["started"], update["load_s"],
                            update["in_flight"], update["recompute_kv"])

    async def sleep(self) -> float:
        """vLLM's level-1 sleep (engine.sleep_while_training): the KV cache freed, the weights in CPU memory; nothing
        may be in flight. Returns the seconds it took."""
        started = time.perf_counter()
        await self.llm.sleep(level=1)
        return time.perf_counter() - started

    async def wake_up(self) -> float:
        """Weights and KV cache back on the GPU; returns the seconds it took."""
        started = time.perf_counter()
        await self.llm.wake_up()
        return time.perf_counter() - started

    async def profile(self, start: bool) -> None:
        """Start or stop vLLM's profiler in the engine's workers, around the requests between the two calls (the
        engine must be built with one: ``engine.extra_args.profiler_config``; each stop writes a trace there)."""
        await (self.llm.start_profile() if start else self.llm.stop_profile())

    async def worker_call(self, method: str, payload: bytes | None = None) -> list:
        """Call a :class:`~gymrl.rollout.weight_sync.WeightSyncExtension` method in every worker of this engine
        (one result per tensor-parallel rank), without pausing its requests."""
        return await self.llm.collective_rpc(method, args=() if payload is None else (payload,))

    def node(self) -> dict[str, str]:
        """The Ray node this engine runs on (:func:`gymrl.resources.ray_node`)."""
        return ray_node()

    def stats(self, new_peak_window: bool = False) -> EngineStats:
        """The counters now. ``new_peak_window``: start measuring ``peak_in_flight`` afresh after this
        reading (the per-step metrics do; a plain look at the engine leaves it alone)."""
        busy = self._busy + (time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0)
        reading = EngineStats(self.engine_id, self._in_flight, self._peak, self._done, self._tokens, busy,
                              self.policy_version)
        if new_peak_window:
            self._peak = self._in_flight
        return reading
