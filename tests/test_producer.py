"""The rollout producer's admission rule, drops, cursor and errors, with a stand-in runner that records what it
was asked to make (the real runner and engines are exercised by tests/test_learning.py's sync and async runs)."""

import threading
import time

import pytest

from gymrl.config import SamplingConfig
from gymrl.envs.base import Task
from gymrl.rollout.runner import Rollout, RolloutBatch
from gymrl.train.producer import Cursor, RolloutProducer, group_seed

PER_STEP = 2


class RecordingRunner:
    """Makes a group instantly (or when released), stamped with the engine version it was started at."""

    def __init__(self, hold: bool = False, fail_at: int | None = None):
        self.started: list[tuple[str, int, int]] = []  # (task id, version, seed)
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def run(self, tasks, group_size, sampling, policy_version, seed=None):
        with self.lock:
            self.started.append((tasks[0].id, policy_version, seed))
            if self.fail_at is not None and len(self.started) > self.fail_at:
                raise ConnectionError("environment server arithmetic is not answering")
        self.release.wait(10)
        rollouts = [Rollout(tasks[0].id, "e", [1], [2], [1], [-0.1], "x", "stop", 1.0, "", policy_version)
                    for _ in range(group_size)]
        return RolloutBatch(rollouts, group_size, 0.0, 0.0)


def task_of(index: int) -> Task:
    return Task(id=f"t{index}", messages=[{"role": "user", "content": str(index)}], env="e", row={})


def producer(runner, max_staleness: int, **kwargs) -> RolloutProducer:
    p = RolloutProducer(runner, task_of, group_size=2, sampling=SamplingConfig(), prompts_per_step=PER_STEP,
                        max_staleness=max_staleness, seed=7, **kwargs)
    p.start()
    return p


def settle(runner, count: int) -> None:
    """Wait until ``count`` groups were started (and a little longer, to see that no more start)."""
    deadline = time.monotonic() + 10
    while len(runner.started) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)


def test_staleness_zero_is_synchronous():
    runner = RecordingRunner()
    p = producer(runner, max_staleness=0)
    try:
        settle(runner, PER_STEP)
        assert [(t, v) for t, v, _ in runner.started] == [("t0", 0), ("t1", 0)]  # one step's groups, no more
        groups = sorted((p.get(), p.get()), key=lambda g: g.index)
        for g in groups:
            p.consumed(g)
        settle(runner, PER_STEP)
        assert len(runner.started) == PER_STEP  # consumed but not pushed: the next step waits for the weights
        p.weights_pushed(1)
        settle(runner, 2 * PER_STEP)
        assert [(t, v) for t, v, _ in runner.started[PER_STEP:]] == [("t2", 1), ("t3", 1)]
    finally:
        p.stop()


def test_staleness_k_runs_k_steps_ahead_and_a_drop_is_replaced():
    runner = RecordingRunner()
    p = producer(runner, max_staleness=1)
    try:
        settle(runner, 2 * PER_STEP)
        assert len(runner.started) == 2 * PER_STEP and {v for _, v, _ in runner.started} == {0}
        first = p.get()
        p.dropped(first)  # too stale: its slot goes to a new group, with a new index and task
        settle(runner, 2 * PER_STEP + 1)
        assert [t for t, _, _ in runner.started] == ["t0", "t1", "t2", "t3", "t4"]
        assert p.queue.maxsize == 2 * PER_STEP  # the queue is bounded by what may be outstanding
    finally:
        p.stop()


def test_cursor_restarts_a_resumed_producer_where_the_run_stood():
    runner = RecordingRunner(hold=True)
    p = producer(runner, max_staleness=1)
    settle(runner, 4)
    runner.release.set()
    got = {g.index: g for g in (p.get() for _ in range(4))}
    p.consumed(got[0])
    p.consumed(got[2])
    p.dropped(got[3])  # 1 is still unconsumed: a resume must make it again, and skip 2 and 3
    cursor = p.cursor()
    p.stop()
    assert cursor == Cursor(next=1, done=[2, 3])
    again = RecordingRunner()
    resumed = producer(again, max_staleness=1, consumed=1, cursor=cursor)
    try:
        settle(again, 3)
        assert [t for t, _, _ in again.started] == ["t1", "t4", "t5"]
        assert again.started[0][2] == runner.started[1][2] == group_seed(7, 1)  # same group, same seed
    finally:
        resumed.stop()


def test_a_worker_error_reaches_the_trainer():
    p = producer(RecordingRunner(fail_at=0), max_staleness=0)
    with pytest.raises(ConnectionError, match="not answering"):
        p.get()


def test_group_seeds_depend_on_the_run_seed_and_index_only():
    assert group_seed(0, 5) == group_seed(0, 5)
    assert len({group_seed(s, i) for s in range(3) for i in range(100)}) == 300
    assert all(group_seed(0, i) % 256 == 0 for i in range(10))  # room for the G samples' seed + i


class Recorder:
    """Stands in for the trainer and the engine pool (vLLM has no sleep mode on CPU; gpu_bench.py measures the real one)."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def sleep(self) -> float:
        self.calls.append("sleep")
        return 0.25

    def wake_up(self) -> float:
        self.calls.append("wake_up")
        return 0.5

    def step(self, batch):
        self.calls.append("step")
        if self.fail:
            raise RuntimeError("out of memory")
        return "result"


def test_engines_sleep_through_the_trainer_step_and_wake_even_when_it_fails():
    from gymrl.train.loop import train_step

    plain = Recorder()
    assert train_step(plain, None, None) == ("result", 0.0) and plain.calls == ["step"]
    both = Recorder()
    assert train_step(both, None, both) == ("result", 0.75)
    assert both.calls == ["sleep", "step", "wake_up"]
    failing = Recorder(fail=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_step(failing, None, failing)
    assert failing.calls == ["sleep", "step", "wake_up"]
