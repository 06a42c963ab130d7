"""``gymrl bench --suite traces``: the trace store on 100,000 synthetic rollouts: rollouts/s written, one
transaction each as training writes them, then a filtered page query, ``count()`` and one rollout read in full;
``traces.json`` and ``traces.md``."""

import platform
import time
from pathlib import Path

from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import measure_table, summarise, write_json


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
            return summarise(times)

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
    write_json(out, "traces", results)
    rows = [
        ("rollouts written/s (one transaction each, ~100 model tokens, 2 turns)", f"{results['write_rollouts_per_s']:,.0f}"),
        (f"store size ({rollouts:,} rollouts, MB)", f"{size_mb:,.0f}"),
        (f"filtered page: 50 of {matching:,} matching at offset {offset:,}, by -reward (ms)", f"{results['page_ms']['median']:.1f}"),
        ("count() of the same filter (ms)", f"{results['count_filtered_ms']['median']:.1f}"),
        ("count() of all rollouts (ms)", f"{results['count_all_ms']['median']:.2f}"),
        ("one rollout in full, with token arrays (ms)", f"{results['rollout_in_full_ms']['median']:.2f}"),
    ]
    return measure_table(out / "traces.md", rows,
                         f"gymrl bench traces: {rollouts:,} synthetic rollouts, median of {repeats}")


def run_suite(a: BenchArgs) -> Table:
    return run_trace_bench(a.out)
