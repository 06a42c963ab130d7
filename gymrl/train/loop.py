"""GRPO: groups of G rollouts arrive from the producer's threads, the trainer takes one optimizer step per
``prompts_per_step`` groups, and pushes the new weights into the live engines every ``push_every`` steps.

With ``max_staleness=0`` this is synchronous GRPO (each batch sampled by the weights it trains); with k > 0
rollouts keep flowing while the trainer steps, and samples more than k versions old are dropped. Either way
the loss corrects for the gap between the policy and the behaviour logprobs recorded by vLLM (TIS by
default); the ``logprob_gap`` and ``is_weight_*`` metrics show how large that gap is.
"""

import copy
import functools
import json
import logging
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gymrl.config import SamplingConfig
from gymrl.envs.base import Task
from gymrl.envs.client import EnvServerError
from gymrl.models.checkpoint import save_policy
from gymrl.models.checkpoint_files import inspect_checkpoint
from gymrl.models.lora import apply_lora
from gymrl.models.mtp import load_mtp_layer, mtp_layer_class
from gymrl.resources import ray_node, trainer_gpu
from gymrl.rollout.engine import SpecStats
from gymrl.rollout.pool import EngineError
from gymrl.rollout.runner import RolloutBatch, RolloutRunner
from gymrl.session import Session
from gymrl.traces.store import TRACE_FILE, TraceWriter, run_metadata
from gymrl.train.accumulate import StepResult, Totals, backward_micro_batch, batch_advantages, loss_setup, step_result
from gymrl.train.checkpoint import StopSignal, load_checkpoint, save_checkpoint
from gymrl.train.metrics import MetricsLog, plot_acceptance, plot_lengths, plot_rewards
from gymrl.train.producer import Cursor, Failure, Group, RolloutProducer
from gymrl.train.weight_push import WeightPusher


class TrainerBase:
    """What the in-process and the sharded trainer share: scoring the engines' weights on held-out tasks."""

    s: Session
    version: int

    def evaluate(self, tasks: list[Task]) -> tuple[dict[str, float], RolloutBatch]:
        return evaluate(self.s.runner, tasks, self.s.cfg.sampling.max_tokens, self.version)

    def evaluate_retrying(self, tasks: list[Task], attempts: int = 3) -> tuple[dict[str, float], RolloutBatch]:
        """:meth:`evaluate`, run again when an environment server or an engine failed under it (after a restart,
        the next attempt usually succeeds); the last attempt's error stops the run."""
        for attempt in range(1, attempts + 1):
            try:
                return self.evaluate(tasks)
            except (EnvServerError, EngineError) as err:
                if attempt == attempts:
                    raise
                logging.getLogger(__name__).warning("evaluation failed (%s); running it again", err)

    def nodes(self) -> list[dict[str, str]]:
        """The Ray node of each trainer rank: here the driver's, where the in-process trainer runs."""
        return [ray_node()]


class GRPOTrainer(TrainerBase):
    def __init__(self, session: Session):
        self.s = session
        cfg = session.cfg
        self.cfg = cfg
        gpu = trainer_gpu(cfg)
        self.device = torch.device("cpu") if gpu is None else torch.device("cuda", gpu)
        session.policy.to(self.device)  # loaded in train.dtype (load_policy)
        self.reference = None
        if cfg.train.beta > 0:  # the initial policy, copied before any LoRA adapter goes in
            self.reference = copy.deepcopy(session.policy).eval().requires_grad_(False)
        self.policy = session.policy if cfg.train.lora is None else apply_lora(session.policy, cfg.train.lora)
        self.policy.train()
        # A checkpoint's MTP layer rides along (saved with every checkpoint, so the engines can draft with it); it
        # trains, and goes out with every push, only with train.mtp_loss_weight > 0.
        self.mtp = checkpoint_mtp_layer(session)
        if self.mtp is not None:
            self.mtp.to(device=self.device, dtype=getattr(torch, cfg.train.dtype))
        self.mtp_weight = cfg.train.mtp_loss_weight if self.mtp is not None else 0.0
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]  # with LoRA, the adapters only
        if self.mtp_weight > 0:
            groups.append({"params": list(self.mtp.parameters()), "lr": cfg.train.mtp_learning_rate})
        elif self.mtp is not None:
            self.mtp.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.steps))
        self.setup = loss_setup(cfg.train, cfg.sampling.max_tokens, session.tokenizer, session.policy, self.device,
                                self.mtp_weight)
        self.version = 0
        self.pusher = WeightPusher(session.pool, cfg.train.weight_sync, self.device, cfg.engine.dtype)

    def step(self, batch: RolloutBatch) -> StepResult:
        started = time.perf_counter()
        advantages = batch_advantages(batch, self.cfg.train.scale_rewards)
        totals = Totals(tokens=max(1, batch.num_tokens), sequences=len(batch.rollouts))
        mtp = self.mtp if self.mtp_weight > 0 else None
        mb = self.cfg.train.micro_batch_size
        self.optimizer.zero_grad(set_to_none=True)
        parts = [backward_micro_batch(self.policy, self.reference, mtp, batch.rollouts[start : start + mb],
                                      advantages[start : start + mb], self.setup, totals)
                 for start in range(0, len(batch.rollouts), mb)]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm)
        if mtp is not None:  # clipped on its own, so the policy's clipping is what it is without the MTP loss
            torch.nn.utils.clip_grad_norm_(mtp.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.version += 1
        return step_result(parts, totals, started, float(grad_norm))

    def learning_rate(self) -> float:
        """The learning rate the next step uses."""
        return self.scheduler.get_last_lr()[0]

    def load_checkpoint(self, path: Path) -> dict:
        """Restore weights, optimizer, scheduler and RNG states from a checkpoint; returns its saved state."""
        saved = load_checkpoint(path, self.policy, self.optimizer, self.scheduler, self.mtp)
        self.version = saved["policy_version"]
        return saved

    def save_checkpoint(self, run_dir: Path, step: int, state: dict, keep: int) -> None:
        """Write a resumable checkpoint (see :func:`gymrl.train.checkpoint.save_checkpoint`)."""
        save_checkpoint(run_dir, step, self.policy, self.s.tokenizer, self.optimizer, self.scheduler, state, keep=keep,
                        mtp_layer=self.mtp)

    def push_weights(self) -> float:
        """Load the trainer's weights into every live engine (``train.weight_sync``: by bytes, CUDA IPC or broadcast)."""
        return self.pusher.push(self.policy, self.mtp if self.mtp_weight > 0 else None, self.version,
                                self.cfg.engine.recompute_kv_on_update)


def checkpoint_mtp_layer(session: Session):
    """The model checkpoint's MTP layer (None when it has none), as loaded beside the policy."""
    info = inspect_checkpoint(session.model_path)
    return load_mtp_layer(session.policy, session.model_path) if mtp_layer_class(info.model_type) and \
        info.mtp_layers else None


def held_out_tasks(session: Session) -> list[Task]:
    """The evaluation tasks of a run: each environment's eval split, capped at ``eval.max_tasks``."""
    return [t for e in session.cfg.envs for t in session.envs[e.name].tasks("eval")[: session.cfg.eval.max_tasks]]


def evaluate(runner: RolloutRunner, tasks: list[Task], max_tokens: int, version: int) -> tuple[dict[str, float], RolloutBatch]:
    """Mean reward of greedy answers on held-out tasks, overall and per environment, and the rollouts; whatever
    weights the engines hold (``gymrl bench --suite vs-trl`` scores TRL's trained policy with it too)."""
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    batch = runner.run(tasks, 1, greedy, version)
    return {"eval_reward": statistics.fmean(r.reward for r in batch.rollouts)} | per_env(batch, "eval_reward") | {
        f"eval_{k}": v for k, v in spec_metrics(batch).items() if "/" not in k}, batch


def lr_factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """The learning rate's multiplier before optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def per_env(batch: RolloutBatch, key: str, value=lambda r: r.reward) -> dict[str, float]:
    """``{key}/{env}``: the mean of ``value`` (the reward by default) over each environment's rollouts."""
    by_env: dict[str, list[float]] = {}
    for r in batch.rollouts:
        by_env.setdefault(r.env, []).append(value(r))
    return {f"{key}/{env}": statistics.fmean(values) for env, values in sorted(by_env.items())}


def spec_metrics(batch: RolloutBatch) -> dict[str, float]:
    """How speculative drafts fared over the batch's rollouts, overall and per environment: accepted / proposed
    draft tokens and the mean accepted length (tokens per verify step). Empty when decoding had no drafts."""
    by_env: dict[str, SpecStats | None] = {}
    for r in batch.rollouts:
        by_env[r.env] = SpecStats.total([by_env.get(r.env), r.spec])
    out = {}
    for suffix, stats in [("", batch.spec)] + [(f"/{env}", s) for env, s in sorted(by_env.items())]:
        if stats is not None and stats.drafts:
            out |= {f"spec_acceptance{suffix}": stats.acceptance,
                    f"spec_mean_accepted_length{suffix}": stats.mean_accepted_length}
    return out


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
        from gymrl.train.sharded import ShardedTrainer  # imports this module

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
                result = trainer.step(batch)
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
