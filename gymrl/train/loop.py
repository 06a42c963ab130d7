"""GRPO: groups of G rollouts arrive from the producer's threads, the trainer takes one optimizer step per
``prompts_per_step`` groups, and pushes the new weights into the live engines every ``push_every`` steps.

With ``max_staleness=0`` this is synchronous GRPO (each batch sampled by the weights it trains); with k > 0
rollouts keep flowing while the trainer steps, and samples more than k versions old are dropped. Either way
the loss corrects for the gap between the policy and the behaviour logprobs recorded by vLLM (TIS by
default); the ``logprob_gap`` and ``is_weight_*`` metrics show how large that gap is.
"""

import json
import logging
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gymrl.envs.base import Task
from gymrl.models.checkpoint import save_policy
from gymrl.resources import ray_node
from gymrl.rollout.pool import EnginePool
from gymrl.rollout.runner import RolloutBatch
from gymrl.session import Session
from gymrl.traces.store import TRACE_FILE, TraceWriter, run_metadata
from gymrl.train.accumulate import StepResult
from gymrl.train.checkpoint import StopSignal
from gymrl.train.metrics import MetricsLog, plot_acceptance, plot_lengths, plot_rewards
from gymrl.train.producer import Cursor, Failure, Group, RolloutProducer
from gymrl.train.sharded import ShardedTrainer
from gymrl.train.trainer import GRPOTrainer, per_env, spec_metrics


def held_out_tasks(session: Session) -> list[Task]:
    """The evaluation tasks of a run: each environment's eval split, capped at ``eval.max_tasks``."""
    return [t for e in session.cfg.envs for t in session.envs[e.name].tasks("eval")[: session.cfg.eval.max_tasks]]


class TaskSampler:
    """Each step's tasks: environments drawn by weight, then distinct tasks within each environment. Batch b
    depends on the seed and b only, so the task of any group index is known without replaying the run."""

    def __init__(self, session: Session, seed: int, per_step: int):
        self.seed = seed
        self.per_step = per_step
        self.pools = {e.name: session.envs[e.name].tasks("train") for e in session.cfg.envs}
        self.weights = [e.weight for e in session.cfg.envs]
        self._batches: dict[int, list[Task]] = {}

    def batch(self, b: int) -> list[Task]:
        if b not in self._batches:
            self._batches[b] = self._draw(b)
        return self._batches[b]

    def _draw(self, b: int) -> list[Task]:
        rng = random.Random(f"{self.seed}/{b}")
        names = rng.choices(list(self.pools), weights=self.weights, k=self.per_step)
        tasks = []
        for name in self.pools:
            k = names.count(name)
            pool = self.pools[name]
            tasks += rng.sample(pool, k) if k <= len(pool) else rng.choices(pool, k=k)
        return tasks

    def task_of(self, index: int) -> Task:
        return self.batch(index // self.per_step)[index % self.per_step]


def collect(producer: RolloutProducer, version: int, count: int, max_staleness: int) -> tuple[list[Group], int, float]:
    """``count`` groups fresh enough for a trainer at ``version``, in start order; the number dropped as too
    stale; the seconds the trainer waited."""
    started = time.perf_counter()
    groups, dropped = [], 0
    while len(groups) < count:
        group = producer.get()
        if version - group.policy_version > max_staleness:
            producer.dropped(group)
            dropped += 1
            continue
        producer.consumed(group)
        groups.append(group)
    return sorted(groups, key=lambda g: g.index), dropped, time.perf_counter() - started


def log_failures(failures: list[Failure], step: int, path: Path) -> int:
    """Append the groups that failed (while this step's batch was made) to ``failures.jsonl``; how many."""
    if failures:
        with path.open("a") as f:
            for failure in failures:
                f.write(json.dumps({"step": step} | vars(failure)) + "\n")
        logging.getLogger(__name__).warning("%d rollout group(s) failed; the last: %s", len(failures),
                                            failures[-1].reason.splitlines()[0][:300])
    return len(failures)


def staleness_metrics(groups: list[Group], version: int) -> dict[str, float]:
    """How many versions behind the trainer each sample was: mean, max and a histogram (samples per value)."""
    per_sample = [version - r.policy_version for g in groups for r in g.batch.rollouts]
    return {"staleness_mean": statistics.fmean(per_sample), "staleness_max": max(per_sample)} | {
        f"staleness/{k}": n for k, n in sorted(Counter(per_sample).items())}


@dataclass
class StepCounts:
    """What the loop itself measured in one step, for :func:`step_record` (the batch and the trainer's result
    bring the rest)."""

    step: int
    policy_version: int  # after the step and its push
    learning_rate: float  # the one this step used
    queue_depth: int  # groups waiting in the producer's queue when the step began
    wait_seconds: float  # the trainer waiting for fresh groups
    dropped: int  # groups dropped as too stale
    prompts_per_step: int
    failed: int  # groups that failed while this step's batch was made
    push_seconds: float  # 0 when the step pushed no weights
    sleep_seconds: float  # putting the engines to sleep and waking them (engine.sleep_while_training), else 0
    step_seconds: float  # collect to push, the engines' stats included; the evaluation is not part of the step


def step_record(counts: StepCounts, batch: RolloutBatch, result: StepResult, staleness: dict[str, float],
                engines: dict[str, float]) -> dict:
    """A training step's row of metrics.jsonl, before its evaluation's keys (``engines``: the pool's
    :meth:`~gymrl.rollout.pool.EnginePool.step_metrics`, tokens/s and peak queue depth of each engine)."""
    rewards = [r.reward for r in batch.rollouts]
    record = {
        "step": counts.step,
        "policy_version": counts.policy_version,
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "loss": result.loss,
        "learning_rate": counts.learning_rate,
        "clip_fraction": result.clip_fraction,
        "kl": result.kl_mean,
        "logprob_gap": result.logprob_gap,
        "completion_tokens": batch.num_tokens,
        "mean_completion_length": batch.num_tokens / len(rewards),
        "generate_seconds": batch.generate_seconds,
        "verify_seconds": batch.verify_seconds,
        "tool_seconds": batch.tool_seconds,
        "mean_turns": statistics.fmean(sum(t["role"] == "assistant" for t in r.turns) for r in batch.rollouts),
        "grad_norm": result.grad_norm,
        "train_seconds": result.train_seconds,
        "push_seconds": counts.push_seconds,
        "engine_sleep_seconds": counts.sleep_seconds,
        "wait_seconds": counts.wait_seconds,
        "queue_depth": counts.queue_depth,
        "dropped_groups": counts.dropped,
        "dropped_fraction": counts.dropped / (counts.dropped + counts.prompts_per_step),
        "failed_groups": counts.failed,
        "tokens_per_second": batch.num_tokens / max(batch.generate_seconds, 1e-9),
    } | staleness | result.is_stats | per_env(batch, "reward") | per_env(
        batch, "completion_length", lambda r: r.num_model_tokens)
    record |= engines
    record |= spec_metrics(batch) | result.mtp_stats
    record["step_seconds"] = counts.step_seconds
    record["samples_per_second"] = len(rewards) / counts.step_seconds
    return record


def train_step(trainer: GRPOTrainer | ShardedTrainer, batch: RolloutBatch, sleeping: EnginePool | None) -> tuple[StepResult, float]:
    """The trainer's step on ``batch``; with a ``sleeping`` pool (engine.sleep_while_training), the engines sleep
    through it and the trainer's cached GPU memory goes back before they wake. Also the seconds that cost."""
    if sleeping is None:
        return trainer.step(batch), 0.0
    seconds = sleeping.sleep()
    try:
        result = trainer.step(batch)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the caching allocator would keep what the engines need back
        seconds += sleeping.wake_up()
    return result, seconds


def train(session: Session, progress=None, resume: Path | None = None) -> dict:
    """Run the configured number of steps, or the rest of them from the checkpoint ``resume``; returns the run
    summary (also written to the run dir). SIGTERM or Ctrl-C ends the run after the current step, with a
    checkpoint."""
    cfg = session.cfg
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    eval_tasks = held_out_tasks(session)
    torch.manual_seed(cfg.seed)
    per_step, max_staleness = cfg.train.prompts_per_step, cfg.train.max_staleness
    sampler = TaskSampler(session, cfg.seed, per_step)
    if cfg.train.workers > 1:
        trainer = ShardedTrainer(session)
    else:  # its reference policy (beta > 0) is the initial one, even on resume
        trainer = GRPOTrainer(session)
    # Where each part runs (engine.ray_resources and train.ray_resources place them on a cluster): in summary.json.
    placement = {"driver": ray_node(), "engines": session.pool.nodes(), "trainer_ranks": trainer.nodes()}
    logging.getLogger(__name__).info("placement: %s", json.dumps(placement))
    saved = None
    if resume is not None:
        saved = trainer.load_checkpoint(resume)
        trainer.push_weights()  # the engines started from model.path
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.train.tensorboard else None,
                     resume_at=saved and saved["metrics_offset"], resume_step=saved and saved["step"])
    traces = TraceWriter(run_dir / TRACE_FILE, run_metadata(json.loads(cfg.model_dump_json())))
    started = time.perf_counter()
    if saved is None:
        initial, eval_batch = trainer.evaluate_retrying(eval_tasks)
        traces.write_batch(eval_batch, eval_tasks, 0, "eval")
        log.write({"step": 0, "policy_version": 0} | initial)
        evaluation, first_step = initial, 1
    else:
        traces.set_aside(saved["trace_offset"])  # what the interrupted run wrote after its checkpoint
        initial, evaluation, first_step = saved["initial_eval"], saved["eval"], saved["step"] + 1
    producer = RolloutProducer(session.runner, sampler.task_of, group_size=cfg.train.group_size,
                               sampling=cfg.sampling, prompts_per_step=per_step, max_staleness=max_staleness,
                               seed=cfg.seed, pushed_version=trainer.version, consumed=(first_step - 1) * per_step,
                               cursor=Cursor(**saved["cursor"]) if saved else None,
                               seeded=cfg.train.seeded_sampling, max_failed_groups=cfg.rollout.max_failed_groups)
    failures_log = run_dir / "failures.jsonl"
    producer.start()
    step = first_step - 1
    finished = False
    with StopSignal() as stop:
        try:
            for step in range(first_step, cfg.train.steps + 1):
                step_started = time.perf_counter()
                queue_depth = producer.queue.qsize()
                groups, dropped, wait_seconds = collect(producer, trainer.version, per_step, max_staleness)
                batch = RolloutBatch.concat([g.batch for g in groups])
                batch.generate_seconds = max(g.finished for g in groups) - min(g.started for g in groups)
                traces.write_batch(batch, [sampler.task_of(g.index) for g in groups], step, "train")
                staleness = staleness_metrics(groups, trainer.version)
                failed = log_failures(producer.take_failures(), step, failures_log)
                learning_rate = trainer.learning_rate()  # what this step uses
                result, sleep_seconds = train_step(trainer, batch, session.pool if cfg.engine.sleep_while_training else None)
                evaluating = step % cfg.eval.every == 0 or step == cfg.train.steps
                if step == cfg.train.steps or stop.requested:
                    producer.stop(wait=False)  # the last push must not start groups that no step will use
                push_seconds = 0.0
                if step % cfg.train.push_every == 0 or evaluating:  # an evaluation measures the newest weights
                    push_seconds = trainer.push_weights()
                    producer.weights_pushed(trainer.version)
                engines = session.pool.step_metrics()
                counts = StepCounts(step=step, policy_version=trainer.version, learning_rate=learning_rate,
                                    queue_depth=queue_depth, wait_seconds=wait_seconds, dropped=dropped,
                                    prompts_per_step=per_step, failed=failed, push_seconds=push_seconds,
                                    sleep_seconds=sleep_seconds,
                                    step_seconds=time.perf_counter() - step_started)
                record = step_record(counts, batch, result, staleness, engines)
                if evaluating:
                    eval_started = time.perf_counter()
                    evaluation, eval_batch = trainer.evaluate_retrying(eval_tasks)
                    traces.write_batch(eval_batch, eval_tasks, step, "eval")
                    record |= evaluation | {"eval_seconds": time.perf_counter() - eval_started}
                log.write(record)
                if progress is not None:
                    progress(step, record, evaluation["eval_reward"])
                every = cfg.train.checkpoint_every
                if stop.requested or (every and step % every == 0):
                    trainer.save_checkpoint(run_dir, step, {
                        "policy_version": trainer.version, "cursor": vars(producer.cursor()),
                        "trace_offset": traces.offset(), "metrics_offset": log.offset(), "initial_eval": initial,
                        "eval": evaluation}, keep=cfg.train.keep_checkpoints)
                if stop.requested:
                    break
            finished = True
        finally:
            producer.stop(wait=finished)  # on an error, do not wait for the groups in flight
            log_failures(producer.take_failures(), step, failures_log)  # those of a step that never came, too
            log.close()
            traces.close()
            trainer.close()
    save_policy(trainer.policy, session.tokenizer, run_dir / "checkpoint", trainer.mtp)
    summary = {
        "steps": step,
        "interrupted": step < cfg.train.steps,
        "resumed_from": str(resume) if resume is not None else None,
        "initial_eval_reward": initial["eval_reward"],
        "final_eval_reward": evaluation["eval_reward"],
        "eval_reward_gain": evaluation["eval_reward"] - initial["eval_reward"],
        "initial_eval": initial,
        "final_eval": evaluation,
        "eval_tasks": len(eval_tasks),
        "wall_seconds": time.perf_counter() - started,
        "policy_version": trainer.version,
        "placement": placement,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rewards(log.path, run_dir / "reward_curve.png")
    plot_lengths(log.path, run_dir / "length_curve.png")
    plot_acceptance(log.path, run_dir / "acceptance_curve.png")
    return summary
