"""GRPO-family policy loss and group-relative advantages (pure torch).

The maths is kept numerically identical to TRL 1.16.0's ``GRPOTrainer`` (``_compute_loss`` and the advantage
block of ``_generate_and_score_completions`` in ``trl/trainer/grpo_trainer.py``) so that runs are comparable with
TRL and so that ``tests/test_grpo_loss.py`` can check us against TRL's own code. Papers:

* GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
  (arXiv:2402.03300) -- group-relative advantages, PPO-style clipped surrogate, k3 KL to a reference policy,
  per-sequence token mean.
* Dr.GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv:2503.20783) --
  the per-sequence length normaliser and the std scaling bias the update; they use a constant normaliser
  (``B * max_completion_length``) and no std scaling (pass ``scale_by_std=False`` to :func:`group_advantages`).
* DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476) --
  token-level aggregation over the whole batch and asymmetric "clip-higher" (``epsilon_high`` > ``epsilon_low``).

Scope: the loss is for one micro-batch. As in TRL, ``grpo``/``bnpo``/``dr_grpo`` are per-micro-batch averages
(the caller divides by the gradient-accumulation steps), while ``dapo`` divides by ``num_items_in_batch``, which the
caller sets to the completion-token count its gradient is averaged over (TRL passes the generation batch's global
token count rescaled to one accumulation window per rank:
``num_items_in_batch / num_processes * grad_accum_steps / steps_per_generation``).

TRL 1.16.0 options deliberately NOT implemented here: loss types ``cispo``, ``sapo``, ``vespo`` and ``luspo``;
``importance_sampling_level="sequence"`` (GSPO); ``delta`` (upper clamp of the unclipped ratio, two-sided
clipping); ``use_bias_correction_kl`` (KL times the importance ratio); the masked and sequence-level modes of
vLLM importance-sampling correction (only ``token_truncate`` is here, as ``is_correction="tis"``); off-policy sequence masking (``off_policy_mask_threshold``); high-entropy token masking
(``top_entropy_quantile``); the entropy bonus; the MoE router aux loss; ``scale_rewards="batch"`` and
``multi_objective_aggregation="normalize_then_sum"`` for advantages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
IsCorrection = Literal["none", "tis"]


@dataclass(frozen=True)
class GRPOLossConfig:
    """Hyper-parameters of :func:`grpo_loss`. Defaults follow TRL's GRPOConfig (``loss_type="dapo"``, eps 0.2)."""

    loss_type: LossType = "dapo"
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low (only binds when the advantage is < 0)
    epsilon_high: float = 0.2  # ratio clipped above at 1 + epsilon_high (DAPO's clip-higher uses e.g. 0.28)
    beta: float = 0.0  # KL coefficient to a reference policy (k3 estimator); 0 = no KL, no reference needed
    max_completion_length: int | None = None  # Dr.GRPO's constant normaliser; required for "dr_grpo"
    # Off-policy correction for samples drawn by another policy (a stale version, or the engine's numerics):
    # "tis" weighs each token's policy loss by min(pi_old / pi_behaviour, is_cap) (truncated importance sampling,
    # Yao et al. 2025; TRL's vllm_importance_sampling_mode="token_truncate"); "none" leaves it out.
    is_correction: IsCorrection = "none"
    is_cap: float = 2.0

    def __post_init__(self) -> None:
        # Fail at configuration time, not at the first optimiser step after a long rollout.
        if self.loss_type not in get_args(LossType):
            raise ValueError(f"loss_type must be one of {get_args(LossType)}, got {self.loss_type!r}")
        if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length <= 0):
            raise ValueError(
                "loss_type='dr_grpo' normalises by batch_size * max_completion_length, so "
                f"max_completion_length must be a positive int (got {self.max_completion_length!r})"
            )
        if self.is_correction not in get_args(IsCorrection):
            raise ValueError(f"is_correction must be one of {get_args(IsCorrection)}, got {self.is_correction!r}")
        if self.is_cap < 1.0:
            raise ValueError(f"is_cap must be >= 1 (a cap below 1 down-weights on-policy tokens), got {self.is_cap}")


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std over the last dim ignoring NaNs, op for op as TRL's ``trl.trainer.utils.nanstd``.

    A group with fewer than two finite rewards gets NaN (its advantages are zeroed afterwards, as in TRL).
    """
    mean = torch.nanmean(x, dim=-1, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=-1, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=-1, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    return torch.sqrt(variance * correction)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """rewards: [num_groups*group_size], consecutive rows are one group. Returns advantages of the same shape.

    GRPO (Shao et al. 2024) replaces a learned critic by the mean reward of the other samples for the same prompt,
    and scales by the group's (Bessel-corrected) std; Dr.GRPO (Liu et al. 2025) argues the std scaling biases
    towards too-easy/too-hard prompts, hence ``scale_by_std=False``. ``eps`` keeps all-equal groups (std 0) finite:
    their advantage is exactly 0, so they carry no gradient. This is TRL's ``scale_rewards="group"`` (or ``"none"``).
    A NaN reward (an unscorable completion) is left out of its group's statistics and gets advantage 0, as in TRL.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    advantages = grouped - torch.nanmean(grouped, dim=-1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (_nanstd(grouped) + eps)
    return torch.nan_to_num(advantages, nan=0.0).view(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    ref_logps: torch.Tensor | None = None,
    num_items_in_batch: int | None = None,
    behaviour_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logps (requires grad), old_logps (the policy before this update, detached), ref_logps, behaviour_logps
    (what the engine sampled with), mask: [B, T] float/bool; advantages: [B]. Returns the scalar loss and stats
    (0-d tensors on the loss's device): {"clip_fraction", "ratio_mean", "kl_mean" (when beta>0),
    "is_weight_mean/min/max", "is_truncated_fraction" (with is_correction="tis")}.

    With ``is_correction="tis"`` the policy term of every token is multiplied by the truncated importance weight
    ``min(exp(old - behaviour), is_cap)`` (a constant), as TRL does after its clipped surrogate and before the
    KL term. When the samples are on-policy (``behaviour == old``) every weight is exactly 1 and the loss is the
    on-policy loss, bit for bit.

    Token-level PPO clipped surrogate ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`` with ``r = exp(logp - old)``
    (GRPO; asymmetric bounds from DAPO), plus ``beta * (exp(ref-logp) - (ref-logp) - 1)`` (Schulman's k3 KL
    estimator, always >= 0, as in GRPO), aggregated per ``cfg.loss_type``:

    * ``grpo``: mean over each sequence's tokens, then mean over sequences (GRPO). Each token weighs 1/|o_i|,
      which Dr.GRPO shows under-penalises long wrong answers (a length bias).
    * ``bnpo``: sum over all tokens / number of tokens in this micro-batch.
    * ``dr_grpo``: sum / (B * max_completion_length), a constant, so no length bias (Dr.GRPO).
    * ``dapo``: sum / ``num_items_in_batch`` (global token count; defaults to ``mask.sum()``) (DAPO).

    ``clip_fraction`` counts tokens whose clipped branch is active (r < 1-eps_low with A < 0, or r > 1+eps_high
    with A > 0), i.e. tokens with zero policy gradient: TRL's ``clip_ratio/region_mean``.
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape or logps.dim() != 2:
        shapes = [tuple(t.shape) for t in (logps, old_logps, mask)]
        raise ValueError(f"logps, old_logps and mask must share one [B, T] shape, got {shapes}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must have shape [B]={tuple(logps.shape[:1])}, got {tuple(advantages.shape)}")
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    # The behaviour and reference policies are constants of the objective; never let gradient flow into them.
    coef_1 = torch.exp(logps - old_logps.detach())
    coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    is_weight = None
    if cfg.is_correction == "tis":
        if behaviour_logps is None or behaviour_logps.shape != logps.shape:
            raise ValueError("is_correction='tis' needs behaviour_logps of the [B, T] shape of logps")
        is_weight = torch.clamp(torch.exp(old_logps.detach() - behaviour_logps.detach()), max=cfg.is_cap)
        per_token_loss = per_token_loss * is_weight

    per_token_kl: torch.Tensor | None = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("cfg.beta != 0 needs ref_logps (reference-policy log-probs of the completion tokens)")
        delta = ref_logps.detach() - logps
        per_token_kl = torch.exp(delta) - delta - 1
        per_token_loss = per_token_loss + cfg.beta * per_token_kl

    masked_sum = (per_token_loss * mask).sum()
    if cfg.loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":
        loss = masked_sum / mask.sum().clamp(min=1.0)
    elif cfg.loss_type == "dr_grpo":
        assert cfg.max_completion_length is not None  # enforced by GRPOLossConfig.__post_init__
        loss = masked_sum / (per_token_loss.size(0) * cfg.max_completion_length)
    elif cfg.loss_type == "dapo":
        n = mask.sum()
        if num_items_in_batch is not None:
            n = torch.as_tensor(num_items_in_batch, dtype=logps.dtype, device=logps.device)
        loss = masked_sum / n.clamp(min=1.0)
    else:  # unreachable: GRPOLossConfig validates loss_type
        raise ValueError(f"unknown loss_type {cfg.loss_type!r}")

    with torch.no_grad():  # stats stay on the device: reading each would make the host wait for the GPU
        n_tokens = mask.sum().clamp(min=1.0)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum() / n_tokens

        clipped_low = (coef_1 < 1 - cfg.epsilon_low) & (adv < 0)
        clipped_high = (coef_1 > 1 + cfg.epsilon_high) & (adv > 0)
        clipped = clipped_low | clipped_high
        stats = {"clip_fraction": masked_mean(clipped.to(mask.dtype)), "ratio_mean": masked_mean(coef_1)}
        if per_token_kl is not None:
            stats["kl_mean"] = masked_mean(per_token_kl)
        if is_weight is not None:  # min and max over the policy's tokens (1 when there are none)
            own, one = mask.bool(), torch.ones((), dtype=is_weight.dtype, device=is_weight.device)
            some = own.any()
            low = torch.where(some, torch.where(own, is_weight, torch.inf).amin(), one)
            high = torch.where(some, torch.where(own, is_weight, -torch.inf).amax(), one)
            stats |= {"is_weight_mean": masked_mean(is_weight), "is_weight_min": low, "is_weight_max": high,
                      "is_truncated_fraction": masked_mean((is_weight >= cfg.is_cap).to(mask.dtype))}
    return loss, stats
