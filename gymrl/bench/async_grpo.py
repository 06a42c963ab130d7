"""``gymrl bench --suite async``: async against sync GRPO from the same weights: wall time per step and
samples/s of each, the ideal speed-up of overlapping generation and training against the achieved one, and
the held-out reward after each run; ``async.json`` and ``async.md``."""

import os
import platform
import statistics
from pathlib import Path

from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import measure_table, write_json
from gymrl.bench.workload import train_from


def run_async_bench(cfg, out: Path, steps: int = 20, max_staleness: int = 1) -> Table:
    """Async against sync GRPO on one config, in one process on one engine: the same number of steps from
    the same initial weights, first with ``max_staleness=0`` (sync) then ``max_staleness`` (async). The
    trainer gets one torch thread and the engine its one Ray CPU, so on two cores generation and training
    can overlap. From the sync run's phases, the ideal speed-up of overlapping them is (gen + train) /
    max(gen, train); the achieved one is the sync step time over the async one. Held-out greedy reward is
    measured at the start and after the last step of each run (the same samples consumed by both)."""
    import copy

    import torch

    from gymrl.session import start_session

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    session = start_session(cfg)
    initial = copy.deepcopy(session.policy.state_dict())
    runs: dict[str, dict] = {}
    try:
        for mode, staleness in (("sync", 0), ("async", max_staleness)):
            summary, rows = train_from(session, initial, cfg, out / "async_bench" / mode, steps, staleness)
            rows = rows[1:]  # step 1 warms up
            samples = steps * cfg.train.prompts_per_step * cfg.train.group_size
            runs[mode] = {
                "max_staleness": staleness,
                "step_s": statistics.fmean(r["step_seconds"] for r in rows),
                "samples_per_s": statistics.fmean(r["samples_per_second"] for r in rows),
                "generate_s": statistics.fmean(r["generate_seconds"] for r in rows),
                "train_s": statistics.fmean(r["train_seconds"] + r["push_seconds"] for r in rows),
                "wait_s": statistics.fmean(r["wait_seconds"] for r in rows),
                "dropped_groups": sum(r["dropped_groups"] for r in rows),
                "staleness_mean": statistics.fmean(r["staleness_mean"] for r in rows),
                "initial_eval_reward": summary["initial_eval_reward"],
                "final_eval_reward": summary["final_eval_reward"],
                "samples_consumed": samples,
                "eval_gain_per_1k_samples": 1000 * summary["eval_reward_gain"] / samples,
            }
    finally:
        session.close()
        torch.set_num_threads(threads)
    sync, fast = runs["sync"], runs["async"]
    ideal = (sync["generate_s"] + sync["train_s"]) / max(sync["generate_s"], sync["train_s"])
    achieved = sync["step_s"] / fast["step_s"]
    results = {"steps": steps, "runs": runs, "ideal_speedup": ideal, "achieved_speedup": achieved,
               "achieved_over_ideal": achieved / ideal,
               "config": {"prompts_per_step": cfg.train.prompts_per_step, "group_size": cfg.train.group_size,
                          "trainer_torch_threads": 1, "engine_cpus": cfg.engine.cpus_per_engine},
               "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))}}
    write_json(out, "async", results)
    rows = [
        ("wall per step, sync / async (s)", f"{sync['step_s']:.2f} / {fast['step_s']:.2f}"),
        ("samples/s, sync / async", f"{sync['samples_per_s']:.1f} / {fast['samples_per_s']:.1f}"),
        ("sync phases: generate / train+push (s)", f"{sync['generate_s']:.2f} / {sync['train_s']:.2f}"),
        ("ideal speed-up (gen+train)/max(gen,train)", f"{ideal:.2f}"),
        ("achieved speed-up (sync step / async step)", f"{achieved:.2f}"),
        ("achieved / ideal", f"{achieved / ideal:.2f}"),
        ("async: mean staleness, groups dropped", f"{fast['staleness_mean']:.2f}, {fast['dropped_groups']}"),
        ("held-out reward after the run, sync / async",
         f"{sync['final_eval_reward']:.3f} / {fast['final_eval_reward']:.3f} (from {sync['initial_eval_reward']:.3f})"),
        ("held-out gain per 1k samples, sync / async",
         f"{sync['eval_gain_per_1k_samples']:.3f} / {fast['eval_gain_per_1k_samples']:.3f}"),
    ]
    return measure_table(out / "async.md", rows,
                         f"gymrl bench --suite async: {steps} steps each, max_staleness 0 vs {max_staleness}")


def run_suite(a: BenchArgs) -> Table:
    return run_async_bench(a.cfg, a.out)
