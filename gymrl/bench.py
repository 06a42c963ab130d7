"""``gymrl bench``: raw vLLM vs harness rollout throughput, weight-push time and trainer step time.

All figures come from one process and one engine, so the ratio compares like with like on a noisy
machine. Results go to ``results.json`` (machine-readable) and ``results.md`` (a short table).
"""

import json
import platform
import statistics
import time
from pathlib import Path

import ray
from rich.table import Table

from gymrl.session import Session
from gymrl.train.loop import GRPOTrainer


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


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
        tokens, seconds = ray.get(actor.timed_generate.remote(prompts, n, cfg.sampling))
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
        "raw_vllm_tokens_per_s": _summary(raw),
        "harness_rollout_tokens_per_s": _summary(harness),
        "harness_over_raw": statistics.median(h / r for h, r in zip(harness, raw)),
        "weight_push_s": _summary(push),
        "trainer_step_s": _summary(step),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    rows = [
        ("raw vLLM tokens/s (in the engine actor)", f"{results['raw_vllm_tokens_per_s']['median']:.0f}"),
        ("harness rollout tokens/s (Ray + verify)", f"{results['harness_rollout_tokens_per_s']['median']:.0f}"),
        ("harness / raw", f"{results['harness_over_raw']:.2f}"),
        ("weight push (s)", f"{results['weight_push_s']['median']:.3f}"),
        ("trainer step (s)", f"{results['trainer_step_s']['median']:.3f}"),
    ]
    md = ["| measure (median of %d) | value |" % repeats, "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    table = Table("measure", "value", title=f"gymrl bench: {len(prompts)} prompts x {n} samples, median of {repeats}")
    for k, v in rows:
        table.add_row(k, v)
    return table
