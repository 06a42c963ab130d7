"""Training the MTP layer during RL (train.mtp_loss_weight), without an engine: the layer round-trips through a
checkpoint, its loss leaves the policy's update exactly as it is without it, and it learns the policy's
next-token distribution on rollout tokens. The engine side (drafts follow a push) is in tests/test_mtp.py."""

import copy
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gymrl.config import ConfigError, load_config
from gymrl.envs.registry import load_environment
from gymrl.models.checkpoint import load_policy, save_policy
from gymrl.models.mtp import check_mtp_training, load_mtp_layer, new_mtp_layer
from gymrl.rollout.runner import Rollout, RolloutBatch, encode_prompt
from gymrl.session import resolve_model_path
from gymrl.train.trainer import GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]
MTP_CONFIG = ROOT / "configs" / "mtp_cpu.yaml"


def config(tmp_path, **train):
    return load_config(MTP_CONFIG, {"run_dir": str(tmp_path), "model.cache_dir": str(ROOT / ".cache" / "models"),
                                    "sampling.temperature": 1.0, "engine.speculative_config": None,
                                    **{f"train.{k}": v for k, v in train.items()}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model path, tokenizer, eval prompts) of the tiny DeepSeek-V3 with its trained MTP layer."""
    cfg = config(tmp_path_factory.mktemp("cfg"))
    envs = [load_environment(e.name, e.args) for e in cfg.envs]
    path = resolve_model_path(cfg.model, envs, [e.weight for e in cfg.envs])
    _, tokenizer = load_policy(path)
    return path, tokenizer, [encode_prompt(tokenizer, t) for t in envs[0].tasks("eval")]


def trainer(built, tmp_path, **train) -> GRPOTrainer:
    path, tokenizer, _ = built
    policy, _ = load_policy(path)
    return GRPOTrainer(SimpleNamespace(cfg=config(tmp_path, **train), policy=policy, model_path=path, tokenizer=tokenizer,
                                       pool=None))  # no engines: these tests never push


def batch(built, seed: int = 0, groups: int = 4, size: int = 4) -> RolloutBatch:
    """Rollouts of random completions on real prompts, with rewards that differ within each group."""
    _, tokenizer, prompts = built
    rng = random.Random(seed)
    rollouts = []
    for g in range(groups):
        for i in range(size):
            completion = [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randint(4, 12))]
            rollouts.append(Rollout(f"t{g}", "arithmetic", prompts[g], completion, [1] * len(completion),
                                    [-3.0] * len(completion), "", "stop", float(i % 2), "", 0))
    return RolloutBatch(rollouts, size, 0.0, 0.0)


def test_mtp_layer_round_trips_through_a_checkpoint(built, tmp_path):
    path, tokenizer, _ = built
    policy, _ = load_policy(path)
    stored = load_mtp_layer(policy, path)
    moved = new_mtp_layer(policy, seed=7)  # differs from the stored one everywhere
    save_policy(policy, tokenizer, tmp_path / "ckpt", moved)
    back = load_mtp_layer(policy, tmp_path / "ckpt")
    for (name, a), b in zip(moved.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(stored.eh_proj.weight, moved.eh_proj.weight)
    reloaded, _ = load_policy(tmp_path / "ckpt")  # the main model is unaffected by the extra layer
    for a, b in zip(policy.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_mtp_loss_leaves_the_policy_update_unchanged(built, tmp_path):
    data = batch(built)
    off, on = trainer(built, tmp_path / "off"), trainer(built, tmp_path / "on", mtp_loss_weight=1.0)
    layer_before = copy.deepcopy(on.mtp.state_dict())
    result_off, result_on = off.step(data), on.step(data)
    for (name, a), b in zip(off.policy.state_dict().items(), on.policy.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit: the MTP layer only ever sees detached policy tensors
    assert result_off.loss == result_on.loss and result_off.mtp_stats == {}
    assert result_on.mtp_stats["mtp_loss"] > 0 and 0 <= result_on.mtp_stats["mtp_agreement"] <= 1
    moved = [n for n, t in on.mtp.state_dict().items() if not torch.equal(t, layer_before[n])]
    assert "eh_proj.weight" in moved and len(moved) > 10
    assert all(not p.requires_grad for p in off.mtp.parameters())  # weight 0: frozen, and not pushed


def test_mtp_loss_falls_when_the_layer_trains_on_rollouts(built, tmp_path):
    # The policy barely moves (learning rate 1e-9) so the target stays put; the layer learns it on these rollouts.
    t = trainer(built, tmp_path, mtp_loss_weight=1.0, learning_rate=1e-9, mtp_learning_rate=3e-3)
    data = batch(built, seed=1)
    losses = [t.step(data).mtp_stats["mtp_loss"] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_mtp_training_needs_a_model_with_an_mtp_layer(tmp_path):
    check_mtp_training("deepseek_v3", 1, tmp_path)
    with pytest.raises(ValueError, match="mtp_loss_weight.*'qwen2' with 0"):
        check_mtp_training("qwen2", 0, tmp_path)
    with pytest.raises(ConfigError, match="mtp_loss_weight.*lora"):
        config(tmp_path, mtp_loss_weight=1.0, lora={"r": 4})


def test_spec_metrics_per_environment_and_the_acceptance_plot(tmp_path):
    from gymrl.rollout.engine import SpecStats
    from gymrl.train.metrics import MetricsLog, plot_acceptance
    from gymrl.train.trainer import spec_metrics

    def rollout(env, spec):
        return Rollout("t", env, [1], [2, 3], [1, 1], [-1.0, -1.0], "", "stop", 0.0, "", 0, spec=spec)

    batch = RolloutBatch([rollout("math", SpecStats(2, 6, 3)), rollout("math", SpecStats(1, 3, 0)),
                          rollout("sudoku", SpecStats(4, 12, 12)), rollout("sudoku", None)], 2, 0.0, 0.0,
                         spec=SpecStats(7, 21, 15))
    got = spec_metrics(batch)
    assert got["spec_acceptance"] == pytest.approx(15 / 21) and got["spec_mean_accepted_length"] == pytest.approx(1 + 15 / 7)
    assert got["spec_acceptance/math"] == pytest.approx(3 / 9) and got["spec_mean_accepted_length/math"] == pytest.approx(2.0)
    assert got["spec_acceptance/sudoku"] == pytest.approx(1.0) and got["spec_mean_accepted_length/sudoku"] == pytest.approx(4.0)
    assert spec_metrics(RolloutBatch([rollout("math", None)], 1, 0.0, 0.0)) == {}

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 0, "eval_spec_mean_accepted_length": 3.5})
    for step in (1, 2):
        log.write({"step": step} | got)
    log.close()
    assert plot_acceptance(tmp_path / "metrics.jsonl", tmp_path / "acceptance.png")
    assert (tmp_path / "acceptance.png").read_bytes()[:4] == b"\x89PNG"
    plain = MetricsLog(tmp_path / "plain.jsonl")
    plain.write({"step": 1, "reward_mean": 0.5})
    plain.close()
    assert not plot_acceptance(tmp_path / "plain.jsonl", tmp_path / "none.png") and not (tmp_path / "none.png").exists()
