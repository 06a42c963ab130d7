"""A vLLM engine hosted by a Ray actor, and a pool of them.

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
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from gymrl.config import EngineConfig, SamplingConfig

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
        disable_log_stats=True,
        **cfg.extra_args,
    )
    if cfg.speculative_config is not None:
        kwargs["speculative_config"] = cfg.speculative_config.model_dump()
        if _has_engine_arg("per_request_spec_decode_metrics"):
            kwargs["per_request_spec_decode_metrics"] = "summary"  # each completion says how its drafts fared
        else:  # older vLLM: the drafts are counted by its stat loggers (SpecStats.of_counters)
            kwargs["disable_log_stats"] = False
    return kwargs


def actor_resources(cfg: EngineConfig) -> dict[str, float]:
    """Ray resources of one engine actor: its CPUs, and on cuda one GPU per tensor-parallel rank."""
    return {"num_cpus": cfg.cpus_per_engine, "num_gpus": cfg.tensor_parallel_size if cfg.device == "cuda" else 0}


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
    """One vLLM engine. Run it as a Ray actor with :func:`start_engines` (an async actor: its requests
    and a weight update run concurrently on the actor's event loop)."""

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int, engine_id: int = 0):
        if cfg.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        self.engine_id = engine_id
        self.max_model_len = cfg.max_model_len
        self.policy_version = 0
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
        started = time.perf_counter()
        in_flight = self._in_flight
        await self.llm.pause_generation(mode="keep", clear_cache=recompute_kv)
        try:
            loading = time.perf_counter()
            await self.llm.collective_rpc(method, args=(blob,))
            load_seconds = time.perf_counter() - loading
            # Nothing in flight: the whole prefix cache can go (with requests running this is a no-op).
            await self.llm.reset_prefix_cache()
            await self._label(version)
            self.policy_version = version
        finally:
            await self.llm.resume_generation()
        return WeightUpdate(self.engine_id, version, time.perf_counter() - started, load_seconds, in_flight, recompute_kv)

    async def worker_call(self, method: str, payload: bytes | None = None) -> list:
        """Call a :class:`~gymrl.rollout.weight_sync.WeightSyncExtension` method in every worker of this engine
        (one result per tensor-parallel rank), without pausing its requests."""
        return await self.llm.collective_rpc(method, args=() if payload is None else (payload,))

    def stats(self, new_peak_window: bool = False) -> EngineStats:
        """The counters now. ``new_peak_window``: start measuring ``peak_in_flight`` afresh after this
        reading (the per-step metrics do; a plain look at the engine leaves it alone)."""
        busy = self._busy + (time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0)
        reading = EngineStats(self.engine_id, self._in_flight, self._peak, self._done, self._tokens, busy,
                              self.policy_version)
        if new_peak_window:
            self._peak = self._in_flight
        return reading


def _launch_engine(model_path: str, cfg: EngineConfig, seed: int, engine_id: int):
    """An engine actor, created (Ray places it and loads the model in the background)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cfg.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    return ray.remote(**actor_resources(cfg))(RolloutEngine).options(runtime_env={"env_vars": env}).remote(
        model_path, cfg, seed, engine_id)


def start_engines(model_path: str, cfg: EngineConfig, seed: int) -> list:
    """Start ``cfg.num_engines`` engine actors and wait until each has loaded its model; an engine that
    had to drop the speculative config says why, printed once for the pool."""
    actors = [_launch_engine(model_path, cfg, seed, i) for i in range(cfg.num_engines)]
    fallbacks = [info["spec_fallback"] for info in wait_ready(actors, cfg) if info["spec_fallback"]]
    if fallbacks:
        extra = f" (and {len(fallbacks) - 1} more engine(s) the same way)" if len(fallbacks) > 1 else ""
        log.warning("speculative decoding off: %s%s", fallbacks[0], extra)
    return actors


def start_engine(model_path: str, cfg: EngineConfig, seed: int, engine_id: int):
    """One engine actor, started and loaded: how the pool replaces an engine that died."""
    actor = _launch_engine(model_path, cfg, seed, engine_id)
    wait_ready([actor], cfg)
    return actor


def _resource_text(counts: dict) -> str:
    return ", ".join(f"{key} {counts.get(key, 0):g}" for key in ("CPU", "GPU"))


PLACEMENT_WARNING_S = 120.0  # an engine load takes 20-160 s on the lent machines


def wait_ready(actors: list, cfg: EngineConfig, warn_after_s: float = PLACEMENT_WARNING_S) -> list[dict]:
    """The actors' ``ready()`` answers. Ray keeps an actor it has no room for waiting without an error, so an
    engine still not ready after ``warn_after_s`` gets one warning with what it needs and what Ray has free."""
    refs = [actor.ready.remote() for actor in actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=warn_after_s)
    if pending:
        resources = actor_resources(cfg)
        need = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]}
        free, total = ray.available_resources(), ray.cluster_resources()
        never = any(need[key] > total.get(key, 0) for key in need)
        log.warning("%d of %d engine(s) not ready after %.0f s: still loading, or waiting for Ray to place them. "
                    "Each engine needs %s (engine.cpus_per_engine, engine.tensor_parallel_size); Ray has %s free "
                    "of %s%s. Fewer engines, a smaller engine.cpus_per_engine or a larger ray_num_cpus make room.",
                    len(pending), len(refs), warn_after_s, _resource_text(need), _resource_text(free),
                    _resource_text(total),
                    " (less than one engine needs: it can never be placed)" if never else "")
    return ray.get(refs)


class EngineError(RuntimeError):
    """A generation that failed for the engine's sake: it timed out, or its engine died past its restarts."""


def _engine_died(err: Exception) -> bool:
    """Whether ``err`` from an actor call means the engine is gone: the actor died, or vLLM's engine core in it."""
    if isinstance(err, ray.exceptions.RayActorError):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(err, ray.exceptions.RayTaskError) and type(cause).__name__ == "EngineDeadError"


class EnginePool:
    """Spreads prompt groups over engine actors and pushes weights into all of them.

    A group (the G samples of one prompt) stays on one engine, for its prefix cache; a new group goes
    to the engine with the fewest sequences this pool has in flight there, and a later turn of an
    episode goes back to the engine that sampled its first turn (``engine_ids``). Safe to call from
    several threads at once (a weight push while rollouts are running, say).

    Supervision: a call that finds its engine dead (the actor, or vLLM's engine core in it) replaces the
    engine with a new actor (``restart``, at most ``max_restarts`` times over the pool), loads the newest
    pushed weights into it and sends the call again; every step's :meth:`stats` doubles as a health check
    that also replaces an engine that does not answer within ``health_timeout_s``. A generation that takes
    longer than ``timeout_s`` is aborted and raised as :class:`EngineError`.
    """

    def __init__(self, actors: list, restart: Callable[[int], Any] | None = None, max_restarts: int = 0,
                 timeout_s: float | None = None, health_timeout_s: float = 60.0):
        self.actors = actors
        self.restarts = 0
        self._restart, self._max_restarts = restart, max_restarts
        self._timeout_s, self._health_timeout_s = timeout_s, health_timeout_s
        self._lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._load = [0] * len(actors)  # sequences this pool has in flight on each engine
        self._last: list[EngineStats] | None = None
        self._weights: Callable[[], tuple] | None = None  # load_weights' arguments for a new engine: the newest push

    def _replace(self, e: int, dead, why: str):
        """A live actor in place of ``dead`` at engine ``e``: a new one with the newest weights, or the one another
        thread already put there. Raises :class:`EngineError` once the restarts are used up."""
        with self._restart_lock:
            if self.actors[e] is not dead:
                return self.actors[e]
            if self._restart is None or self.restarts >= self._max_restarts:
                raise EngineError(f"engine {e} died ({why}) and no restart is left "
                                  f"(engine.max_restarts={self._max_restarts}, {self.restarts} used)")
            self.restarts += 1
            log.warning("engine %d died (%s); restarting it (%d of %d)", e, why, self.restarts, self._max_restarts)
            try:
                ray.kill(dead)
            except Exception:  # noqa: BLE001 - already gone
                pass
            started = time.perf_counter()
            actor = self._restart(e)
            if self._weights is not None:
                ray.get(actor.load_weights.remote(*self._weights()))
            self.actors[e] = actor
            log.warning("engine %d restarted in %.1f s", e, time.perf_counter() - started)
            return actor

    def _call(self, calls: dict[int, Callable[[Any], Any]], timeout_s: float | None, what: str,
              hung_is_dead: bool = False, meanwhile: Callable[[], None] | None = None) -> dict[int, Any]:
        """Run ``calls[e](actor)`` on each engine ``e`` at once and wait for their results. A call whose engine died
        runs again on its replacement. Past ``timeout_s`` the calls left are cancelled: with ``hung_is_dead`` their
        engines are replaced and asked again, else it is an :class:`EngineError`. ``meanwhile`` runs here once the
        calls are sent, before waiting (the trainer's side of a broadcast)."""
        pending = {e: (self.actors[e], call(self.actors[e])) for e, call in calls.items()}
        if meanwhile is not None:
            meanwhile()
        results = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            e, (actor, ref) = next(iter(pending.items()))
            try:
                results[e] = ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                del pending[e]
            except ray.exceptions.GetTimeoutError:
                if not hung_is_dead:
                    for _, r in pending.values():
                        ray.cancel(r)
                    raise EngineError(f"{what} on engine(s) {sorted(pending)} took longer than {timeout_s:g} s "
                                      "(rollout.timeout_s); its requests were aborted") from None
                new = self._replace(e, actor, f"no answer to {what} within {timeout_s:g} s")
                pending[e] = (new, calls[e](new))
                deadline = time.monotonic() + timeout_s
            except Exception as err:  # noqa: BLE001 - only a dead engine is retried
                if not _engine_died(err):
                    raise
                new = self._replace(e, actor, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                pending[e] = (new, calls[e](new))
        return results

    def _assign(self, n: int, engine_ids: list[int | None]) -> list[int]:
        with self._lock:
            chosen = []
            for pinned in engine_ids:
                engine = pinned if pinned is not None else min(range(len(self.actors)), key=self._load.__getitem__)
                self._load[engine] += n
                chosen.append(engine)
            return chosen

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling,
                 engine_ids: list[int | None] | None = None, seeds: list[int | None] | None = None) -> Generation:
        """``sampling``: one for all prompts, or a list with one per prompt. ``engine_ids``: the engine
        each prompt must go to (None: the least loaded). ``seeds``: each prompt's sampling seed (None: the
        engine's generator). The spec stats are the sum over the engines that took part (None when
        speculative decoding is off)."""
        chosen = self._assign(n, engine_ids or [None] * len(prompts))
        shards = {e: [j for j, c in enumerate(chosen) if c == e] for e in sorted(set(chosen))}
        pick = (lambda shard: [sampling[j] for j in shard]) if isinstance(sampling, list) else (lambda shard: sampling)
        seeds = seeds or [None] * len(prompts)

        def call(shard: list[int]):
            return lambda actor: actor.generate.remote([prompts[j] for j in shard], n, pick(shard), [seeds[j] for j in shard])

        try:
            replies: dict[int, Generation] = self._call({e: call(shard) for e, shard in shards.items()},
                                                        self._timeout_s, "generation")
        finally:
            with self._lock:
                for e, shard in shards.items():
                    self._load[e] -= n * len(shard)
        results: list[list[Completion]] = [[] for _ in prompts]
        for e, shard in shards.items():
            for j, group in zip(shard, replies[e].groups):
                results[j] = group
        return Generation(results, SpecStats.total([r.spec for r in replies.values()]))

    def push_weights(self, blob: bytes, version: int, recompute_kv: bool = False) -> float:
        """Load new weights into every engine, requests in flight or not; returns the wall time."""
        started = time.perf_counter()
        self.update_weights(blob, version, recompute_kv)
        return time.perf_counter() - started

    def update_weights(self, blob: bytes, version: int, recompute_kv: bool = False,
                       method: str = "gymrl_load_weights", meanwhile: Callable[[], None] | None = None,
                       replay: Callable[[], bytes] | None = None) -> list[WeightUpdate]:
        """Load new weights into every engine at once; returns how each took them. ``method`` and ``blob``: the
        worker method and its payload (a safetensors blob by default; see weight_sync.py for the others).
        ``meanwhile``: runs once the engines were asked (the sender's side of a broadcast). ``replay``: the same
        weights as a safetensors blob, for an engine restarted later, when ``blob`` cannot be loaded again."""
        ref = ray.put(blob)  # one copy in the object store, read by every engine (and by a restarted one)
        if replay is None:
            self._weights = lambda: (ref, version, recompute_kv, method)
        else:  # packed only if an engine restarts
            self._weights = lambda: (ray.put(replay()), version, recompute_kv)
        calls = {e: (lambda a: a.load_weights.remote(ref, version, recompute_kv, method)) for e in range(len(self.actors))}
        done = self._call(calls, None, "weight update", meanwhile=meanwhile)
        return [done[e] for e in range(len(self.actors))]

    def worker_call(self, method: str, payload: bytes | list[bytes] | None = None,
                    meanwhile: Callable[[], None] | None = None) -> list[list]:
        """:meth:`RolloutEngine.worker_call` on every engine at once (``payload``: one for all, or one per engine):
        each engine's per-worker results."""
        each = payload if isinstance(payload, list) else [payload] * len(self.actors)
        done = self._call({e: (lambda a, e=e: a.worker_call.remote(method, each[e])) for e in range(len(self.actors))},
                          None, method, meanwhile=meanwhile)
        return [done[e] for e in range(len(self.actors))]

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._call({0: lambda a: a.score.remote(sequences)}, None, "scoring")[0]

    def stats(self, new_peak_window: bool = False) -> list[EngineStats]:
        """Each engine's counters; an engine that is dead or does not answer within ``health_timeout_s`` is
        replaced (its counters start again from zero)."""
        done = self._call({e: (lambda a: a.stats.remote(new_peak_window)) for e in range(len(self.actors))},
                          self._health_timeout_s, "a health check", hung_is_dead=True)
        return [done[e] for e in range(len(self.actors))]

    def step_metrics(self) -> dict[str, float]:
        """Per engine since the previous call: tokens/s while busy, and the peak queue depth (sequences
        in flight at once); the first call covers the engines' whole life."""
        now = self.stats(new_peak_window=True)
        before = self._last or [EngineStats(s.engine_id, 0, 0, 0, 0, 0.0, 0) for s in now]
        self._last = now
        metrics = {"engine_restarts": float(self.restarts)}
        for old, new in zip(before, now):
            if new.tokens < old.tokens:  # a restarted engine counts from zero again
                old = EngineStats(new.engine_id, 0, 0, 0, 0, 0.0, 0)
            busy = new.busy_seconds - old.busy_seconds
            metrics[f"engine_tokens_per_s/{new.engine_id}"] = (new.tokens - old.tokens) / busy if busy > 0 else 0.0
            metrics[f"engine_queue_depth/{new.engine_id}"] = float(new.peak_in_flight)
        return metrics
