"""`gymrl train` killed with SIGKILL (no handler runs: an OOM kill, a lost node), then `gymrl train --resume`:
its environment server does not outlive it, the resumed run finishes every step once, and every rollout the
killed run wrote is still in the traces (those after its last checkpoint set aside as ``interrupted-train``)."""

import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from gymrl.traces.store import TRACE_FILE
from gymrl.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # trains in a child process, kills it and resumes

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def gymrl(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gymrl.cli", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def servers_of(run: Path) -> list[psutil.Process]:
    ports = [p.stem.rsplit("-", 1)[1] for p in (run / "env_logs").glob("gymrl-env-*.log")]
    return [p for p in psutil.process_iter(["cmdline"]) if "gymrl.envs.serve" in (p.info["cmdline"] or [])
            and any(port in (p.info["cmdline"] or []) for port in ports)]


def rows(run: Path) -> dict[int, tuple]:
    with sqlite3.connect(run / TRACE_FILE) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, step, split, task_id, sample, reward FROM rollouts")}


def test_a_trainer_killed_with_sigkill_resumes_and_loses_no_rollout(tmp_path):
    run = tmp_path / "run"
    first = gymrl("configs/demo.yaml", "--set", f"run_dir={run}", "--set", f"train.steps={STEPS}",
                  "--set", "train.checkpoint_every=1", "--set", f"eval.every={STEPS}")
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "step_000002").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint of step 2 within 600 s"
        time.sleep(0.2)
    time.sleep(1.0)  # step 3's rollouts are under way
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while servers_of(run) and time.monotonic() < deadline:  # each server notices its parent is gone
        time.sleep(0.5)
    assert not servers_of(run)
    before = rows(run)
    assert before

    second = gymrl("--resume", str(run))
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    after = rows(run)
    for rid, (step, split, task_id, sample, reward) in before.items():  # nothing the killed run wrote is lost
        assert after[rid][0] == step and after[rid][2:] == (task_id, sample, reward)
        assert after[rid][1] in (split, f"interrupted-{split}")
    train = Counter(step for step, split, *_ in after.values() if split == "train")
    assert train == Counter({s: 128 for s in range(1, STEPS + 1)})  # each step once in the train split
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(STEPS + 1))
    set_aside = sum(split.startswith("interrupted-") for _, split, *_ in after.values())
    print(f"rows before the kill: {len(before)}; set aside on resume: {set_aside}")
