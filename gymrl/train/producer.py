"""Rollouts made on worker threads while the trainer steps: groups flow into a bounded queue, and a group
starts only while its samples can still be fresh enough to train on.

Each group (G samples of one task) gets an index in start order; its task and its sampling seed follow
from the index alone, so a resumed run draws the same groups. A group may start while the groups not
dropped so far number at most ``(pushed_version + max_staleness + 1) * prompts_per_step``: with
``max_staleness=0`` the next step's groups start only once the last step's weights are in the engines,
which is synchronous GRPO; with k > 0 generation runs up to k steps ahead of the trainer.

A group that fails for the environment's or the engine's sake (a server that stays down, an episode whose
server restarted, an engine past its restarts, a timeout) is counted with its reason and replaced by a new
group; ``max_failed_groups`` failures in a row stop the run with the last reason.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from gymrl.config import SamplingConfig
from gymrl.envs.base import Task
from gymrl.envs.client import EnvServerError
from gymrl.rollout.pool import EngineError
from gymrl.rollout.runner import RolloutBatch, RolloutRunner


@dataclass
class Group:
    """One task's G rollouts, with where and when they were made."""

    index: int  # start order; fixes the task and the sampling seed
    batch: RolloutBatch  # one task's group_size rollouts
    started: float  # perf_counter at start and at finish (generation spans of a step)
    finished: float

    @property
    def policy_version(self) -> int:
        """The oldest policy version that sampled any of its tokens."""
        return min(r.policy_version for r in self.batch.rollouts)


@dataclass
class Failure:
    """A group that could not be made, and why."""

    index: int
    env: str
    task_id: str
    reason: str
    time: float


class TooManyFailures(RuntimeError):
    """Groups kept failing in a row: something outside the trainer is broken for good."""


@dataclass
class Cursor:
    """Where the producer's index sequence stands, for checkpoints: every index below ``next`` not listed
    in ``done`` is still to be made (again, on resume)."""

    next: int
    done: list[int]  # indices >= the lowest unfinished one that were consumed or dropped


def group_seed(run_seed: int, index: int) -> int:
    """The sampling seed of a group: a function of the run's seed and the group's index only."""
    return zlib.crc32(f"{run_seed}/{index}".encode()) << 8  # 256 seeds per group: the G samples get seed + i


class RolloutProducer:
    def __init__(self, runner: RolloutRunner, task_of: Callable[[int], Task], *, group_size: int,
                 sampling: SamplingConfig, prompts_per_step: int, max_staleness: int, seed: int,
                 pushed_version: int = 0, consumed: int = 0, cursor: Cursor | None = None, seeded: bool = True,
                 max_failed_groups: int = 8):
        self.runner = runner
        self.task_of = task_of
        self.group_size = group_size
        self.sampling = sampling
        self.per_step = prompts_per_step
        self.max_staleness = max_staleness
        self.seed = seed
        self.seeded = seeded
        self.capacity = (max_staleness + 1) * prompts_per_step
        self.queue: queue.Queue[Group | BaseException] = queue.Queue(maxsize=self.capacity)
        self._cond = threading.Condition()
        self._pushed = pushed_version
        self._kept = consumed  # groups started and not dropped: consumed, queued or in flight
        self._next = cursor.next if cursor else consumed
        self._done = set(cursor.done) if cursor else set()
        self._skip = set(self._done)  # finished before a resume: not made again
        self._stopping = False
        self.max_failed_groups = max_failed_groups
        self._failures: list[Failure] = []  # not yet taken by the trainer
        self._failed_in_a_row = 0
        self._threads = [threading.Thread(target=self._work, name=f"rollout-{i}", daemon=True)
                         for i in range(self.capacity)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, wait: bool = True, timeout: float = 300.0) -> None:
        """Start no more groups; with ``wait``, let the ones in flight finish (their results are dropped), so
        no request of this producer is left running on the engines."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if wait:
            deadline = time.monotonic() + timeout
            for t in self._threads:
                if t.is_alive():
                    t.join(max(0.0, deadline - time.monotonic()))

    def get(self) -> Group:
        """The next finished group, in completion order; a worker's error is raised here."""
        item = self.queue.get()
        if isinstance(item, BaseException):
            self.stop(wait=False)
            raise item
        return item

    def consumed(self, group: Group) -> None:
        with self._cond:
            self._done.add(group.index)

    def dropped(self, group: Group) -> None:
        """A group too stale to train on: its slot goes to a new group."""
        with self._cond:
            self._done.add(group.index)
            self._kept -= 1
            self._cond.notify_all()

    def take_failures(self) -> list[Failure]:
        """The groups that failed since the last call."""
        with self._cond:
            failures, self._failures = self._failures, []
            return failures

    def _failed(self, index: int, error: Exception) -> None:
        """A failed group: its slot goes to a new group, unless too many failed in a row."""
        task = self.task_of(index)
        failure = Failure(index, task.env, task.id, f"{type(error).__name__}: {error}", time.time())
        with self._cond:
            self._done.add(index)
            self._kept -= 1
            self._failures.append(failure)
            self._failed_in_a_row += 1
            given_up = self._failed_in_a_row >= self.max_failed_groups
            self._cond.notify_all()
        if given_up:
            self.queue.put(TooManyFailures(f"{self.max_failed_groups} rollout groups in a row failed "
                                           f"(rollout.max_failed_groups); the last: {failure.reason}"))
            self.stop(wait=False)

    def weights_pushed(self, version: int) -> None:
        with self._cond:
            self._pushed = version
            self._cond.notify_all()

    def cursor(self) -> Cursor:
        with self._cond:
            low = min((i for i in range(self._next) if i not in self._done), default=self._next)
            return Cursor(low, sorted(i for i in self._done if i >= low))

    def _claim(self) -> tuple[int, int] | None:
        """Wait for a free slot; returns (index, engine version) of the group to make, or None when stopping."""
        with self._cond:
            while not self._stopping and self._kept >= (self._pushed + self.max_staleness + 1) * self.per_step:
                self._cond.wait()
            if self._stopping:
                return None
            while self._next in self._skip:
                self._next += 1
            index, self._next = self._next, self._next + 1
            self._kept += 1
            return index, self._pushed

    def _work(self) -> None:
        while (claim := self._claim()) is not None:
            index, version = claim
            started = time.perf_counter()
            try:
                batch = self.runner.run([self.task_of(index)], self.group_size, self.sampling, version,
                                        seed=group_seed(self.seed, index) if self.seeded else None)
            except (EnvServerError, EngineError) as error:
                self._failed(index, error)
                continue
            except BaseException as error:  # noqa: BLE001 - handed to the trainer, which raises it
                self.queue.put(error)
                return
            with self._cond:
                if self._stopping:
                    return
                self._failed_in_a_row = 0
            self.queue.put(Group(index, batch, started, time.perf_counter()))
