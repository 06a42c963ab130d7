"""Stop a sync run with SIGTERM after step 2, resume it from its checkpoint, and get the uninterrupted run back
step for step: the same rewards, the same weights, and no trace or metrics row twice."""

import os
import signal
import sqlite3
from collections import Counter

import pytest
import torch

from gymrl.models.checkpoint import load_policy
from gymrl.traces.store import TRACE_FILE
from gymrl.train.checkpoint import latest_checkpoint
from gymrl.train.loop import train
from gymrl.train.metrics import read_metrics

STEPS, CUT = 4, 2


@pytest.fixture(scope="module")
def runs(reset_session, tmp_path_factory):
    session = reset_session()
    cfg = session.cfg
    base = tmp_path_factory.mktemp("resume")

    def configure(name: str) -> None:
        session.cfg = cfg.model_copy(update={
            "run_dir": base / name,
            "train": cfg.train.model_copy(update={"steps": STEPS, "checkpoint_every": 0, "seeded_sampling": True}),
            "eval": cfg.eval.model_copy(update={"every": STEPS})})

    def terminate_at_cut(step, record, eval_reward):
        if step == CUT:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler ending the job would

    try:
        configure("whole")
        whole = train(session)
        reset_session()
        configure("cut")
        handler = signal.getsignal(signal.SIGTERM)  # Ray's, in this process
        cut = train(session, terminate_at_cut)
        assert signal.getsignal(signal.SIGTERM) is handler  # the run's own handler is gone with it
        checkpoint = latest_checkpoint(base / "cut")
        reset_session()  # the trainer and engines back on the initial weights, as in a new process
        resumed = train(session, resume=checkpoint)
        yield base, whole, cut, resumed, checkpoint
    finally:
        session.cfg = cfg


def test_sigterm_stops_after_the_step_with_a_checkpoint(runs):
    base, _, cut, _, checkpoint = runs
    assert cut["interrupted"] and cut["steps"] == CUT
    assert checkpoint == base / "cut" / "checkpoints" / f"step_{CUT:06d}"


def test_resumed_run_equals_the_uninterrupted_one(runs):
    base, whole, _, resumed, checkpoint = runs
    assert resumed["resumed_from"] == str(checkpoint) and not resumed["interrupted"]
    rows = {name: read_metrics(base / name / "metrics.jsonl") for name in ("whole", "cut")}
    assert [r["step"] for r in rows["cut"]] == list(range(STEPS + 1))  # rows after the checkpoint were cut, not doubled
    for key in ("reward_mean", "reward_std", "completion_tokens", "policy_version"):
        assert [r.get(key) for r in rows["cut"]] == [r.get(key) for r in rows["whole"]], key
    assert resumed["final_eval_reward"] == whole["final_eval_reward"]
    assert resumed["initial_eval_reward"] == whole["initial_eval_reward"]
    after, _ = load_policy(base / "cut" / "checkpoint")
    expected, _ = load_policy(base / "whole" / "checkpoint")
    for (name, a), b in zip(after.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_resumed_traces_hold_each_step_once(runs):
    base, *_ = runs
    with sqlite3.connect(base / "cut" / TRACE_FILE) as db:
        per_step = Counter(dict(db.execute("SELECT step, count(*) FROM rollouts WHERE split = 'train' GROUP BY step")))
        with sqlite3.connect(base / "whole" / TRACE_FILE) as reference:
            expected = Counter(dict(reference.execute(
                "SELECT step, count(*) FROM rollouts WHERE split = 'train' GROUP BY step")))
            rewards = db.execute("SELECT step, task_id, sample, reward FROM rollouts WHERE split = 'train' "
                                 "ORDER BY step, task_id, sample").fetchall()
            assert rewards == reference.execute("SELECT step, task_id, sample, reward FROM rollouts WHERE split = "
                                                "'train' ORDER BY step, task_id, sample").fetchall()
    assert per_step == expected == Counter({s: 16 * 8 for s in range(1, STEPS + 1)})
