"""Engine actors on Ray, and the pool that drives them.

Start-up places one :class:`~gymrl.rollout.engine.RolloutEngine` actor per engine and waits for each to load its
model, warning about an engine Ray has no room for (Ray itself says nothing). :class:`EnginePool` spreads prompt
groups over the actors, pushes weights into all of them at once, and replaces an engine that died.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray

from gymrl.config import EngineConfig
from gymrl.rollout.engine import Completion, EngineStats, Generation, RolloutEngine, Sampling, SpecStats, WeightUpdate

log = logging.getLogger(__name__)


def actor_resources(cfg: EngineConfig) -> dict:
    """Ray resources of one engine actor: its CPUs, on cuda one GPU per tensor-parallel rank, and the custom resources
    of engine.ray_resources (which place it on the nodes that have them)."""
    resources = {"num_cpus": cfg.cpus_per_engine, "num_gpus": cfg.tensor_parallel_size if cfg.device == "cuda" else 0}
    return resources | ({"resources": dict(cfg.ray_resources)} if cfg.ray_resources else {})


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


def _resource_text(counts: dict, keys) -> str:
    return ", ".join(f"{key} {counts.get(key, 0):g}" for key in keys)


PLACEMENT_WARNING_S = 120.0  # an engine load takes 20-160 s on the lent machines


def wait_ready(actors: list, cfg: EngineConfig, warn_after_s: float = PLACEMENT_WARNING_S) -> list[dict]:
    """The actors' ``ready()`` answers. Ray keeps an actor it has no room for waiting without an error, so an
    engine still not ready after ``warn_after_s`` gets one warning with what it needs and what Ray has free."""
    refs = [actor.ready.remote() for actor in actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=warn_after_s)
    if pending:
        resources = actor_resources(cfg)
        need = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"], **cfg.ray_resources}
        free, total = ray.available_resources(), ray.cluster_resources()
        never = any(need[key] > total.get(key, 0) for key in need)
        log.warning("%d of %d engine(s) not ready after %.0f s: still loading, or waiting for Ray to place them. "
                    "Each engine needs %s (engine.cpus_per_engine, engine.tensor_parallel_size, engine.ray_resources); "
                    "Ray has %s free "
                    "of %s%s. Fewer engines, a smaller engine.cpus_per_engine or a larger ray_num_cpus make room.",
                    len(pending), len(refs), warn_after_s, _resource_text(need, need), _resource_text(free, need),
                    _resource_text(total, need),
                    " (less than one engine needs: it can never be placed)" if never else "")
    return ray.get(refs)


class EngineError(RuntimeError):
    """A generation that failed for the engine's sake: it timed out, or its engine died past its restarts."""


class _Background:
    """A call running in a daemon thread (one left blocked in a collective does not hold the process up)."""

    def __init__(self, call: Callable[[], None]):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread by result()
            self.error = err

    def result(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


def _get(ref, timeout: float | None, sender: _Background | None):
    """``ray.get(ref, timeout)``; with a ``sender`` working beside the call, its error as soon as it has one."""
    if sender is None:
        return ray.get(ref, timeout=timeout)
    end = None if timeout is None else time.monotonic() + timeout
    while not ray.wait([ref], timeout=1.0 if end is None else max(0.0, min(1.0, end - time.monotonic())))[0]:
        if sender.error is not None:
            raise sender.error
        if end is not None and time.monotonic() >= end:
            raise ray.exceptions.GetTimeoutError(f"no result within {timeout:g} s")
    return ray.get(ref)


def _load_part(method: str, ref, actor):
    return actor.load_weight_part.remote(method, ref)


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
        self.running = True  # False between stop() and start()

    def stop(self) -> None:
        """Kill every engine actor (vLLM's processes go with them, and their accelerator memory) and forget the newest
        weights: a CUDA push's replay holds the trainer's flat buffer. :meth:`start` brings the engines back."""
        if not self.running:
            return
        for actor in self.actors:
            ray.kill(actor)
        self.running, self._weights, self._last = False, None, None

    def start(self) -> float:
        """Start every engine again with ``restart``, on the model folder's weights (not counted as restarts: no
        engine died); returns the wall seconds."""
        started = time.perf_counter()
        if not self.running:
            if self._restart is None:
                raise EngineError("this engine pool was made without a way to start engines (no restart callback)")
            self.actors = [self._restart(e) for e in range(len(self.actors))]
            self.running = True
        return time.perf_counter() - started

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
        engines are replaced and asked again, else it is an :class:`EngineError`. ``meanwhile`` runs in a thread of
        its own once the calls are sent (the sender's side of a broadcast): whichever side fails first is raised at
        once, not after the other waited out its collective's timeout."""
        pending = {e: (self.actors[e], call(self.actors[e])) for e, call in calls.items()}
        sender = _Background(meanwhile) if meanwhile is not None else None
        results = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            e, (actor, ref) = next(iter(pending.items()))
            try:
                results[e] = _get(ref, None if deadline is None else max(0.0, deadline - time.monotonic()), sender)
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
        if sender is not None:
            sender.result()
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

    def update_weights_in_parts(self, parts: Iterable[tuple[str, bytes | None, Callable[[], None] | None]],
                                version: int, recompute_kv: bool, replay: Callable[[], bytes]) -> list[WeightUpdate]:
        """Load new weights into every engine in several worker calls inside one pause (a bucketed push): for each
        ``(method, payload, meanwhile)`` of ``parts``, taken one at a time, every engine's workers run ``method``.
        ``replay``: the whole new weights as a safetensors blob, read at the end, for an engine restarted meanwhile
        (it missed the opening and is loaded whole instead) and for any restarted later."""
        self._call({e: (lambda a: a.open_weight_update.remote(recompute_kv)) for e in range(len(self.actors))}, None,
                   "weight update")
        for method, payload, meanwhile in parts:
            call = functools.partial(_load_part, method, ray.put(payload))
            self._call(dict.fromkeys(range(len(self.actors)), call), None, "weight update", meanwhile=meanwhile)
            del call  # the bucket leaves the object store
        self._weights = lambda: (ray.put(replay()), version, recompute_kv)
        done = self._call({e: (lambda a: a.close_weight_update.remote(version)) for e in range(len(self.actors))},
                          None, "weight update")
        missed = {e: (lambda a: a.load_weights.remote(*self._weights())) for e, u in done.items() if u is None}
        return [update for _, update in sorted((done | self._call(missed, None, "weight update")).items())]

    def worker_call(self, method: str, payload: bytes | list[bytes] | None = None,
                    meanwhile: Callable[[], None] | None = None) -> list[list]:
        """:meth:`RolloutEngine.worker_call` on every engine at once (``payload``: one for all, or one per engine):
        each engine's per-worker results."""
        each = payload if isinstance(payload, list) else [payload] * len(self.actors)
        done = self._call({e: (lambda a, e=e: a.worker_call.remote(method, each[e])) for e in range(len(self.actors))},
                          None, method, meanwhile=meanwhile)
        return [done[e] for e in range(len(self.actors))]

    def sleep(self) -> float:
        """Put every engine to sleep (:meth:`RolloutEngine.sleep`); returns the wall seconds."""
        return self._all("sleep")

    def wake_up(self) -> float:
        """Wake every engine (:meth:`RolloutEngine.wake_up`); returns the wall seconds."""
        return self._all("wake_up")

    def _all(self, method: str) -> float:
        started = time.perf_counter()
        self._call({e: (lambda a: getattr(a, method).remote()) for e in range(len(self.actors))}, None, method)
        return time.perf_counter() - started

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._call({0: lambda a: a.score.remote(sequences)}, None, "scoring")[0]

    def stats(self, new_peak_window: bool = False) -> list[EngineStats]:
        """Each engine's counters; an engine that is dead or does not answer within ``health_timeout_s`` is
        replaced (its counters start again from zero)."""
        done = self._call({e: (lambda a: a.stats.remote(new_peak_window)) for e in range(len(self.actors))},
                          self._health_timeout_s, "a health check", hung_is_dead=True)
        return [done[e] for e in range(len(self.actors))]

    def nodes(self) -> list[dict[str, str]]:
        """The Ray node each engine runs on (engine.ray_resources places them), as the run records it."""
        done = self._call({e: (lambda a: a.node.remote()) for e in range(len(self.actors))},
                          self._health_timeout_s, "a placement check", hung_is_dead=True)
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
