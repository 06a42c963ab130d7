"""``gymrl bench --suite rollout``: raw vLLM tokens/s on the engine against gymrl's rollout tokens/s through Ray,
the environment server and the reward, on the same prompts, at two batch sizes; and where the rest goes.

Raw: vLLM's own generate, timed inside the engine actor (no Ray hop, no verification). Rollout: the
``RolloutRunner`` timed by the caller, two ways: all tasks in one call (decoding, then every /verify), and one call
per group from its own thread, as the trainer's ``RolloutProducer`` makes them (a group's /verify overlaps the
decoding of the others). The breakdown of a rollout's wall time: the engine decoding (its busy
time, read from the actor), the Ray hop and output handling (the runner's generate time less the engine's),
the /verify round trips (HTTP and the server) less the reward functions themselves (timed in-process on the
same responses), and the rest (episode set-up, rollout assembly). Prompt tokenisation is cached by the runner,
so it is measured apart, once per task, uncached.
"""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from rich.table import Table

from gymrl.bench.args import BenchArgs, with_session
from gymrl.bench.report import summarise, versions, write_results
from gymrl.bench.trl_baseline import IN_PROCESS_REWARDS


def _tasks(session, count: int) -> list:
    pool = session.envs[session.cfg.envs[0].name].tasks("train")
    return [pool[i % len(pool)] for i in range(count)]


def _per_group(runner, tasks: list, n: int, sampling) -> tuple[int, float]:
    """(completion tokens, wall seconds) of one ``runner.run`` per group, all at once, as the producer's threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(tasks)) as threads:
        batches = list(threads.map(lambda t: runner.run([t], n, sampling, 0), tasks))
    return sum(b.num_tokens for b in batches), time.perf_counter() - started


def measure_rollout(session, prompts: int, repeats: int) -> dict:
    """One batch size: ``prompts`` train tasks x group_size samples."""
    from gymrl.rollout.runner import encode_prompt

    cfg, runner = session.cfg, session.runner
    n, sampling = cfg.train.group_size, cfg.sampling
    tasks = _tasks(session, prompts)
    score = IN_PROCESS_REWARDS.get(cfg.envs[0].name)
    started = time.perf_counter()
    ids = [encode_prompt(session.tokenizer, t, cfg.rollout.chat_template_kwargs) for t in tasks]
    tokenise = time.perf_counter() - started
    actor = session.pool.actors[0]
    runner.run(tasks, n, sampling, 0)  # warm-up: first requests pay one-off costs
    _per_group(runner, tasks, n, sampling)
    raw, rollout, per_group, parts = [], [], [], []
    for _ in range(repeats):
        tokens, seconds, _ = ray.get(actor.timed_generate.remote(ids, n, sampling))
        raw.append(tokens / seconds)
        tokens, seconds = _per_group(runner, tasks, n, sampling)
        per_group.append(tokens / seconds)
        busy = sum(s.busy_seconds for s in session.pool.stats())
        started = time.perf_counter()
        batch = runner.run(tasks, n, sampling, 0)
        wall = time.perf_counter() - started
        engine = sum(s.busy_seconds for s in session.pool.stats()) - busy
        rollout.append(batch.num_tokens / wall)
        reward = 0.0
        if score is not None:
            started = time.perf_counter()
            for r, task in zip(batch.rollouts, [t for t in tasks for _ in range(n)]):
                score(task.row, r.text)
            reward = time.perf_counter() - started
        parts.append({"wall_s": wall, "engine_decode_s": engine, "ray_and_outputs_s": batch.generate_seconds - engine,
                      "verify_http_s": batch.verify_seconds - reward, "reward_s": reward,
                      "other_s": wall - batch.generate_seconds - batch.verify_seconds - batch.tool_seconds})
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return {"prompts": prompts, "group_size": n, "sequences": prompts * n, "raw_vllm_tokens_per_s": summarise(raw),
            "rollout_tokens_per_s": summarise(rollout),
            "rollout_over_raw": statistics.median(h / r for h, r in zip(rollout, raw)),
            "per_group_tokens_per_s": summarise(per_group),
            "per_group_over_raw": statistics.median(g / r for g, r in zip(per_group, raw)),
            "breakdown_s": breakdown | {"tokenisation_uncached_s": tokenise}}


def run_rollout_bench(session, out: Path, batch_prompts: tuple[int, ...], repeats: int = 3) -> Table:
    cfg = session.cfg
    batches = [measure_rollout(session, p, repeats) for p in batch_prompts]
    rows = []
    for b in batches:
        label, d = f"{b['prompts']} x {b['group_size']}", b["breakdown_s"]
        rows += [
            (label, "raw vLLM tokens/s (in the engine actor)", f"{b['raw_vllm_tokens_per_s']['median']:.0f}"),
            (label, "gymrl rollout tokens/s (Ray + env server + reward)", f"{b['rollout_tokens_per_s']['median']:.0f}"),
            (label, "rollout / raw", f"{b['rollout_over_raw']:.2f}"),
            (label, "gymrl rollout tokens/s, one call per group (as the trainer)", f"{b['per_group_tokens_per_s']['median']:.0f}"),
            (label, "per group / raw", f"{b['per_group_over_raw']:.2f}"),
            (label, "rollout wall (s)", f"{d['wall_s']:.3f}"),
            (label, "  engine decoding (busy) (s)", f"{d['engine_decode_s']:.3f}"),
            (label, "  Ray hop, queueing, output handling (s)", f"{d['ray_and_outputs_s']:.3f}"),
            (label, "  /verify HTTP round trips and server (s)", f"{d['verify_http_s']:.3f}"),
            (label, "  reward functions (in-process) (s)", f"{d['reward_s']:.4f}"),
            (label, "  episode set-up, assembly (s)", f"{d['other_s']:.3f}"),
            (label, "prompt tokenisation, uncached, once per task (s)", f"{d['tokenisation_uncached_s']:.4f}"),
        ]
    results = {"versions": versions("vllm", "torch", "ray"),
               "config": {"model": str(session.model_path), "max_tokens": cfg.sampling.max_tokens,
                          "min_tokens": cfg.sampling.min_tokens, "temperature": cfg.sampling.temperature,
                          "env": cfg.envs[0].name, "repeats": repeats},
               "batches": batches}
    return write_results(out, "rollout", results, rows, ["batch (prompts x samples)", "measure", f"median of {repeats}"],
                         "gymrl bench --suite rollout")


def run_suite(a: BenchArgs) -> Table:
    p = a.cfg.train.prompts_per_step
    return with_session(a, lambda session: run_rollout_bench(session, a.out, (p, 4 * p), a.repeats))
