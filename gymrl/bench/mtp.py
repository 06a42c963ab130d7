"""``gymrl bench --suite mtp``: whether speculative acceptance survives RL: the MTP drafts' accepted length and
acceptance over a GRPO run with the MTP layer frozen, then trained, from the same weights; ``mtp.json``,
``mtp.md`` and ``mtp_acceptance.png``."""

import os
import platform
import statistics
from pathlib import Path

from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import measure_table, write_json


def run_mtp_bench(cfg, out: Path, steps: int = 30) -> Table:
    """Does speculative acceptance survive RL? Two GRPO runs of ``steps`` steps from the same weights, seed and
    config on one engine drafting with the model's MTP layer: first with the layer frozen (``mtp_loss_weight``
    0), then trained alongside the policy and pushed with it (the config's weight, or 1.0). Reports the mean
    accepted length and acceptance on the sampled training rollouts (mean of the first and of the last three
    steps) and on greedy held-out decoding (before and after), decode tokens/s, and held-out reward; plots
    both runs' curves to ``mtp_acceptance.png``."""
    import copy

    from gymrl.models.mtp import load_mtp_layer
    from gymrl.rollout.vllm_checks import is_mtp
    from gymrl.rollout.weight_sync import pack_policy
    from gymrl.session import start_session
    from gymrl.train.loop import train
    from gymrl.train.metrics import ACCEPTED_LENGTH, _pyplot, _series, finish_step_plot, read_metrics

    spec = cfg.engine.speculative_config
    if spec is None or not is_mtp(spec.method):
        raise ValueError("--suite mtp needs engine.speculative_config with method mtp (e.g. configs/mtp_rl_cpu.yaml)")
    weight = cfg.train.mtp_loss_weight or 1.0
    session = start_session(cfg)
    initial = copy.deepcopy(session.policy.state_dict())
    built_layer = load_mtp_layer(session.policy, session.model_path)
    runs: dict[str, dict] = {}
    try:
        for mode, mtp_weight in (("frozen", 0.0), ("trained", weight)):
            session.policy.load_state_dict(initial)
            session.pool.push_weights(pack_policy(session.policy, built_layer), 0)  # main model and drafter as built
            session.cfg = cfg.model_copy(update={
                "run_dir": out / "mtp_bench" / mode,
                "train": cfg.train.model_copy(update={"steps": steps, "mtp_loss_weight": mtp_weight,
                                                      "tensorboard": False, "checkpoint_every": 0})})
            summary = train(session)
            logged = read_metrics(session.cfg.run_dir / "metrics.jsonl")
            rows = [r for r in logged if "reward_mean" in r]
            evals = [r for r in logged if "eval_reward" in r]

            def mean(key, part):
                values = [r[key] for r in part if key in r]
                return statistics.fmean(values) if values else None

            runs[mode] = {
                "mtp_loss_weight": mtp_weight,
                "train_accepted_length_start": mean("spec_mean_accepted_length", rows[:3]),
                "train_accepted_length_end": mean("spec_mean_accepted_length", rows[-3:]),
                "train_acceptance_start": mean("spec_acceptance", rows[:3]),
                "train_acceptance_end": mean("spec_acceptance", rows[-3:]),
                "eval_accepted_length_start": evals[0].get("eval_spec_mean_accepted_length"),
                "eval_accepted_length_end": evals[-1].get("eval_spec_mean_accepted_length"),
                "decode_tokens_per_s_start": mean("tokens_per_second", rows[:3]),
                "decode_tokens_per_s_end": mean("tokens_per_second", rows[-3:]),
                "mtp_agreement_end": mean("mtp_agreement", rows[-3:]),
                "initial_eval_reward": summary["initial_eval_reward"],
                "final_eval_reward": summary["final_eval_reward"],
                "run_dir": str(session.cfg.run_dir),
            }
            for key in ("train", "eval"):
                start, end = runs[mode][f"{key}_accepted_length_start"], runs[mode][f"{key}_accepted_length_end"]
                runs[mode][f"{key}_accepted_length_change"] = (end - start) / start if start and end else None
    finally:
        session.close()
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in runs:
        rows = read_metrics(Path(runs[mode]["run_dir"]) / "metrics.jsonl")
        ax.plot(*_series(rows, "spec_mean_accepted_length"), label=f"MTP {mode}: train rollouts", alpha=0.8)
        ax.plot(*_series(rows, "eval_spec_mean_accepted_length"), "o--", label=f"MTP {mode}: held-out greedy")
    finish_step_plot(plt, fig, ax, out / "mtp_acceptance.png", ACCEPTED_LENGTH, 1)
    results = {"steps": steps, "runs": runs, "speculative_config": spec.model_dump(),
               "config": {"prompts_per_step": cfg.train.prompts_per_step, "group_size": cfg.train.group_size,
                          "temperature": cfg.sampling.temperature, "mtp_learning_rate": cfg.train.mtp_learning_rate},
               "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))}}
    write_json(out, "mtp", results)

    def fmt(value, spec=".2f"):
        return "n/a" if value is None else format(value, spec)

    table = []
    for mode, r in runs.items():
        table += [
            (f"{mode}: accepted length, train rollouts, steps 1-3 -> last 3",
             f"{fmt(r['train_accepted_length_start'])} -> {fmt(r['train_accepted_length_end'])} "
             f"({fmt(r['train_accepted_length_change'], '+.1%')})"),
            (f"{mode}: accepted length, held-out greedy, before -> after",
             f"{fmt(r['eval_accepted_length_start'])} -> {fmt(r['eval_accepted_length_end'])} "
             f"({fmt(r['eval_accepted_length_change'], '+.1%')})"),
            (f"{mode}: acceptance, train rollouts, start -> end",
             f"{fmt(r['train_acceptance_start'], '.3f')} -> {fmt(r['train_acceptance_end'], '.3f')}"),
            (f"{mode}: decode tokens/s, start -> end",
             f"{fmt(r['decode_tokens_per_s_start'], '.0f')} -> {fmt(r['decode_tokens_per_s_end'], '.0f')}"),
            (f"{mode}: held-out reward, before -> after",
             f"{r['initial_eval_reward']:.3f} -> {r['final_eval_reward']:.3f}"),
        ]
    return measure_table(out / "mtp.md", table,
                         f"gymrl bench --suite mtp: {steps} GRPO steps, MTP layer frozen vs trained")


def run_suite(a: BenchArgs) -> Table:
    return run_mtp_bench(a.cfg, a.out, a.cfg.train.steps)
