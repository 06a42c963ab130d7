"""``gymrl bench --suite pool``: an engine pool against its engines alone (tokens/s), and the pause window of a
weight update that lands while every engine has requests in flight against the time to copy the same tensors;
``pool.json`` and ``pool.md``."""

import platform
import statistics
import time
from pathlib import Path

import ray
from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import measure_table, summarise, write_json
from gymrl.bench.workload import model_and_prompts


def run_pool_bench(cfg, out: Path, repeats: int = 3, engines: int = 2) -> Table:
    """The engine pool against its engines alone, and in-flight weight updates, with ``engines`` engines
    of the config's model. Throughput: each engine alone (vLLM's own generate, timed in the actor) on
    the step's prompts, summed, vs the pool spreading ``engines`` times those prompts over all of them.
    Updates: the pause window of a push that lands while every engine has requests in flight, vs the
    time to copy the same tensors in memory."""
    import threading

    import torch
    import vllm

    from gymrl.rollout.pool import EnginePool, start_engines
    from gymrl.rollout.weight_sync import pack_state_dict
    from gymrl.session import init_ray

    path, policy, prompts = model_and_prompts(cfg)
    n, sampling = cfg.train.group_size, cfg.sampling
    init_ray(cfg)
    cpus = min(cfg.engine.cpus_per_engine, (cfg.ray_num_cpus or engines) / engines)
    engine_cfg = cfg.engine.model_copy(update={"num_engines": engines, "cpus_per_engine": cpus})
    pool = EnginePool(start_engines(str(path.resolve()), engine_cfg, cfg.seed))
    state = policy.state_dict()
    blob = pack_state_dict(state)
    copy: list[float] = []
    try:
        for actor in pool.actors:  # warm-up: first requests pay one-off costs
            ray.get(actor.timed_generate.remote(prompts, n, sampling))
        alone, pooled = [], []
        for _ in range(repeats):
            rates = []
            for actor in pool.actors:
                tokens, seconds, _ = ray.get(actor.timed_generate.remote(prompts, n, sampling))
                rates.append(tokens / seconds)
            alone.append(sum(rates))
            started = time.perf_counter()
            reply = pool.generate(prompts * engines, n, sampling)
            pooled.append(sum(len(c.token_ids) for g in reply.groups for c in g) / (time.perf_counter() - started))

        idle, busy = [], []
        for _ in range(repeats):
            version = pool.stats()[0].policy_version + 1
            idle += pool.update_weights(blob, version)
            worker = threading.Thread(target=pool.generate, args=(prompts * engines, n, sampling))
            worker.start()
            while not all(st.in_flight > 0 for st in pool.stats()):
                time.sleep(0.002)
            busy += pool.update_weights(blob, version + 1)
            worker.join()
    finally:
        for actor in pool.actors:
            ray.kill(actor)
    time.sleep(1.0)  # the engines' processes gone: the copy is timed on a quiet machine
    for _ in range(11):  # cheap: 10 timed copies (the first is a warm-up), their median reported
        started = time.perf_counter()
        copies = {k: v.clone() for k, v in state.items()}
        copy.append(time.perf_counter() - started)
        del copies
    copy = copy[1:]

    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "versions": {"vllm": vllm.__version__, "ray": ray.__version__, "torch": torch.__version__},
        "config": {"engines": engines, "cpus_per_engine": cpus, "prompts_per_engine": len(prompts), "group_size": n,
                   "max_tokens": sampling.max_tokens, "model": str(path), "weight_bytes": len(blob)},
        "engines_alone_summed_tokens_per_s": summarise(alone),
        "pool_tokens_per_s": summarise(pooled),
        "pool_over_sum_of_engines": statistics.median(p / a for p, a in zip(pooled, alone)),
        "update_pause_in_flight_s": summarise([u.pause_seconds for u in busy]),
        "update_load_in_flight_s": summarise([u.load_seconds for u in busy]),
        "in_flight_at_update": summarise([float(u.in_flight) for u in busy]),
        "update_pause_idle_s": summarise([u.pause_seconds for u in idle]),
        "tensor_copy_s": summarise(copy),
    }
    results["pause_over_copy"] = results["update_pause_in_flight_s"]["median"] / results["tensor_copy_s"]["median"]
    write_json(out, "pool", results)
    rows = [
        (f"{engines} engines alone, summed: tokens/s", f"{results['engines_alone_summed_tokens_per_s']['median']:.0f}"),
        (f"pool of {engines}: tokens/s", f"{results['pool_tokens_per_s']['median']:.0f}"),
        ("pool / sum of engines", f"{results['pool_over_sum_of_engines']:.2f}"),
        ("update with requests in flight: pause window (s)", f"{results['update_pause_in_flight_s']['median']:.4f}"),
        ("  of which loading the weights (s)", f"{results['update_load_in_flight_s']['median']:.4f}"),
        ("  sequences in flight per engine", f"{results['in_flight_at_update']['median']:.0f}"),
        ("update with nothing in flight: pause window (s)", f"{results['update_pause_idle_s']['median']:.4f}"),
        (f"copying the same tensors in memory ({len(blob) / 1e6:.1f} MB) (s)", f"{results['tensor_copy_s']['median']:.5f}"),
        ("pause window / copy", f"{results['pause_over_copy']:.0f}"),
    ]
    return measure_table(out / "pool.md", rows, f"gymrl bench pool: {engines} engines, {len(prompts)} prompts x {n} "
                         f"per engine, median of {repeats}", f"measure (median of {repeats})")


def run_suite(a: BenchArgs) -> Table:
    return run_pool_bench(a.cfg, a.out, a.repeats)
