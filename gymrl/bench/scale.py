"""``gymrl bench --suite scale``: the sharded trainer (train.workers = 2: FSDP2 ranks as Ray actors, gloo on CPU)
against the one-process trainer (train.workers = 1) from the same weights on the same fixed batch: trainer step
time, each rank's peak resident memory and its bytes of parameters and AdamW state, and the extra memory of the
weight push into one engine per ``train.push_bucket_mb``; ``scale.json`` and ``scale.md``.

No environment server starts, and the engine only for the pushes: the batch is made here (the config's prompts, completions of
``sampling.max_tokens`` random tokens), so every run trains on the same tokens and the figures are the trainers'
alone. The one-process trainer runs in a Ray actor of its own, on the driver's torch threads (as ``gymrl train``
runs it in the driver), so that its process's peak memory is its own and not the driver's."""

import os
import random
import time

import ray
import torch
from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import summarise, write_results
from gymrl.memory import held_bytes, process_memory
from gymrl.rollout.runner import Rollout, RolloutBatch

WORKERS = (1, 2)
BUCKETS_MB = (1, 16, 256)
BYTES_TARGET = 0.6  # N=2's parameters + AdamW state per rank, at most this fraction of N=1's


def fixed_batch(cfg, tokenizer, vocab: int, seed: int = 0, min_tokens: int | None = None) -> RolloutBatch:
    """One step's batch of the config's shape: ``prompts_per_step`` training prompts of the first environment,
    ``group_size`` completions each of random tokens below ``vocab``, ``sampling.max_tokens`` long (as
    ``sampling.min_tokens`` makes them in configs/bench_small.yaml) or, with ``min_tokens``, of lengths drawn between
    the two; behaviour logprobs and rewards drawn from ``seed`` (rewards differ within each group, so every sequence
    has an advantage)."""
    from gymrl.envs.registry import load_environment
    from gymrl.rollout.runner import encode_prompt

    env_cfg = cfg.envs[0]
    tasks = load_environment(env_cfg.name, env_cfg.args).tasks("train")[: cfg.train.prompts_per_step]
    rng, rollouts = random.Random(seed), []
    for task in tasks:
        prompt = encode_prompt(tokenizer, task, cfg.rollout.chat_template_kwargs)
        for g in range(cfg.train.group_size):
            length = cfg.sampling.max_tokens if min_tokens is None else rng.randint(min_tokens, cfg.sampling.max_tokens)
            completion = [rng.randrange(vocab) for _ in range(length)]
            rollouts.append(Rollout(
                task_id=task.id, env=env_cfg.name, prompt_ids=prompt, completion_ids=completion,
                completion_mask=[1] * len(completion), logprobs=[rng.uniform(-6.0, -0.5) for _ in completion],
                text="", finish_reason="length", reward=float(rng.random() < 0.5) + 0.1 * g, reason="",
                policy_version=0, temperature=cfg.sampling.temperature))
    return RolloutBatch(rollouts, cfg.train.group_size, generate_seconds=0.0, verify_seconds=0.0)


class OneProcess:
    """The one-process trainer (:class:`~gymrl.train.trainer.GRPOTrainer`) in a Ray actor of its own."""

    def __init__(self, cfg, model_path, threads: int):
        from gymrl.models.checkpoint import load_policy
        from gymrl.session import Session
        from gymrl.train.trainer import GRPOTrainer

        torch.set_num_threads(threads)  # Ray gives a zero-CPU actor one thread; the driver's trainer has them all
        policy, tokenizer = load_policy(model_path, cfg.train.dtype)
        self.trainer = GRPOTrainer(Session(cfg, {}, model_path, policy, tokenizer, pool=None, runner=None))

    def step(self, batch: RolloutBatch) -> float:
        started = time.perf_counter()
        self.trainer.step(batch)
        return time.perf_counter() - started

    def memory(self) -> dict[str, int]:
        return held_bytes(self.trainer.policy, self.trainer.optimizer) | process_memory()

    def weights(self) -> dict[str, torch.Tensor]:
        return self.trainer.policy.state_dict()

    def threads(self) -> int:
        return torch.get_num_threads()


def _with_train(cfg, **update):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def _measure_push(sharded, mb: int) -> dict:
    """One push of the ranks' weights into the engine (and the driver's policy) in buckets of ``mb`` MB: the buckets,
    the peak resident growth over it of rank 0, the driver and the engine's worker, and its time."""
    sharded.cfg = _with_train(sharded.cfg, push_bucket_mb=mb)
    engine = sharded.pusher.pool
    before = ray.get(sharded.ranks[0].memory.remote(reset_peak=True))
    driver_before = process_memory(reset_peak=True)
    (engine_before,), = engine.worker_call("gymrl_process_memory", b"reset peak")
    seconds = sharded.push_weights()
    after = ray.get(sharded.ranks[0].memory.remote())
    (engine_after,), = engine.worker_call("gymrl_process_memory")
    pushed = sharded.pusher.last
    return {"push_bucket_mb": mb, "buckets": int(pushed["buckets"]), "largest_bucket_bytes": int(pushed["largest_bytes"]),
            "bytes": int(pushed["bytes"]), "rank0_peak_growth_bytes": after["peak_rss"] - before["rss"],
            "rank0_shared_growth_bytes": after["rss_shared"] - before["rss_shared"],
            "driver_peak_growth_bytes": process_memory()["peak_rss"] - driver_before["rss"],
            "engine_peak_growth_bytes": engine_after["peak_rss"] - engine_before["rss"], "seconds": seconds}


def run_scale_bench(cfg, out, steps: int, buckets_mb: tuple[int, ...] = BUCKETS_MB,
                    one_process_threads: tuple[int, ...] | None = None) -> Table:
    """``steps`` trainer steps (the first a warm-up, left out of the times) on one fixed batch with train.workers
    1 (on each of ``one_process_threads`` torch threads; by default the driver's, then 1 as each rank of N=2 has)
    then 2, from the config's model; then the 2 ranks' weights pushed into one engine with each bucket size in ``buckets_mb``
    (smallest first, so a larger bucket's growth is not hidden by memory a smaller one freed)."""
    from gymrl.envs.registry import load_environment
    from gymrl.models.checkpoint import load_policy
    from gymrl.rollout.pool import EnginePool, start_engines
    from gymrl.session import Session, init_ray, resolve_model_path
    from gymrl.train.sharded import ShardedTrainer

    envs = [load_environment(e.name, e.args) for e in cfg.envs]
    model_path = resolve_model_path(cfg.model, envs, [e.weight for e in cfg.envs])
    cfg = _with_train(cfg, device="cpu", steps=steps, checkpoint_every=0, tensorboard=False)
    init_ray(cfg)
    load_at_start = os.getloadavg()[0]
    policy, tokenizer = load_policy(model_path, cfg.train.dtype)
    batch = fixed_batch(cfg, tokenizer, policy.config.vocab_size)
    parameters = sum(p.numel() for p in policy.parameters())
    runs, weights, pushes = {}, {}, []
    # N=1 on the driver's threads (as `gymrl train` runs it), and on one thread, as each rank of N=2 has: on a
    # loaded machine two OpenMP threads can wait on each other, which the second row shows.
    if one_process_threads is None:
        one_process_threads = tuple(dict.fromkeys((torch.get_num_threads(), 1)))
    variants = [("1" if i == 0 else f"1 ({t} thread{'s' * (t > 1)})", 1, t) for i, t in enumerate(one_process_threads)]
    variants.append(("2", 2, 0))
    for label, n, threads in variants:
        ncfg = _with_train(cfg, workers=n)
        if n == 1:
            actor = ray.remote(num_cpus=0)(OneProcess).remote(ncfg, model_path, threads)
            times = [ray.get(actor.step.remote(batch)) for _ in range(steps)]
            memory, threads = [ray.get(actor.memory.remote())], ray.get(actor.threads.remote())
            weights.setdefault(n, ray.get(actor.weights.remote()))
            ray.kill(actor)
        else:
            driver_policy, _ = load_policy(model_path, cfg.train.dtype)  # the driver's full copy, as in a run
            pool = EnginePool(start_engines(str(model_path.resolve()), cfg.engine.model_copy(update={"num_engines": 1}),
                                            cfg.seed))
            sharded = ShardedTrainer(Session(ncfg, {}, model_path, driver_policy, tokenizer, pool=pool, runner=None))
            try:
                times = []
                for _ in range(steps):
                    started = time.perf_counter()
                    sharded.step(batch)
                    times.append(time.perf_counter() - started)
                memory = ray.get([r.memory.remote() for r in sharded.ranks])
                threads = ray.get(sharded.ranks[0].__ray_call__.remote(lambda _: torch.get_num_threads()))
                pushes = [_measure_push(sharded, mb) for mb in sorted(buckets_mb)]
                weights[n] = {k: v.clone() for k, v in sharded.policy.state_dict().items()}
            finally:
                sharded.close()
                for engine in pool.actors:
                    ray.kill(engine)
        step_s = summarise(times[1:])
        runs[label] = {"workers": n, "torch_threads_per_rank": threads, "step_s": step_s,
                        "steps_per_s": 1 / step_s["median"], "ranks": memory,
                        "max_rank_state_bytes": max(m["param_bytes"] + m["optim_bytes"] for m in memory),
                        "max_rank_peak_rss": max(m["peak_rss"] for m in memory)}
    one, two = runs["1"], runs["2"]
    speed = {f"2 / {label}": two["steps_per_s"] / r["steps_per_s"] for label, r in runs.items() if r["workers"] == 1}
    ratio = two["max_rank_state_bytes"] / one["max_rank_state_bytes"]
    difference = max(float((weights[1][k] - weights[2][k]).abs().max()) for k in weights[1])
    results = {
        "model": str(model_path), "parameters": parameters, "steps": steps, "load_average_1m_start": load_at_start,
        "batch": {"sequences": len(batch.rollouts), "tokens": sum(len(r.prompt_ids) + len(r.completion_ids)
                                                                  for r in batch.rollouts),
                  "completion_tokens": cfg.sampling.max_tokens, "micro_batch_size": cfg.train.micro_batch_size,
                  "dtype": cfg.train.dtype, "loss_type": cfg.train.loss_type},
        "runs": runs, "state_bytes_ratio": ratio, "state_bytes_target": BYTES_TARGET,
        "state_bytes_target_met": ratio <= BYTES_TARGET, "steps_per_s_ratio": speed,
        "max_weight_difference": difference, "push": pushes,
    }

    def mb(n):
        return f"{n / 2**20:.1f}"

    rows = []
    for label, r in runs.items():
        s = r["step_s"]
        state = "; ".join(f"{mb(m['param_bytes'])} + {mb(m['optim_bytes'])}" for m in r["ranks"])
        rows.append((label, r["torch_threads_per_rank"], f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]",
                     f"{r['steps_per_s']:.3f}", state, "; ".join(mb(m["peak_rss"]) for m in r["ranks"])))
    notes = [
        f"{parameters / 1e6:.1f}M parameters ({model_path.name}), {cfg.train.dtype}; one fixed batch of "
        f"{len(batch.rollouts)} sequences ({cfg.train.prompts_per_step} prompts x {cfg.train.group_size}, every "
        f"completion {cfg.sampling.max_tokens} random tokens, {results['batch']['tokens']} tokens), micro_batch_size "
        f"{cfg.train.micro_batch_size}, trained {steps} times by each trainer from the same weights; times are the "
        f"trainer's step alone (N=1: `GRPOTrainer.step` in its own Ray actor; N=2: `ShardedTrainer.step` from the "
        f"driver, the batch's trip to the ranks included), median [min-max] of steps 2..{steps}.",
        f"Parameters + AdamW state per rank, N=2 / N=1: **x{ratio:.3f}** (target <= {BYTES_TARGET}: "
        f"{'met' if ratio <= BYTES_TARGET else 'not met'}); steps/s "
        f"{', '.join(f'{k}: x{v:.2f}' for k, v in speed.items())}; "
        f"largest weight difference after {steps} steps: {difference:.2e}.",
        "Peak RSS is each rank's process's VmHWM over its life (a rank loads the full policy before it shards it). "
        "Pushes into one engine run smallest bucket first, after the steps; peak RSS growth is VmHWM after the push "
        "less VmRSS before it (the peak reset just before). Rank 0 holds the bucket it gathers and the one before, "
        "which it wrote into Ray's object store, whose shared pages count in its RSS the first time they are touched "
        "(the 'object store pages' column); the engine's worker holds a bucket while it loads it, and a layer's "
        "tensors until the layer is whole.",
        "",
        "| push_bucket_mb | buckets | largest bucket (MB) | rank 0 peak RSS growth (MB) | of it, object store pages "
        "(MB) | driver peak RSS growth (MB) | engine worker peak RSS growth (MB) | push (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ] + [f"| {g['push_bucket_mb']} | {g['buckets']} | {mb(g['largest_bucket_bytes'])} | "
         f"{mb(g['rank0_peak_growth_bytes'])} | {mb(g['rank0_shared_growth_bytes'])} | "
         f"{mb(g['driver_peak_growth_bytes'])} | {mb(g['engine_peak_growth_bytes'])} | {g['seconds']:.2f} |"
         for g in pushes]
    header = ["workers (N)", "torch threads per rank", "s/step median [min-max]", "steps/s",
              "params + AdamW per rank (MB)", "peak RSS per rank (MB)"]
    return write_results(out, "scale", results, rows, header,
                         f"gymrl bench --suite scale: train.workers 1 vs 2, {steps} steps each", notes)


def run_suite(a: BenchArgs) -> Table:
    return run_scale_bench(a.cfg, a.out, a.steps)
