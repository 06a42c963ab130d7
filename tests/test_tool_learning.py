"""Multi-turn tool use that learns: configs/tool_lookup.yaml, where the answer is a number seeded per episode on the
server, so it cannot be known without the kv_get call (an answer without it scores 0)."""

import json
import subprocess
import sys

import pytest

from gymrl.traces.store import TRACE_FILE, TraceReader

pytestmark = pytest.mark.slow

# Measured with configs/tool_lookup.yaml (seed 0, on CPU): held-out greedy reward 0.05 at the start, 0.95 after 5
# steps, 0.975 after 10-30, 0.925 after 40 (40 held-out tasks; 5 min 15 s with the model build). Over run seeds 0, 1
# and 2 (10 steps, the same model): 0.05 -> 0.975 in each, gain 0.925, spread 0 (2026-12-06). On an AMD EPYC machine
# that model's 1200-step warm-up stopped at loss 0.16 and no run learned; with 2400 steps (the config now): 0.0 ->
# 0.825 after 10 steps. On an AMX Xeon (2026-12-07) 2400 steps stopped at loss 0.065 and the run went 0.05 -> 0.10;
# with 4000 (the config now): 0.0 -> 0.475. 0.3 is the bar.
MIN_GAIN = 0.3


def test_a_tool_use_run_raises_held_out_reward_and_successes_call_the_tool(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gymrl.cli", "train", "configs/tool_lookup.yaml", "--set",
                           "train.steps=10", "--set", f"run_dir={run_dir}"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initial_eval_reward"] <= 0.2 and summary["eval_reward_gain"] >= MIN_GAIN, summary
    rows = TraceReader(run_dir / TRACE_FILE).page(limit=100000)
    won = [r for r in rows if r["reward"] == 1.0 and r["split"] == "eval"]
    assert won and all(r["num_tool_calls"] >= 1 for r in won), won[:3]
