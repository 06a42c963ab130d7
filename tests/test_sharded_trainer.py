"""The sharded trainer (train.workers > 1): two FSDP2 ranks on gloo take the same step as the one-process trainer,
the batch is split by tokens, and what it does not support is refused by config key."""

import random
from pathlib import Path

import pytest
import torch

from gymrl.config import ConfigError, load_config
from gymrl.rollout.runner import Rollout, RolloutBatch
from gymrl.train.sharded import split_by_tokens

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_split_by_tokens_is_balanced():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(64)]
    for ranks in (2, 3, 8):
        shares = split_by_tokens(lengths, ranks)
        assert sorted(i for share in shares for i in share) == list(range(64))  # each sequence once
        assert all(share == sorted(share) for share in shares)  # in batch order
        loads = [sum(lengths[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(lengths)  # greedy longest-first: within one sequence
    assert split_by_tokens([100, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]  # by tokens, not by sequences
    assert split_by_tokens([3], 2) == [[0], []]


@pytest.mark.parametrize("key, value", [("lora", {"r": 4}), ("mtp_loss_weight", 0.1), ("weight_sync", "ipc")])
def test_what_sharding_does_not_support_is_refused(key, value, tmp_path):
    overrides = {"run_dir": str(tmp_path), "train.workers": 2, f"train.{key}": value}
    with pytest.raises(ConfigError, match=f"train.{key} is not supported with train.workers > 1"):
        load_config(DEMO_CONFIG, overrides)


def test_one_worker_config_is_unchanged(tmp_path):
    cfg = load_config(DEMO_CONFIG, {"run_dir": str(tmp_path), "train.lora": {"r": 4}})
    assert cfg.train.workers == 1 and cfg.train.lora is not None


def test_sharded_ranks_take_gpus_of_their_own(tmp_path):
    """On cuda each rank reserves a GPU through Ray: the driver takes none, and the GPUs must cover engines and
    ranks."""
    from gymrl.resources import gpu_problem, ray_gpus, trainer_gpu

    cfg = load_config(DEMO_CONFIG, {"run_dir": str(tmp_path), "train.workers": 2, "train.device": "cuda",
                                    "engine.device": "cuda"})
    assert trainer_gpu(cfg, 4) is None and ray_gpus(cfg, 4) is None
    assert gpu_problem(cfg, gpus=3) is None
    assert gpu_problem(cfg, gpus=2).startswith("train.workers=2 GPUs for the sharded trainer's ranks")


def engineless_session(cfg, model_path):
    """A session with the model and its tokenizer only: enough for a trainer's steps and checkpoints."""
    from gymrl.models.checkpoint import load_policy
    from gymrl.session import Session

    policy, tokenizer = load_policy(model_path, cfg.train.dtype)
    return Session(cfg, {}, model_path, policy, tokenizer, pool=None, runner=None)


def hand_made_batch(vocab: int, groups: int = 3, group_size: int = 4) -> RolloutBatch:
    """Rollouts of uneven lengths (one with environment tokens in its completion), behaviour logprobs off the
    policy's (so ratios clip without TIS), rewards that differ within each group."""
    rng = random.Random(1)
    rollouts = []
    for i in range(groups * group_size):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 9))]
        completion = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 14))]
        mask = [1] * len(completion)
        if i == 5 and len(completion) > 3:
            mask[1:3] = [0, 0]  # tool output inside the completion: not trained on
        logprobs = [rng.uniform(-6.0, -0.5) if m else 0.0 for m in mask]
        rollouts.append(Rollout(task_id=f"t{i // group_size}", env="arithmetic", prompt_ids=prompt,
                                completion_ids=completion, completion_mask=mask, logprobs=logprobs, text="",
                                finish_reason="stop", reward=float(rng.random() < 0.5) + 0.1 * (i % group_size),
                                reason="", policy_version=0))
    return RolloutBatch(rollouts, group_size, generate_seconds=0.0, verify_seconds=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("train, workers, groups", [
    ({"loss_type": "dapo", "is_correction": "tis", "beta": 0.0}, 2, 3),
    ({"loss_type": "grpo", "is_correction": "none", "beta": 0.1}, 2, 3),
    ({"loss_type": "bnpo", "is_correction": "tis", "beta": 0.0}, 3, 1),  # 2 sequences: one rank has none
], ids=["dapo-tis", "grpo-kl", "bnpo-idle-rank"])
def test_sharded_ranks_take_the_one_process_step(demo_cfg, demo_model, train, workers, groups):
    """The same hand-made batch through workers > 1 (FSDP2, gloo) and workers=1: the same loss, stats, gradient
    norm (clipping active) and updated weights, within 1e-5 in float32."""
    import ray

    from gymrl.session import init_ray
    from gymrl.train.sharded import ShardedTrainer
    from gymrl.train.trainer import GRPOTrainer

    base = {"micro_batch_size": 3, "max_grad_norm": 0.002, "learning_rate": 1e-3, "dtype": "float32",
            "push_bucket_mb": 1} | train  # the weights come back in several buckets
    one = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update=base)})
    many = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update=base | {"workers": workers})})
    init_ray(one)

    single = GRPOTrainer(engineless_session(one, demo_model))
    batch = hand_made_batch(single.policy.config.vocab_size, groups, group_size=4 if groups > 1 else 2)
    initial = {name: weight.clone() for name, weight in single.policy.state_dict().items()}
    expected = single.step(batch)
    sharded = ShardedTrainer(engineless_session(many, demo_model))
    try:
        got = sharded.step(batch)
        sharded.gather()
        after = sharded.policy.state_dict()
    finally:
        for rank in sharded.ranks:
            ray.kill(rank)
    assert expected.grad_norm > base["max_grad_norm"]  # the clipping is part of what is compared
    for key in ("loss", "clip_fraction", "kl_mean", "logprob_gap", "grad_norm"):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), abs=1e-5, rel=1e-5), key
    assert got.is_stats.keys() == expected.is_stats.keys()
    for key, value in expected.is_stats.items():
        assert got.is_stats[key] == pytest.approx(value, abs=1e-5), key
    if train["beta"] > 0:
        assert expected.kl_mean == 0.0  # the policy is the reference before the step
    else:
        assert abs(expected.is_stats["is_weight_mean"] - 1.0) > 0.1  # the behaviour gap goes through TIS
    if train["is_correction"] == "none":
        assert expected.clip_fraction > 0
    moved = 0.0
    for name, weight in single.policy.state_dict().items():
        torch.testing.assert_close(after[name], weight, atol=1e-5, rtol=0, msg=name)
        moved = max(moved, float((weight - initial[name]).abs().max()))
    assert moved > 1e-4  # the step changed the weights



def test_a_sharded_push_gives_the_engine_the_trainers_logprobs(fresh_session):
    """After a step on two ranks, a push gathers the shards into the driver's policy and the engine scores a
    completion as that policy does."""
    import ray

    from gymrl.train.policy import pad_batch, token_logprobs
    from gymrl.train.sharded import ShardedTrainer

    s = fresh_session
    cfg = s.cfg
    s.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": 2, "learning_rate": 1e-2})})
    try:
        trainer = ShardedTrainer(s)
    finally:
        s.cfg = cfg
    prompt = s.runner.prompt_ids(s.envs["arithmetic"].tasks("eval")[0])
    completion = s.tokenizer.encode("<think>2+2</think><answer>4</answer>") + [s.tokenizer.eos_token_id]
    before = torch.tensor(s.pool.score([prompt + completion])[0])
    try:
        trainer.step(hand_made_batch(s.policy.config.vocab_size))
        assert trainer.push_weights() > 0
    finally:
        for rank in trainer.ranks:
            ray.kill(rank)
    assert s.pool.stats()[0].policy_version == 1
    after = torch.tensor(s.pool.score([prompt + completion])[0])
    ids, attn, _ = pad_batch([prompt], [completion], s.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = token_logprobs(s.policy, ids, attn)[0]
    assert (after - before).abs().max() > 1e-2, "the push did not change the engine's logprobs"
    assert torch.allclose(after, ours, atol=2e-3), (after - ours).abs().max()


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(demo_cfg, demo_model, tmp_path):
    """Checkpoint after one step on 2 ranks, then a second step; 3 ranks restored from the checkpoint take the same
    second step (the AdamW moments and the schedule came back). A one-process trainer refuses the checkpoint."""
    import ray

    from gymrl.models.checkpoint import load_policy
    from gymrl.session import init_ray
    from gymrl.train.checkpoint import SHARDS, CheckpointError, checkpoint_dir
    from gymrl.train.sharded import ShardedTrainer
    from gymrl.train.trainer import GRPOTrainer

    def with_train(**update):
        return demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={
            "micro_batch_size": 3, "learning_rate": 1e-3, "lr_schedule": "linear", "steps": 4, "dtype": "float32"}
            | update)})

    init_ray(demo_cfg)
    first = ShardedTrainer(engineless_session(with_train(workers=2), demo_model))
    batch = hand_made_batch(first.policy.config.vocab_size)
    try:
        first.step(batch)
        first.save_checkpoint(tmp_path, 1, {"policy_version": first.version}, keep=2)
        first.step(batch)
        first.gather()
        expected = {name: weight.clone() for name, weight in first.policy.state_dict().items()}
        expected_lr = first.learning_rate()
    finally:
        for rank in first.ranks:
            ray.kill(rank)
    folder = checkpoint_dir(tmp_path, 1)
    assert (folder / SHARDS).is_dir() and (folder / "policy" / "config.json").is_file()
    second = ShardedTrainer(engineless_session(with_train(workers=3), demo_model))
    try:
        saved = second.load_checkpoint(folder)
        assert saved["step"] == 1 and second.version == 1
        second.step(batch)
        second.gather()
        assert second.learning_rate() == pytest.approx(expected_lr)
    finally:
        for rank in second.ranks:
            ray.kill(rank)
    at_checkpoint = load_policy(folder / "policy")[0].state_dict()
    moved = 0.0
    for name, weight in second.policy.state_dict().items():
        torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=0, msg=name)
        moved = max(moved, float((weight - at_checkpoint[name]).abs().max()))
    assert moved > 1e-4  # the second step moved the weights: it is what was compared
    with pytest.raises(CheckpointError, match="written with train.workers > 1; resume it with train.workers > 1"):
        GRPOTrainer(engineless_session(with_train(), demo_model)).load_checkpoint(folder)

