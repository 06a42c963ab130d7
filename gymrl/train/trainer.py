"""The trainer of one process: the policy (LoRA or not, its MTP layer alongside), AdamW, one GRPO step per batch
(:mod:`gymrl.train.accumulate`'s micro-batch code), the weight push into the engines, and the greedy held-out
evaluation both trainers share (the sharded one, :mod:`gymrl.train.sharded`, builds on :class:`TrainerBase`)."""

import copy
import functools
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from gymrl.config import SamplingConfig
from gymrl.envs.base import Task
from gymrl.envs.client import EnvServerError
from gymrl.models.checkpoint_files import inspect_checkpoint
from gymrl.models.lora import apply_lora
from gymrl.models.mtp import load_mtp_layer, mtp_layer_class
from gymrl.resources import ray_node, trainer_gpu
from gymrl.rollout.engine import SpecStats
from gymrl.rollout.pool import EngineError
from gymrl.rollout.runner import RolloutBatch, RolloutRunner
from gymrl.session import Session
from gymrl.train.accumulate import StepResult, Totals, backward_batch, batch_advantages, loss_setup, step_result
from gymrl.train.checkpoint import load_checkpoint, save_checkpoint
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

    def close(self) -> None:
        """Release what the trainer holds outside this process (the in-process trainer: nothing)."""


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
        if cfg.train.activation_checkpointing:
            checkpoint_activations(self.policy)
        if cfg.train.compile:
            compile_layers(session.policy)
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
        # On a GPU, one fused kernel for the whole update instead of a few per parameter tensor.
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                           fused=self.device.type == "cuda")
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
        self.optimizer.zero_grad(set_to_none=True)
        parts = backward_batch(self.policy, self.reference, mtp, batch.rollouts, advantages, self.setup, totals,
                               self.cfg.train.micro_batch_size)
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


def checkpoint_activations(policy) -> None:
    """``train.activation_checkpointing``: each decoder layer's activations recomputed in the backward pass
    (transformers' non-reentrant checkpointing, which FSDP2's units also take)."""
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_layers(policy) -> None:
    """``train.compile``: each decoder layer through torch.compile, in place (its parameters keep their names, so
    pushes and checkpoints are unchanged; LoRA's adapters, injected into the layers, compile with them). Shapes are
    dynamic: every micro-batch pads to a length of its own."""
    for layer in policy.model.layers:
        layer.compile(dynamic=True)


def checkpoint_mtp_layer(session: Session):
    """The model checkpoint's MTP layer (None when it has none), as loaded beside the policy."""
    info = inspect_checkpoint(session.model_path)
    return load_mtp_layer(session.policy, session.model_path) if mtp_layer_class(info.model_type) and \
        info.mtp_layers else None


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
