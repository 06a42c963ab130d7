"""``gymrl bench --suite vs-trl``: gymrl (sync and async GRPO) against TRL's ``GRPOTrainer`` on one machine.
With engine.sleep_while_training set (a CUDA engine), sync also runs a second time with the engines asleep through
each trainer step.

Same model folder, task data, reward function, batch (prompts x generations), completion lengths, sampling,
learning rate, loss and seed, N steps each from the same initial weights. TRL runs in child processes
(``gymrl.bench.trl_baseline``), generating with transformers and, where it runs, with its vLLM colocate mode. Every
run's policy is scored by gymrl's own greedy held-out evaluation (``gymrl.train.loop.evaluate``), TRL's after
its weights are pushed into gymrl's engine. Step 1 of every run is a warm-up and is left out of the timings.

Each side has the accelerator to itself: gymrl's engines are stopped and its policy put on the CPU before the first
TRL child starts (at 1.85B parameters TRL ran out of GPU memory beside them), and started again, once, to score
TRL's policies.
"""

import gc
import statistics
import time
from pathlib import Path

from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import summarise, versions, write_json, write_results
from gymrl.bench.trl_baseline import GENERATIONS, TrlRunError, check_supported, run_trl
from gymrl.bench.workload import train_from
from gymrl.config import load_config

GYMRL_MODES = {"gymrl sync": (0, False), "gymrl async": (1, False)}  # name: max_staleness, engines asleep in a step
SLEEP_RUN = "gymrl sync, engines asleep"  # sync with engine.sleep_while_training: run when the engines can sleep (cuda)


def _figures(step_seconds: list[float], tokens: list[float], held_out: float) -> dict:
    step_seconds, tokens = step_seconds[1:] or step_seconds, tokens[1:] or tokens  # step 1 warms up
    step = summarise(step_seconds)
    return {"step_s": step, "steps_per_s": 1 / step["median"],
            "tokens_per_s": summarise([t / s for t, s in zip(tokens, step_seconds)]), "held_out_reward": held_out}


def _gap(per_step: list[float]) -> dict | None:
    """TRL's vLLM-vs-trainer logprob gap at step 1 (the weights the engine started with) and the largest after (each
    step's new weights synced into its engine); None for a run that has no engine (transformers generation)."""
    return {"step1": per_step[0], "later_max": max(per_step[1:], default=per_step[0])} if per_step else None


def _phases(rows: list[dict]) -> dict:
    """Where a gymrl step's wall time goes (medians over the measured steps): vLLM decoding (the engine busy),
    the trainer's step, the weight push, the engines' sleep and wake-up (engine.sleep_while_training), and the fixed
    cost, the rest, in two parts: inside the wait for the step's rollouts (prefill, scheduling, Ray, /verify round
    trips) and outside it (traces, metrics, engine stats). The rest is taken step by step, then its median: medians
    of the parts need not add up to the median step."""
    rows = rows[1:] or rows
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    decode = lambda r: r["completion_tokens"] / r["engine_tokens_per_s/0"] if r["engine_tokens_per_s/0"] else 0.0  # noqa: E731
    sleep = lambda r: r.get("engine_sleep_seconds", 0.0)  # noqa: E731
    busy = lambda r: r["train_seconds"] + r["push_seconds"] + sleep(r)  # noqa: E731
    step = med(lambda r: r["step_seconds"])
    fixed = med(lambda r: max(0.0, r["step_seconds"] - decode(r) - busy(r)))
    return {"step_s": step, "engine_decode_s": med(decode), "train_s": med(lambda r: r["train_seconds"]),
            "push_s": med(lambda r: r["push_seconds"]), "sleep_s": med(sleep),
            "fixed_s": fixed, "fixed_fraction": fixed / step, "rollout_wait_s": med(lambda r: r["wait_seconds"]),
            "rollout_overhead_s": med(lambda r: max(0.0, r["wait_seconds"] - decode(r))),
            "verify_s": med(lambda r: r["verify_seconds"]),
            "outside_rollouts_s": med(lambda r: max(0.0, r["step_seconds"] - r["wait_seconds"] - busy(r)))}


def release_accelerator(session) -> dict:
    """Stop the session's engines and put its policy (gradients dropped) on the CPU, so that a peer process gets the
    accelerator whole; what the driver and the device still held when done (None on CPU)."""
    import torch

    session.pool.stop()
    session.policy.zero_grad(set_to_none=True)
    session.policy.to("cpu")
    gc.collect()
    if not torch.cuda.is_available():
        return {"driver_allocated_GB": None, "driver_reserved_GB": None, "device_free_GB": None, "device_total_GB": None}
    torch.cuda.empty_cache()
    free = 0
    for _ in range(30):  # the engines' processes exit within seconds of their actors' kill
        time.sleep(1)
        before, (free, total) = free, torch.cuda.mem_get_info()
        if free == before:
            break
    return {"driver_allocated_GB": torch.cuda.memory_allocated() / 1e9,
            "driver_reserved_GB": torch.cuda.memory_reserved() / 1e9,
            "device_free_GB": free / 1e9, "device_total_GB": total / 1e9}


def compare_with_trl(session, out: Path, steps: int, generations: tuple[str, ...] = GENERATIONS,
                     evaluate_peer: bool = True) -> dict:
    """One model size: gymrl sync, gymrl async, and TRL with each of ``generations``, TRL with the accelerator to
    itself (:func:`release_accelerator`). ``evaluate_peer``: restart the engines once after the TRL runs and score
    their policies (the engines end on the initial weights); without it TRL's held-out reward is None and the
    engines stay stopped (a GPU engine start costs minutes). A TRL run that fails leaves them stopped too."""
    import torch
    from transformers import AutoModelForCausalLM

    from gymrl.rollout.weight_sync import pack_policy
    from gymrl.train.loop import held_out_tasks
    from gymrl.train.trainer import evaluate

    cfg = session.cfg
    check_supported(cfg)
    # On the CPU: a copy on the accelerator would take the room the runs need (3.7 GB at 1.85B in bf16).
    initial = {k: v.detach().to("cpu", copy=True) for k, v in session.policy.state_dict().items()}
    threads = torch.get_num_threads()
    runs: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    peer_start, engine_restart_s = None, None
    try:
        modes = GYMRL_MODES | ({SLEEP_RUN: (0, True)} if cfg.engine.sleep_while_training else {})
        for mode, (staleness, sleep) in modes.items():
            # Every runner trains with every torch thread, as `gymrl train` does: async with one thread (the async
            # suite's setting, which leaves a core to the engine) measured 9.6 s a step at 17.2M against 6.4 s.
            summary, rows = train_from(session, initial, cfg, out / mode.replace(" ", "_").replace(",", ""), steps,
                                       staleness, sleep)
            runs[mode] = _figures([r["step_seconds"] for r in rows], [r["completion_tokens"] for r in rows],
                                  summary["final_eval_reward"]) | {"torch_threads": torch.get_num_threads(),
                                                                   "phases": _phases(rows)}
            initial_reward = summary["initial_eval_reward"]
        if generations:
            peer_start = release_accelerator(session)
        trl_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
        finished = {}
        for generation in generations:
            name = f"TRL ({generation})"
            try:
                finished[name] = run_trl(trl_cfg, session.model_path, generation, out / f"trl_{generation}", threads)
            except TrlRunError as err:
                if generation == "transformers":
                    raise
                skipped[name] = str(err)
        if evaluate_peer and finished:
            engine_restart_s = session.pool.start()
        for name, run in finished.items():
            held_out = None
            if evaluate_peer:
                policy = AutoModelForCausalLM.from_pretrained(run.policy, dtype=torch.float32)
                session.pool.push_weights(pack_policy(policy), 0)
                held_out = evaluate(session.runner, held_out_tasks(session), cfg.sampling.max_tokens, 0)[0]["eval_reward"]
            measured = list(zip(run.step_seconds, run.generate_seconds))[1:]  # step 1 warms up
            generate = statistics.median(g for _, g in measured)
            runs[name] = _figures(run.step_seconds, run.completion_tokens, held_out) | {
                "torch_threads": run.torch_threads, "engine_logprob_gap": _gap(run.engine_logprob_gap_max),
                "phases": {"generate_s": generate, "rest_s": statistics.median(s - g for s, g in measured)}}
    finally:
        torch.set_num_threads(threads)
        session.policy.load_state_dict(initial)
        if session.pool.running:
            session.pool.push_weights(pack_policy(session.policy), 0)
    ratios = {f"{g} / {t}": {"steps_per_s": runs[g]["steps_per_s"] / runs[t]["steps_per_s"],
                             "tokens_per_s": runs[g]["tokens_per_s"]["median"] / runs[t]["tokens_per_s"]["median"],
                             "held_out_reward_difference": None if runs[t]["held_out_reward"] is None
                             else runs[g]["held_out_reward"] - runs[t]["held_out_reward"]}
              for g in runs if g.startswith("gymrl") for t in runs if t.startswith("TRL")}
    return {"model": str(session.model_path), "parameters": sum(p.numel() for p in session.policy.parameters()),
            "steps": steps, "measured_steps": max(1, steps - 1), "initial_held_out_reward": initial_reward,
            "held_out_tasks": len(held_out_tasks(session)),
            "config": {"prompts_per_step": cfg.train.prompts_per_step, "group_size": cfg.train.group_size,
                       "max_tokens": cfg.sampling.max_tokens, "min_tokens": cfg.sampling.min_tokens,
                       "temperature": cfg.sampling.temperature, "learning_rate": cfg.train.learning_rate,
                       "loss_type": cfg.train.loss_type, "seed": cfg.seed, "torch_threads": threads},
            "runs": runs, "skipped": skipped, "ratios": ratios,
            # the accelerator when the first TRL child started, and the engines' start for TRL's evaluation
            "peer_start": peer_start, "engine_restart_s": engine_restart_s}


def _size(parameters: int) -> str:
    return f"{parameters / 1e6:.1f}M params"


def reward_text(value: float | None, spec: str = ".3f") -> str:
    """A held-out reward (or difference) for a table; "-" where TRL's policies were not scored (evaluate_peer)."""
    return "-" if value is None else format(value, spec)


def write_vs_trl(sizes: list[dict], out: Path) -> Table:
    """vs-trl.json, vs-trl.md and vs-trl.png (median seconds per step of every runner, per model size)."""
    rows, notes = [], []
    for size in sizes:
        label, c = _size(size["parameters"]), size["config"]
        for name, r in size["runs"].items():
            s = r["step_s"]
            rows.append((label, name, f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]",
                         f"{r['tokens_per_s']['median']:.0f}", reward_text(r["held_out_reward"])))
        for name, ratio in size["ratios"].items():
            rows.append((label, name, f"steps/s x{ratio['steps_per_s']:.2f}", f"x{ratio['tokens_per_s']:.2f}",
                         reward_text(ratio["held_out_reward_difference"], "+.3f")))
        p = size["runs"]["gymrl sync"]["phases"]
        notes.append(f"- {label}: {c['prompts_per_step']} prompts x {c['group_size']} generations, "
                     f"{c['min_tokens']}-{c['max_tokens']} completion tokens, lr {c['learning_rate']:g}, seed {c['seed']}, "
                     f"{size['steps']} steps (step 1 left out); held-out reward at the start "
                     f"{size['initial_held_out_reward']:.3f} ({size['held_out_tasks']} tasks).")
        notes.append(f"- {label}: a gymrl sync step takes {p['step_s']:.2f} s: vLLM decoding {p['engine_decode_s']:.2f} s, "
                     f"trainer {p['train_s']:.2f} s, weight push {p['push_s']:.2f} s, fixed costs {p['fixed_s']:.2f} s "
                     f"({100 * p['fixed_fraction']:.0f}%: {p['rollout_overhead_s']:.2f} s waiting for rollouts beyond "
                     f"decoding - prefill, Ray, /verify round trips, scheduling - and {p['outside_rollouts_s']:.2f} s "
                     "outside - traces, metrics)"
                     + (" - at this size fixed costs dominate." if p["fixed_fraction"] > 0.5 else "."))
        for name, r in size["runs"].items():
            if name.startswith("TRL"):
                target = r["step_s"]["median"] / 2.5
                notes.append(f"- {label}: a {name} step takes {r['step_s']['median']:.2f} s: generation "
                             f"{r['phases']['generate_s']:.2f} s, the rest (reward, forward and backward, optimizer) "
                             f"{r['phases']['rest_s']:.2f} s. 2.5x its steps/s is {target:.2f} s a step; gymrl's trainer "
                             f"step alone (the same forward and backward) took {p['train_s']:.2f} s in sync"
                             + (", more than that." if p["train_s"] > target else "."))
                if (gap := r.get("engine_logprob_gap")) is not None:
                    notes.append(f"- {label}: {name}: the largest gap between its vLLM and its trainer's logprob of a "
                                 f"sampled token was {gap['step1']:.3f} nats at step 1 (same weights) and at most "
                                 f"{gap['later_max']:.3f} after (its engine samples with the weights it trains)"
                                 + (": with min_tokens TRL's trainer does not ban the stop tokens that vLLM bans, so the two"
                                    " differ wherever the model would stop (gymrl's trainer bans them, as its engine does)."
                                    if c["min_tokens"] and gap["step1"] > 1 else "."))
        if (asleep := size["runs"].get(SLEEP_RUN)) is not None:
            q = asleep["phases"]
            notes.append(f"- {label}: with the engines asleep through each trainer step (engine.sleep_while_training) "
                         f"a sync step takes {q['step_s']:.2f} s, of which {q['sleep_s']:.2f} s put them to sleep and "
                         f"woke them, and the trainer's step {q['train_s']:.2f} s (awake: {p['train_s']:.2f} s).")
        notes += [f"- {label}: {name} did not run: {why}" for name, why in size["skipped"].items()]
        if (peer := size.get("peer_start")) and peer["device_free_GB"] is not None:
            notes.append(f"- {label}: TRL ran with gymrl's engines stopped: when it started the bench process held "
                         f"{peer['driver_allocated_GB']:.2f} GB of GPU memory ({peer['driver_reserved_GB']:.2f} GB "
                         f"reserved), {peer['device_free_GB']:.1f} of {peer['device_total_GB']:.1f} GB were free.")
    results = {"versions": versions("trl", "vllm", "torch", "transformers", "ray"), "sizes": sizes}
    _plot(sizes, out / "vs-trl.png")
    return write_results(out, "vs-trl", results, rows,
                         ["model", "runner (or ratio)", "s/step median [min-max]", "generated tokens/s",
                          "held-out reward (or gymrl - TRL)"], "gymrl bench --suite vs-trl", notes)


def _plot(sizes: list[dict], path: Path) -> None:
    from gymrl.train.metrics import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        names = list(size["runs"])
        med = [size["runs"][n]["step_s"]["median"] for n in names]
        err = [[m - size["runs"][n]["step_s"]["min"] for n, m in zip(names, med)],
               [size["runs"][n]["step_s"]["max"] - m for n, m in zip(names, med)]]
        ax.bar(names, med, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(_size(size["parameters"]))
        ax.set_ylabel("seconds per step (median, min-max)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_vs_trl_bench(configs: list, out: Path, steps: int) -> Table:
    """Every config in turn (its own session: environment server, Ray, one engine), then the combined files."""
    import ray

    from gymrl.session import start_session

    for cfg in configs:
        check_supported(cfg)  # every config checked before the first session starts
    sizes = []
    for i, cfg in enumerate(configs):
        session = start_session(cfg)
        try:
            sizes.append(compare_with_trl(session, out / "vs-trl" / f"size{i}", steps))
            write_json(out / "vs-trl", f"size{i}", sizes[-1])  # kept if a later size fails
        finally:
            session.close()
        ray.shutdown()  # the next config's engine gets a fresh Ray (its own num_cpus)
    return write_vs_trl(sizes, out)


def configs_of(a: BenchArgs) -> list:
    """CONFIG's run config, then ``--large-config``'s unless it is empty."""
    return [a.cfg] + ([load_config(a.large_config)] if a.large_config and str(a.large_config) else [])


def run_suite(a: BenchArgs) -> Table:
    return run_vs_trl_bench(configs_of(a), a.out, a.steps)
