"""gymrl.train.grpo against TRL 1.16.0's own GRPOTrainer code, plus properties that hold for any correct GRPO loss.

TRL is called, not transcribed: ``GRPOTrainer._compute_loss`` and ``GRPOTrainer._generate_and_score_completions``
are run unbound on ``SimpleNamespace`` stand-ins that carry exactly the attributes those methods read (a
SimpleNamespace raises AttributeError on anything else, so a TRL upgrade that reads more fails loudly here
instead of silently comparing against something else). The stand-ins pin every TRL option we do not implement to
its "off" value (token-level IS, no delta, no vLLM IS correction, no entropy masking/bonus, no aux loss).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gymrl.train.grpo import GRPOLossConfig, LossType, group_advantages, grpo_loss

B, T = 6, 7
LENGTHS = [7, 5, 3, 6, 1, 0]  # ragged; the empty row is what TRL's mask_truncated_completions produces
ADV = torch.tensor([1.3, -0.7, 0.4, -1.5, 0.9, -0.2])
EPS_LOW, EPS_HIGH = 0.2, 0.28  # DAPO-style clip-higher
DR_GRPO_MAX_LEN = 10  # != T, so B*T instead of B*max_completion_length would be caught
LOSS_TYPES: list[LossType] = ["grpo", "bnpo", "dr_grpo", "dapo"]


@functools.cache
def _trl_grpo_trainer() -> Any:
    """TRL's GRPOTrainer class (no instance is built; its methods are called unbound)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer


def _mask() -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()


def _fixture() -> dict[str, torch.Tensor]:
    """Seeded log-probs whose ratios land in every branch of the clipped surrogate (see the coverage test)."""
    g = torch.Generator().manual_seed(1234)
    old = -0.1 - 3.0 * torch.rand(B, T, generator=g)
    log_ratio = torch.rand(B, T, generator=g) - 0.5  # ratios in [0.61, 1.65]
    # Plant ratios in the branches that distinguish implementations (rows 0/2/4 have A>0, rows 1/3/5 A<0):
    log_ratio[0, :4] = torch.log(torch.tensor([1.25, 1.5, 0.7, 1.1]))  # clip-higher band, clipped, unclipped low
    log_ratio[1, :4] = torch.log(torch.tensor([0.75, 0.6, 1.5, 0.95]))  # clipped low (x2), A<0 with r>1+eps
    logps = old + log_ratio
    ref = old + 0.6 * (torch.rand(B, T, generator=g) - 0.5)
    # Padding positions keep non-zero values, so any unmasked padding would change the results.
    return {"logps": logps, "old": old, "ref": ref, "mask": _mask(), "adv": ADV.clone()}


def _trl_loss(
    cfg: GRPOLossConfig, x: dict[str, torch.Tensor], logps: torch.Tensor, num_items: int | None,
    is_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Run TRL 1.16.0 ``GRPOTrainer._compute_loss`` (grpo_trainer.py:3020) on a stand-in trainer."""
    metrics: dict[str, list[float]] = defaultdict(list)
    stub = SimpleNamespace(
        # the model forward is replaced by the fixed log-probs (entropies only feed a logged metric)
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        max_completion_length=cfg.max_completion_length or T,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        _entropy_bonus_enabled=False,
        _metrics={"train": metrics},
    )
    mask = x["mask"]
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": x["adv"],
        "old_per_token_logps": x["old"],
        "num_items_in_batch": torch.tensor(num_items if num_items is not None else int(mask.sum())),
    }
    if cfg.beta != 0.0:
        inputs["ref_per_token_logps"] = x["ref"]
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = _trl_grpo_trainer()._compute_loss(stub, None, inputs)
    return loss, metrics


def _cfg(loss_type: LossType, beta: float = 0.0) -> GRPOLossConfig:
    max_len = DR_GRPO_MAX_LEN if loss_type == "dr_grpo" else None
    return GRPOLossConfig(loss_type, EPS_LOW, EPS_HIGH, beta, max_len)


def _ours(cfg: GRPOLossConfig, x: dict[str, torch.Tensor], num_items: int | None = None):
    logps = x["logps"].clone().requires_grad_(True)
    loss, stats = grpo_loss(logps, x["old"], x["adv"], x["mask"], cfg, ref_logps=x["ref"], num_items_in_batch=num_items)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, stats


CASES = [(lt, beta, None) for lt in LOSS_TYPES for beta in (0.0, 0.04)] + [("dapo", 0.0, 57), ("dapo", 0.04, 57)]


@pytest.mark.parametrize(("loss_type", "beta", "num_items"), CASES)
def test_loss_and_grad_match_trl(loss_type: LossType, beta: float, num_items: int | None) -> None:
    x = _fixture()
    cfg = _cfg(loss_type, beta)
    loss, grad, stats = _ours(cfg, x, num_items)

    trl_logps = x["logps"].clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_loss(cfg, x, trl_logps, num_items)
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_logps)

    assert trl_grad.abs().sum() > 0  # the comparison is not between two zero tensors
    torch.testing.assert_close(loss, trl_loss.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)
    assert stats["clip_fraction"] == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert stats["clip_fraction"] > 0
    if beta:
        assert stats["kl_mean"] == pytest.approx(trl_metrics["kl"][0], abs=1e-6)
        assert stats["kl_mean"] > 0
    else:
        assert "kl_mean" not in stats
    ratio = torch.exp(x["logps"] - x["old"])
    assert stats["ratio_mean"] == pytest.approx(((ratio * x["mask"]).sum() / x["mask"].sum()).item(), abs=1e-6)


def test_fixture_exercises_every_clipping_branch() -> None:
    """Guards the TRL comparison: symmetric clipping, swapped bounds or a per-token mean must all change the loss."""
    x = _fixture()
    ratio, on, pos = torch.exp(x["logps"] - x["old"]), x["mask"].bool(), (x["adv"] > 0)[:, None]
    assert (on & pos & (ratio > 1 + EPS_HIGH)).any()  # clipped high
    assert (on & pos & (ratio > 1 + EPS_LOW) & (ratio <= 1 + EPS_HIGH)).any()  # only clip-higher lets it through
    assert (on & ~pos & (ratio < 1 - EPS_LOW)).any()  # clipped low
    assert (on & ~pos & (ratio < 1 - EPS_LOW) & (ratio > 1 - EPS_HIGH)).any()  # catches swapped bounds
    assert (on & ~pos & (ratio > 1 + EPS_HIGH)).any()  # A<0, large ratio: min() keeps the unclipped term
    assert (on & pos & (ratio < 1 - EPS_LOW)).any()  # A>0, small ratio: unclipped
    base = _ours(_cfg("dapo"), x)
    symmetric = _ours(GRPOLossConfig("dapo", EPS_LOW, EPS_LOW), x)
    swapped = _ours(GRPOLossConfig("dapo", EPS_HIGH, EPS_LOW), x)
    assert not torch.allclose(base[1], symmetric[1], atol=1e-6)
    assert not torch.allclose(base[1], swapped[1], atol=1e-6)
    assert not torch.allclose(_ours(_cfg("grpo"), x)[0], _ours(_cfg("bnpo"), x)[0], atol=1e-6)


def _trl_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """Run TRL 1.16.0 ``GRPOTrainer._generate_and_score_completions`` (grpo_trainer.py:2324; advantages at
    2760-2810) with generation and reward functions stubbed to return ``rewards`` (one reward function)."""
    n = rewards.numel()
    stub = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, process_index=0),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None,
        environments=None,
        tools=None,
        _generate=lambda prompts: ([[1, 2]] * n, [[3, 4, 5]] * n, None, ["c"] * n, None, {}, None, None),
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        args=SimpleNamespace(
            per_device_train_batch_size=n,
            gradient_checkpointing_kwargs=None,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
        ),
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        beta=0.0,
        _calculate_rewards=lambda inputs, prompts, completions, ids: rewards.clone().view(-1, 1),
        num_generations=group_size,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1),
        scale_rewards="group" if scale else "none",
        reward_func_names=["r"],
        _metrics={"train": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "advantages": [], "rewards": defaultdict(list), "extra": {}},
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    inputs = [{"prompt": f"prompt {i // group_size}"} for i in range(n)]
    return _trl_grpo_trainer()._generate_and_score_completions(stub, inputs)["advantages"]


REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 0.3, math.nan, 0.9, -0.4, 0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("group_size", [4, 2, 1])
def test_advantages_match_trl(group_size: int, scale: bool) -> None:
    ours = group_advantages(REWARDS, group_size, scale_by_std=scale)
    trl = _trl_advantages(REWARDS, group_size, scale)
    assert ours.shape == REWARDS.shape
    torch.testing.assert_close(ours, trl, atol=1e-6, rtol=0)
    if group_size > 1:
        assert ours.abs().max() > 0.1


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_grad_is_policy_gradient(loss_type: LossType, beta: float) -> None:
    """With old == ref == logps the ratio is 1 and the k3 KL has zero gradient, so the gradient must be exactly
    -A * d logp weighted by the aggregation: the REINFORCE-with-baseline estimator GRPO reduces to on-policy."""
    x = _fixture()
    x["old"] = x["ref"] = x["logps"].clone()
    mask, n_items = x["mask"], 33
    lengths = mask.sum(-1, keepdim=True).clamp(min=1.0)
    weights = {
        "grpo": mask / (lengths * B),
        "bnpo": mask / mask.sum(),
        "dr_grpo": mask / (B * DR_GRPO_MAX_LEN),
        "dapo": mask / n_items,
    }[loss_type]
    _, grad, stats = _ours(_cfg(loss_type, beta), x, num_items=n_items)
    torch.testing.assert_close(grad, -x["adv"][:, None] * weights, atol=1e-7, rtol=1e-6)
    assert stats["clip_fraction"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages_give_zero_loss(loss_type: LossType) -> None:
    x = _fixture()
    x["adv"] = torch.zeros(B)
    loss, grad, _ = _ours(_cfg(loss_type), x)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("scale", [True, False])
def test_all_equal_group_gets_zero_advantage(scale: bool) -> None:
    adv = group_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 1.0]), 4, scale_by_std=scale)
    assert torch.equal(adv[:4], torch.zeros(4))
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5]) / ((1 / 3) ** 0.5 + 1e-4 if scale else 1.0)  # Bessel std
    torch.testing.assert_close(adv[4:], expected)


def test_dr_grpo_requires_max_completion_length() -> None:
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="ppo")  # type: ignore[arg-type]


def test_kl_needs_reference_logps() -> None:
    x = _fixture()
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x["logps"], x["old"], x["adv"], x["mask"], GRPOLossConfig(beta=0.04))


def _behaviour(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Behaviour logprobs off the old policy by up to +-1 nat, so some importance weights pass the cap of 2."""
    g = torch.Generator().manual_seed(99)
    return x["old"] + 2.0 * (torch.rand(x["old"].shape, generator=g) - 0.5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_truncated_importance_sampling_matches_trl(beta: float) -> None:
    """TIS weighs the clipped surrogate by min(exp(old - behaviour), cap) before the KL term, as TRL does with
    ``vllm_importance_sampling_mode="token_truncate"``."""
    x = _fixture()
    behaviour = _behaviour(x)
    cfg = GRPOLossConfig("dapo", EPS_LOW, EPS_HIGH, beta, is_correction="tis", is_cap=2.0)
    logps = x["logps"].clone().requires_grad_(True)
    loss, stats = grpo_loss(logps, x["old"], x["adv"], x["mask"], cfg, ref_logps=x["ref"], behaviour_logps=behaviour)
    (grad,) = torch.autograd.grad(loss, logps)
    ratio = torch.clamp(torch.exp(x["old"] - behaviour), max=2.0)
    trl_logps = x["logps"].clone().requires_grad_(True)
    trl_loss, _ = _trl_loss(cfg, x, trl_logps, None, is_ratio=ratio)
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_logps)
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)
    plain, _ = grpo_loss(x["logps"], x["old"], x["adv"], x["mask"], _cfg("dapo", beta), ref_logps=x["ref"])
    assert abs(loss.item() - plain.item()) > 1e-3  # the weights did something
    own = x["mask"].bool()
    assert stats["is_weight_max"] == pytest.approx(2.0)  # truncated at the cap
    assert 0 < stats["is_truncated_fraction"] < 1
    assert stats["is_weight_min"] == pytest.approx(ratio[own].min().item())
    assert stats["is_weight_mean"] == pytest.approx(ratio[own].mean().item(), abs=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tis_without_staleness_is_the_on_policy_loss_exactly(loss_type: LossType) -> None:
    """Samples from the policy being updated (behaviour == old) get weight 1: loss and gradient equal the
    uncorrected loss bit for bit, so sync training is the same code path with a staleness of 0."""
    x = _fixture()
    plain_cfg = _cfg(loss_type, 0.04)
    tis_cfg = GRPOLossConfig(loss_type, EPS_LOW, EPS_HIGH, 0.04, plain_cfg.max_completion_length, is_correction="tis")
    results = []
    for cfg, behaviour in ((plain_cfg, None), (tis_cfg, x["old"].clone())):
        logps = x["logps"].clone().requires_grad_(True)
        loss, stats = grpo_loss(logps, x["old"], x["adv"], x["mask"], cfg, ref_logps=x["ref"], behaviour_logps=behaviour)
        results.append((loss.detach(), torch.autograd.grad(loss, logps)[0], stats))
    (loss, grad, _), (tis_loss, tis_grad, tis_stats) = results
    assert torch.equal(loss, tis_loss) and torch.equal(grad, tis_grad)
    assert tis_stats["is_weight_min"] == tis_stats["is_weight_max"] == 1.0
    assert tis_stats["is_truncated_fraction"] == 0.0


def test_tis_needs_behaviour_logps_and_a_cap_of_at_least_one() -> None:
    x = _fixture()
    with pytest.raises(ValueError, match="behaviour_logps"):
        grpo_loss(x["logps"], x["old"], x["adv"], x["mask"], GRPOLossConfig(is_correction="tis"))
    with pytest.raises(ValueError, match="is_cap"):
        GRPOLossConfig(is_correction="tis", is_cap=0.5)


def test_stop_banned_logprobs_are_the_renormalised_distribution():
    """Where the stop tokens were banned (sampling.min_tokens), a token's logprob is its logprob among the
    other tokens: log p(t) - log(1 - p(stop))."""
    from gymrl.train.policy import logprobs_from_logits, stop_banned_mask

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    ids = torch.randint(1, 10, (2, 6))  # token 0 (the stop token) is never a target
    banned = stop_banned_mask([2, 3], [[(0, 3)], []], 6)
    assert banned.tolist() == [[False, True, True, True, False], [False] * 5]
    plain = logprobs_from_logits(logits, ids)
    masked = logprobs_from_logits(logits, ids, 1.0, banned, [0])
    p_stop = torch.softmax(logits[:, :-1], -1)[..., 0]
    expected = torch.where(banned, plain - torch.log1p(-p_stop), plain)
    assert torch.allclose(masked, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_equal_a_whole_batch_log_softmax(dtype):
    """The trainer's logprobs, computed a few rows at a time in float32 (values and gradients), equal a log_softmax of
    the whole batch's float32 logits, with a temperature per sequence and banned stop tokens."""
    from gymrl.train.policy import logprobs_from_logits, stop_banned_mask

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11).to(dtype).requires_grad_(True)
    ids = torch.randint(1, 11, (3, 7))
    temperature = torch.tensor([1.0, 0.7, 1.3])
    banned = stop_banned_mask([2, 3, 1], [[(0, 2)], [], [(1, 4)]], 7)
    got = logprobs_from_logits(logits, ids, temperature, banned, [0], chunk_rows=4)  # 21 rows: chunks of 4 and 1
    weights = torch.randn(3, 6)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)

    x = logits[:, :-1].float() / temperature.view(-1, 1, 1)
    x = x.masked_fill(banned[..., None] & (torch.arange(11) == 0), float("-inf"))
    expected = torch.gather(torch.log_softmax(x, -1), 2, ids[:, 1:, None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert torch.allclose(got, expected, atol=1e-6)
    assert grad.dtype == dtype and torch.allclose(grad.float(), expected_grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert float(grad[:, -1].abs().sum()) == 0.0  # the last position scores nothing
