"""``gymrl bench --suite envs``: checks/s of each reward function, sandboxed code runs/s on all cores, and the
/verify round trip through each real environment server on loopback (p50/p99); ``envs.json`` and ``envs.md``."""

import platform
import time
from functools import partial
from pathlib import Path

from rich.table import Table

from gymrl.bench.args import BenchArgs
from gymrl.bench.report import measure_table, write_json


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
            check = partial(play_episode, env, task, turns, parser)
            name = f"{name} (episode: seed + {len(turns) - 1} tool calls + verify)"
        else:
            check = partial(env.verify, task, gold)
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
    write_json(out, "envs", results)
    rows = [(f"{k} checks/s", f"{v:,.0f}") for k, v in checks.items()]
    rows.append((f"sandboxed code runs/s ({workers} workers)", f"{sandbox_rate:.1f}"))
    rows += [(f"/verify {k} p50 / p99 (ms)", f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f}") for k, v in verify.items()]
    return measure_table(out / "envs.md", rows, "gymrl bench envs")


def run_suite(a: BenchArgs) -> Table:
    return run_env_bench(a.out)
