"""One micro-batch's forward, loss and backward: the in-process trainer (trainer.py) and every rank of the sharded one
(sharded.py) both step through this, so both compute the same loss.

Each micro-batch's loss is weighted by its share of the whole step's batch (its tokens over the batch's tokens for
dapo and bnpo, its sequences over the batch's sequences otherwise), so the gradients of all micro-batches, on one
process or summed over ranks, are the full batch's.
"""

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gymrl.config import TrainConfig
from gymrl.models.mtp import draft_kl, draft_logits
from gymrl.rollout.runner import Rollout, RolloutBatch
from gymrl.train.grpo import GRPOLossConfig, group_advantages, grpo_loss
from gymrl.train.policy import logprobs_from_logits, pad_batch, stop_banned_mask, stop_token_ids


@dataclass
class StepResult:
    loss: float
    clip_fraction: float
    kl_mean: float  # 0 when beta == 0
    logprob_gap: float
    train_seconds: float
    is_stats: dict[str, float] = field(default_factory=dict)  # importance weights (is_correction="tis")
    mtp_stats: dict[str, float] = field(default_factory=dict)  # the MTP layer's loss and agreement, when it trains
    grad_norm: float = 0.0  # the policy's gradient norm before clipping


@dataclass(frozen=True)
class LossSetup:
    """What every micro-batch of a run needs besides the policy and its rollouts."""

    loss_cfg: GRPOLossConfig
    pad_id: int
    stop_ids: list[int]  # banned by sampling.min_tokens
    device: torch.device
    mtp_weight: float = 0.0


def loss_setup(train: TrainConfig, max_tokens: int, tokenizer, policy, device: torch.device,
               mtp_weight: float = 0.0) -> LossSetup:
    """The run's :class:`LossSetup` from its config (``max_tokens``: sampling.max_tokens, Dr.GRPO's normaliser)."""
    loss_cfg = GRPOLossConfig(loss_type=train.loss_type, epsilon_low=train.epsilon_low,
                              epsilon_high=train.epsilon_high, beta=train.beta, max_completion_length=max_tokens,
                              is_correction=train.is_correction, is_cap=train.is_cap)
    return LossSetup(loss_cfg, tokenizer.pad_token_id, stop_token_ids(tokenizer, policy), device, mtp_weight)


def batch_advantages(batch: RolloutBatch, scale_by_std: bool) -> torch.Tensor:
    """Each rollout's advantage, relative to its group (computed over the whole batch, before any split)."""
    rewards = torch.tensor([r.reward for r in batch.rollouts], dtype=torch.float32)
    return group_advantages(rewards, batch.group_size, scale_by_std=scale_by_std)


@dataclass(frozen=True)
class Totals:
    """The whole step's batch (over every rank), which each micro-batch's weight is a share of."""

    tokens: int  # the policy's tokens, at least 1
    sequences: int


Figure = float | torch.Tensor  # a 0-d tensor on the trainer's device until the step's figures are read at once


@dataclass
class MicroBatch:
    """What one micro-batch added to its step: the loss weighted by its share of the batch (as its gradient is), clip
    and KL by its share of the batch's tokens, so the step's values are sums over micro-batches (and ranks) that do
    not depend on how the batch was cut. :func:`backward_micro_batch` leaves its figures on the device; those of
    :func:`backward_batch` are floats."""

    loss: Figure
    clip: Figure
    kl: Figure
    gap: Figure  # |logp - behaviour| summed over its tokens
    tokens: float
    is_stats: dict[str, Figure] | None  # with is_correction="tis"
    mtp: tuple[Figure, Figure, Figure] | None = None  # (KL sum, agreeing positions, positions) when the MTP layer trains


def backward_micro_batch(policy, reference, mtp, part: list[Rollout], advantages: torch.Tensor, setup: LossSetup,
                         totals: Totals, counted: bool = True) -> MicroBatch:
    """Forward and backward of one micro-batch, its loss weighted by its share of ``totals``. ``counted=False``
    runs the same passes with a zero loss: a rank with fewer micro-batches than the others still takes part in
    every collective of the sharded policy's forward and backward. Nothing here waits for the device (the inputs
    are copied without a stream synchronisation, the figures stay on it), so the host prepares the next micro-batch
    while the device still runs this one."""
    ids, attn, mask = pad_batch([r.prompt_ids for r in part], [r.completion_ids for r in part], setup.pad_id,
                                [r.completion_mask for r in part])
    tokens = float(mask.sum())
    behaviour = torch.zeros_like(mask)
    for i, r in enumerate(part):
        begin = len(r.prompt_ids) - 1
        behaviour[i, begin : begin + len(r.logprobs)] = torch.tensor(r.logprobs)
    temperature = torch.tensor([r.temperature for r in part])  # tool tasks may sample at their own
    banned = stop_banned_mask([len(r.prompt_ids) for r in part], [r.stop_banned for r in part], ids.shape[1])
    banned = banned if banned.any() else None  # asked here, on the host: no min_tokens spans, nothing to mask
    ids, attn, mask, behaviour, temperature, banned, advantages = (
        None if t is None else t.to(setup.device, non_blocking=True)
        for t in (ids, attn, mask, behaviour, temperature, banned, advantages))
    mtp_sums = None
    if mtp is not None:  # the same forward as the policy's, keeping the hidden states for the MTP layer
        hidden = policy.model(input_ids=ids, attention_mask=attn).last_hidden_state
        logits = policy.lm_head(hidden)
        mtp_sums = mtp_kl_sums(policy, mtp, ids, hidden, logits, mask)
    else:
        logits = policy(input_ids=ids, attention_mask=attn).logits
    logps = logprobs_from_logits(logits, ids, temperature, banned, setup.stop_ids)
    ref = None
    if reference is not None:
        with torch.no_grad():
            ref = logprobs_from_logits(reference(input_ids=ids, attention_mask=attn).logits, ids, temperature, banned,
                                       setup.stop_ids)
    # One optimizer step per batch: the policy before the update is the one computing logps, so with TIS the clipped
    # ratio is 1 and the importance weight carries the behaviour gap; without, the behaviour logprobs are the ratio's
    # old policy.
    tis = setup.loss_cfg.is_correction == "tis"
    old = logps.detach() if tis else behaviour
    loss, stats = grpo_loss(logps, old, advantages, mask, setup.loss_cfg, ref_logps=ref,
                            behaviour_logps=behaviour if tis else None)
    per_token = setup.loss_cfg.loss_type in ("bnpo", "dapo")
    weight = (tokens / totals.tokens if per_token else len(part) / totals.sequences) if counted else 0.0
    objective = loss * weight
    if mtp_sums is not None:  # the MTP layer's own graph: it adds no gradient to the policy's weights
        objective = objective + setup.mtp_weight * mtp_sums[0] / totals.tokens
    objective.backward()
    share = tokens / totals.tokens if counted else 0.0  # clip and KL are token means over the batch, for every loss
    return MicroBatch(loss=loss.detach() * weight, clip=stats["clip_fraction"] * share,
                      kl=stats.get("kl_mean", 0.0) * share, gap=((logps.detach() - behaviour).abs() * mask).sum(),
                      tokens=tokens, is_stats=stats if tis else None,
                      mtp=None if mtp_sums is None else (mtp_sums[0].detach(), *mtp_sums[1:]))


def backward_batch(policy, reference, mtp, rollouts: list[Rollout], advantages: torch.Tensor, setup: LossSetup,
                   totals: Totals, micro_batch_size: int) -> list[MicroBatch]:
    """:func:`backward_micro_batch` over all of ``rollouts``, cut into micro-batches after sorting them by length,
    longest first: each pads only to sequences of about its own length, and the largest comes first (an
    out-of-memory error shows at once). The gradient is a sum over micro-batches, so their makeup does not change it.
    The micro-batches' figures are read from the device once, after the last backward."""
    order = sorted(range(len(rollouts)), key=lambda i: -(len(rollouts[i].prompt_ids) + len(rollouts[i].completion_ids)))
    cuts = [order[start : start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]
    return read_figures([backward_micro_batch(policy, reference, mtp, [rollouts[i] for i in cut], advantages[cut],
                                              setup, totals) for cut in cuts])


def read_figures(parts: list[MicroBatch]) -> list[MicroBatch]:
    """``parts`` with every figure a float, read from the device in one transfer (in the order the fields are
    rebuilt below)."""
    tensors = [f.float() for p in parts
               for f in (p.loss, p.clip, p.kl, p.gap, *(p.is_stats or {}).values(), *(p.mtp or ()))
               if isinstance(f, torch.Tensor)]
    values = iter(torch.stack(tensors).tolist() if tensors else [])

    def read(f: Figure) -> float:
        return next(values) if isinstance(f, torch.Tensor) else float(f)

    return [MicroBatch(loss=read(p.loss), clip=read(p.clip), kl=read(p.kl), gap=read(p.gap), tokens=p.tokens,
                       is_stats=None if p.is_stats is None else {k: read(v) for k, v in p.is_stats.items()},
                       mtp=None if p.mtp is None else tuple(read(v) for v in p.mtp))
            for p in parts]


def mtp_kl_sums(policy, mtp, ids: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MTP loss on one micro-batch's rollouts: (sum over positions of KL(policy || draft), positions where the
    draft's top token is the policy's, positions). The draft at t predicts token t+2, which the policy predicts at
    t+1 (``logits[:, t+1]``, its sampling distribution); positions count where that token is the policy's own
    (``mask[:, t+1]``: not prompt, tool output or padding)."""
    draft = draft_logits(policy, mtp, ids, hidden)
    target = logits[:, 1:].detach()
    where = F.pad(mask[:, 1:], (0, 1))
    kl = (draft_kl(draft, target) * where).sum()
    agree = ((draft.argmax(-1) == target.argmax(-1)).float() * where).sum()
    return kl, agree, where.sum()


def step_result(parts: list[MicroBatch], totals: Totals, started: float, grad_norm: float) -> StepResult:
    """The step's result from all its micro-batches (of every rank); ``started``: its ``time.perf_counter()``."""
    mtp_stats = {}
    if any(p.mtp is not None for p in parts):
        positions = max(1.0, sum(p.mtp[2] for p in parts))
        mtp_stats = {"mtp_loss": sum(p.mtp[0] for p in parts) / positions,
                     "mtp_agreement": sum(p.mtp[1] for p in parts) / positions}
    return StepResult(sum(p.loss for p in parts), sum(p.clip for p in parts), sum(p.kl for p in parts),
                      sum(p.gap for p in parts) / totals.tokens, time.perf_counter() - started,
                      importance_stats([(p.tokens, p.is_stats) for p in parts if p.is_stats is not None]), mtp_stats,
                      grad_norm)


def importance_stats(parts: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """The micro-batches' importance-weight stats as one batch's: token-weighted means, overall min and max."""
    tokens = sum(t for t, _ in parts)
    if not parts or tokens == 0:
        return {}
    return {"is_weight_mean": sum(t * s["is_weight_mean"] for t, s in parts) / tokens,
            "is_weight_min": min(s["is_weight_min"] for _, s in parts),
            "is_weight_max": max(s["is_weight_max"] for _, s in parts),
            "is_truncated_fraction": sum(t * s["is_truncated_fraction"] for t, s in parts) / tokens}
