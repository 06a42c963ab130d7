"""Synchronous GRPO: sample a batch of tasks, roll out G completions each on the engines, score them,
take one optimizer step on the policy, push the new weights into the live engines, repeat.

The behaviour logprobs recorded by vLLM serve as the old policy in the clipped ratio; in this sync loop
they come from the current weights, so the ratio starts at 1 up to engine/trainer numerics (the
``logprob_gap`` metric tracks that difference).
"""

import copy
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gymrl.config import SamplingConfig
from gymrl.envs.base import Task
from gymrl.models.checkpoint import save_policy
from gymrl.rollout.runner import RolloutBatch
from gymrl.rollout.weight_sync import pack_policy
from gymrl.session import Session
from gymrl.train.grpo import GRPOLossConfig, group_advantages, grpo_loss
from gymrl.train.lora import apply_lora
from gymrl.train.metrics import MetricsLog, plot_lengths, plot_rewards
from gymrl.traces.store import TRACE_FILE, TraceWriter, run_metadata
from gymrl.train.policy import pad_batch, token_logprobs

@dataclass
class StepResult:
    loss: float
    clip_fraction: float
    kl_mean: float  # 0 when beta == 0
    logprob_gap: float
    train_seconds: float


class GRPOTrainer:
    def __init__(self, session: Session):
        self.s = session
        cfg = session.cfg
        self.cfg = cfg
        self.reference = None
        if cfg.train.beta > 0:  # the initial policy, copied before any LoRA adapter goes in
            self.reference = copy.deepcopy(session.policy).eval().requires_grad_(False)
        self.policy = session.policy if cfg.train.lora is None else apply_lora(session.policy, cfg.train.lora)
        self.policy.train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],  # with LoRA, the adapters only
            lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
        )
        self.loss_cfg = GRPOLossConfig(
            loss_type=cfg.train.loss_type,
            epsilon_low=cfg.train.epsilon_low,
            epsilon_high=cfg.train.epsilon_high,
            beta=cfg.train.beta,
            max_completion_length=cfg.sampling.max_tokens,
        )
        self.version = 0

    def evaluate(self, tasks: list[Task]) -> tuple[dict[str, float], RolloutBatch]:
        """Mean reward of greedy answers on held-out tasks, overall and per environment, and the rollouts."""
        greedy = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=self.cfg.sampling.max_tokens)
        batch = self.s.runner.run(tasks, 1, greedy, self.version)
        return {"eval_reward": statistics.fmean(r.reward for r in batch.rollouts)} | per_env(batch, "eval_reward"), batch

    def step(self, batch: RolloutBatch) -> StepResult:
        started = time.perf_counter()
        rollouts = batch.rollouts
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        advantages = group_advantages(rewards, batch.group_size, scale_by_std=self.cfg.train.scale_rewards)
        pad_id = self.s.tokenizer.pad_token_id
        total_tokens = max(1, batch.num_tokens)
        mb = self.cfg.train.micro_batch_size
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = clip_sum = kl_sum = gap_sum = 0.0
        for start in range(0, len(rollouts), mb):
            part = rollouts[start : start + mb]
            ids, attn, mask = pad_batch([r.prompt_ids for r in part], [r.completion_ids for r in part], pad_id,
                                        [r.completion_mask for r in part])
            old = torch.zeros_like(mask)
            for i, r in enumerate(part):
                begin = len(r.prompt_ids) - 1
                old[i, begin : begin + len(r.logprobs)] = torch.tensor(r.logprobs)
            temperature = torch.tensor([r.temperature for r in part])  # tool tasks may sample at their own
            logps = token_logprobs(self.policy, ids, attn, temperature)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = token_logprobs(self.reference, ids, attn, temperature)
            loss, stats = grpo_loss(logps, old, advantages[start : start + mb], mask, self.loss_cfg, ref_logps=ref)
            # Weight each micro-batch so the accumulated gradient equals the full-batch loss's.
            tokens = float(mask.sum())
            per_token = self.loss_cfg.loss_type in ("bnpo", "dapo")
            weight = tokens / total_tokens if per_token else len(part) / len(rollouts)
            (loss * weight).backward()
            loss_sum += float(loss.detach()) * weight
            clip_sum += stats["clip_fraction"] * weight
            kl_sum += stats.get("kl_mean", 0.0) * weight
            gap_sum += float(((logps.detach() - old).abs() * mask).sum())
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.version += 1
        return StepResult(loss_sum, clip_sum, kl_sum, gap_sum / total_tokens, time.perf_counter() - started)

    def push_weights(self) -> float:
        """Pack the trainer's weights and load them into every live engine."""
        return self.s.pool.push_weights(pack_policy(self.policy), self.version,
                                        self.cfg.engine.recompute_kv_on_update)


def per_env(batch: RolloutBatch, key: str, value=lambda r: r.reward) -> dict[str, float]:
    """``{key}/{env}``: the mean of ``value`` (the reward by default) over each environment's rollouts."""
    by_env: dict[str, list[float]] = {}
    for r in batch.rollouts:
        by_env.setdefault(r.env, []).append(value(r))
    return {f"{key}/{env}": statistics.fmean(values) for env, values in sorted(by_env.items())}


class TaskSampler:
    """Each step's tasks: environments drawn by weight, then distinct tasks within each environment."""

    def __init__(self, session: Session, seed: int):
        self.rng = random.Random(seed)
        self.pools = {e.name: session.envs[e.name].tasks("train") for e in session.cfg.envs}
        self.weights = [e.weight for e in session.cfg.envs]

    def sample(self, n: int) -> list[Task]:
        names = self.rng.choices(list(self.pools), weights=self.weights, k=n)
        tasks = []
        for name in self.pools:
            k = names.count(name)
            pool = self.pools[name]
            tasks += self.rng.sample(pool, k) if k <= len(pool) else self.rng.choices(pool, k=k)
        return tasks


def train(session: Session, progress=None) -> dict:
    """Run the configured number of steps; returns the run summary (also written to the run dir)."""
    cfg = session.cfg
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    eval_tasks = [t for e in cfg.envs for t in session.envs[e.name].tasks("eval")[: cfg.eval.max_tasks]]
    torch.manual_seed(cfg.seed)
    sampler = TaskSampler(session, cfg.seed)
    trainer = GRPOTrainer(session)
    log = MetricsLog(run_dir / "metrics.jsonl")
    traces = TraceWriter(run_dir / TRACE_FILE, run_metadata(json.loads(cfg.model_dump_json())))
    started = time.perf_counter()
    initial, eval_batch = trainer.evaluate(eval_tasks)
    traces.write_batch(eval_batch, eval_tasks, 0, "eval")
    log.write({"step": 0, "policy_version": 0} | initial)
    evaluation = initial
    for step in range(1, cfg.train.steps + 1):
        tasks = sampler.sample(cfg.train.prompts_per_step)
        batch = session.runner.run(tasks, cfg.train.group_size, cfg.sampling, trainer.version)
        traces.write_batch(batch, tasks, step, "train")
        result = trainer.step(batch)
        push_seconds = trainer.push_weights()
        rewards = [r.reward for r in batch.rollouts]
        record = {
            "step": step,
            "policy_version": trainer.version,
            "reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            "loss": result.loss,
            "clip_fraction": result.clip_fraction,
            "kl": result.kl_mean,
            "logprob_gap": result.logprob_gap,
            "completion_tokens": batch.num_tokens,
            "mean_completion_length": batch.num_tokens / len(rewards),
            "generate_seconds": batch.generate_seconds,
            "verify_seconds": batch.verify_seconds,
            "tool_seconds": batch.tool_seconds,
            "mean_turns": statistics.fmean(sum(t["role"] == "assistant" for t in r.turns) for r in batch.rollouts),
            "train_seconds": result.train_seconds,
            "push_seconds": push_seconds,
            "tokens_per_second": batch.num_tokens / max(batch.generate_seconds, 1e-9),
        } | per_env(batch, "reward") | per_env(batch, "completion_length", lambda r: r.num_model_tokens)
        record |= session.pool.step_metrics()  # tokens/s and peak queue depth of each engine
        if batch.spec is not None:  # speculative decoding on: how the drafts fared over the step's rollouts
            record |= {"spec_acceptance": batch.spec.acceptance,
                       "spec_mean_accepted_length": batch.spec.mean_accepted_length}
        if step % cfg.eval.every == 0 or step == cfg.train.steps:
            evaluation, eval_batch = trainer.evaluate(eval_tasks)
            traces.write_batch(eval_batch, eval_tasks, step, "eval")
            record |= evaluation
        log.write(record)
        if progress is not None:
            progress(step, record, evaluation["eval_reward"])
    traces.close()
    save_policy(trainer.policy, session.tokenizer, run_dir / "checkpoint")
    summary = {
        "steps": cfg.train.steps,
        "initial_eval_reward": initial["eval_reward"],
        "final_eval_reward": evaluation["eval_reward"],
        "eval_reward_gain": evaluation["eval_reward"] - initial["eval_reward"],
        "initial_eval": initial,
        "final_eval": evaluation,
        "eval_tasks": len(eval_tasks),
        "wall_seconds": time.perf_counter() - started,
        "policy_version": trainer.version,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rewards(log.path, run_dir / "reward_curve.png")
    plot_lengths(log.path, run_dir / "length_curve.png")
    return summary
