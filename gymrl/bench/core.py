"""``gymrl bench --suite core``: raw vLLM tokens/s (timed inside the engine actor) against the harness's rollout
tokens/s (through Ray and the environment server's /verify), the weight-push time and the trainer step time.

All figures come from one process and one engine, so the ratio compares like with like on a noisy
machine. Results go to ``results.json`` (machine-readable) and ``results.md`` (a short table).
"""

import platform
import statistics
import time
from pathlib import Path

import ray
from rich.table import Table

from gymrl.bench.args import BenchArgs, with_session
from gymrl.bench.report import measure_table, summarise, write_json
from gymrl.session import Session
from gymrl.train.trainer import GRPOTrainer


def run_bench(session: Session, out: Path, repeats: int = 3) -> Table:
    import torch
    import vllm

    cfg = session.cfg
    trainer = GRPOTrainer(session)
    tasks = session.envs[cfg.envs[0].name].tasks("train")[: cfg.train.prompts_per_step]
    prompts = [session.runner.prompt_ids(t) for t in tasks]
    n = cfg.train.group_size
    actor = session.pool.actors[0]
    session.runner.run(tasks, n, cfg.sampling, 0)  # warm-up: first requests pay one-off costs

    raw, harness, push, step = [], [], [], []
    for _ in range(repeats):
        # Raw: vLLM's generate timed inside the engine actor (no Ray hop, no verification).
        tokens, seconds, _ = ray.get(actor.timed_generate.remote(prompts, n, cfg.sampling))
        raw.append(tokens / seconds)
        # Harness: task -> tokens -> Ray -> vLLM -> completions -> verified rollouts, timed by the caller.
        started = time.perf_counter()
        batch = session.runner.run(tasks, n, cfg.sampling, trainer.version)
        harness.append(batch.num_tokens / (time.perf_counter() - started))
        step.append(trainer.step(batch).train_seconds)
        push.append(trainer.push_weights())

    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "ray": ray.__version__},
        "config": {"prompts": len(prompts), "group_size": n, "max_tokens": cfg.sampling.max_tokens,
                   "model": str(session.model_path), "parameters": sum(p.numel() for p in session.policy.parameters())},
        "raw_vllm_tokens_per_s": summarise(raw),
        "harness_rollout_tokens_per_s": summarise(harness),
        "harness_over_raw": statistics.median(h / r for h, r in zip(harness, raw)),
        "weight_push_s": summarise(push),
        "trainer_step_s": summarise(step),
    }
    write_json(out, "results", results)

    rows = [
        ("raw vLLM tokens/s (in the engine actor)", f"{results['raw_vllm_tokens_per_s']['median']:.0f}"),
        ("harness rollout tokens/s (Ray + verify)", f"{results['harness_rollout_tokens_per_s']['median']:.0f}"),
        ("harness / raw", f"{results['harness_over_raw']:.2f}"),
        ("weight push (s)", f"{results['weight_push_s']['median']:.3f}"),
        ("trainer step (s)", f"{results['trainer_step_s']['median']:.3f}"),
    ]
    return measure_table(out / "results.md", rows,
                         f"gymrl bench: {len(prompts)} prompts x {n} samples, median of {repeats}",
                         f"measure (median of {repeats})")


def run_suite(a: BenchArgs) -> Table:
    return with_session(a, lambda session: run_bench(session, a.out, a.repeats))
