"""An engine actor killed mid-generation: the pool starts a new one with the newest weights, sends it the
requests the dead one held, and the run finishes with every step's rollouts in the traces."""

import os
import signal
from collections import Counter

import ray

from gymrl.train.loop import train
from gymrl.train.metrics import read_metrics


def test_a_killed_engine_is_replaced_with_the_newest_weights_and_the_run_goes_on(reset_session, tmp_path, run_config, trained_per_step):
    session = reset_session()
    pool = session.pool
    before = pool.restarts
    old_pid = ray.get(pool.actors[0].ready.remote())["pid"]
    in_flight = []

    def kill_after_step_1(step, record, eval_reward):
        if step == 1:  # the pushed weights are in; step 2's groups are being sampled on this engine
            in_flight.append(pool._load[0])
            os.kill(old_pid, signal.SIGKILL)

    with run_config(session, tmp_path, 3):
        summary = train(session, kill_after_step_1)
    assert summary["steps"] == 3 and not summary["interrupted"]
    assert pool.restarts == before + 1 and ray.get(pool.actors[0].ready.remote())["pid"] != old_pid
    assert pool.stats()[0].policy_version == 3  # started with the newest push, then took the later ones
    assert trained_per_step(tmp_path) == Counter({1: 128, 2: 128, 3: 128})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["engine_restarts"] == before + 1 and not (tmp_path / "failures.jsonl").exists()
    assert rows[-1]["logprob_gap"] < 0.05, rows[-1]["logprob_gap"]  # the new engine samples with the trainer's weights
    print(f"sequences in flight on the engine when it was killed: {in_flight[0]}")
