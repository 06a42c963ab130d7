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


@pytest.mark.parametrize("key, value", [("lora", {"r": 4}), ("mtp_loss_weight", 0.1)])
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
    # the ranks recompute their activations (train.activation_checkpointing), the one process keeps them; both
    # compile their layers (train.compile: the ranks before FSDP2 shards them)
    ({"loss_type": "grpo", "is_correction": "none", "beta": 0.1, "activation_checkpointing": True, "compile": True},
     2, 3),
    ({"loss_type": "bnpo", "is_correction": "tis", "beta": 0.0}, 3, 1),  # 2 sequences: one rank has none
], ids=["dapo-tis", "grpo-kl-checkpointing-compiled", "bnpo-idle-rank"])
def test_sharded_ranks_take_the_one_process_step(demo_cfg, demo_model, train, workers, groups):
    """The same hand-made batch through workers > 1 (FSDP2, gloo) and workers=1: the same loss, stats, gradient
    norm (clipping active) and updated weights, within 1e-5 in float32."""

    from gymrl.session import init_ray
    from gymrl.train.sharded import ShardedTrainer
    from gymrl.train.trainer import GRPOTrainer

    base = {"micro_batch_size": 3, "max_grad_norm": 0.002, "learning_rate": 1e-3, "dtype": "float32",
            "push_bucket_mb": 1} | train  # the weights come back in several buckets
    one = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update=base | {"activation_checkpointing": False})})
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
        sharded.close()
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
    # AdamW's first step moves each weight by about +-lr whatever its gradient's size, so a gradient element near 0 that
    # compiled kernels under FSDP2 round otherwise flips that weight's move (up to 2 lr): with train.compile, at least
    # 95% of every tensor's elements (a wrong gradient would flip about half) and all within 2 lr; else all within 1e-5
    compiled = bool(train.get("compile"))
    moved = 0.0
    for name, weight in single.policy.state_dict().items():
        if compiled:
            agree = float(((after[name] - weight).abs() <= 1e-5).float().mean())
            assert agree >= 0.95, (name, agree)
        torch.testing.assert_close(after[name], weight, atol=2 * base["learning_rate"] if compiled else 1e-5, rtol=0,
                                   msg=name)
        moved = max(moved, float((weight - initial[name]).abs().max()))
    assert moved > 1e-4  # the step changed the weights


@pytest.mark.parametrize("way", ["bytes", "broadcast"])
def test_a_sharded_push_gives_the_engine_the_trainers_logprobs(fresh_session, way):
    """After a step on two ranks, a push streams the shards into the engine bucket by bucket (through the driver's
    policy by bytes; from rank 0 by broadcast, over gloo on CPU as over NCCL between GPUs), and the engine scores a
    completion as the driver's policy does."""

    from gymrl.train.policy import pad_batch, token_logprobs
    from gymrl.train.sharded import ShardedTrainer

    s = fresh_session
    cfg = s.cfg
    s.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": 2, "learning_rate": 1e-2,
                                                                      "push_bucket_mb": 1, "weight_sync": way})})
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
        pushed = trainer.pusher.last
    finally:
        trainer.close()
    assert pushed["buckets"] >= 2, pushed  # the demo model's 2 MB of float32 weights, 1 MB a bucket
    assert trainer.pusher.method == way
    assert s.pool.stats()[0].policy_version == 1
    after = torch.tensor(s.pool.score([prompt + completion])[0])
    ids, attn, _ = pad_batch([prompt], [completion], s.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = token_logprobs(s.policy, ids, attn)[0]
    assert (after - before).abs().max() > 1e-2, "the push did not change the engine's logprobs"
    assert torch.allclose(after, ours, atol=2e-3), (after - ours).abs().max()


def resume_cfg(demo_cfg, workers: int):
    """The demo's config for the checkpoint tests: float32, a linear schedule (the learning rate changes each step)."""
    return demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={
        "micro_batch_size": 3, "learning_rate": 1e-3, "lr_schedule": "linear", "steps": 4, "dtype": "float32",
        "workers": workers})})


def start_trainer(demo_cfg, demo_model, workers: int):
    """The one-process trainer (workers=1) or the sharded one on ``workers`` ranks."""
    from gymrl.train.sharded import ShardedTrainer
    from gymrl.train.trainer import GRPOTrainer

    kind = ShardedTrainer if workers > 1 else GRPOTrainer
    return kind(engineless_session(resume_cfg(demo_cfg, workers), demo_model))


def trainer_weights(trainer) -> dict[str, torch.Tensor]:
    if hasattr(trainer, "gather"):
        trainer.gather()
    return {name: weight.detach().clone() for name, weight in trainer.policy.state_dict().items()}


@pytest.fixture(scope="module")
def checkpointed(demo_cfg, demo_model, tmp_path_factory):
    """``run(workers)``: a trainer of that kind takes one step on the hand-made batch, checkpoints, and takes a second
    step on it; the checkpoint's folder, the weights and the learning rate after the second step. Each kind runs
    once per module."""
    from gymrl.session import init_ray
    from gymrl.train.checkpoint import checkpoint_dir

    init_ray(demo_cfg)
    runs = {}

    def run(workers: int):
        if workers not in runs:
            run_dir = tmp_path_factory.mktemp(f"wrote{workers}")
            trainer = start_trainer(demo_cfg, demo_model, workers)
            try:
                batch = hand_made_batch(trainer.policy.config.vocab_size)
                trainer.step(batch)
                trainer.save_checkpoint(run_dir, 1, {"policy_version": trainer.version}, keep=2)
                trainer.step(batch)
                runs[workers] = (checkpoint_dir(run_dir, 1), trainer_weights(trainer), trainer.learning_rate(), batch)
            finally:
                trainer.close()
        return runs[workers]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("wrote, resumes", [(2, 3), (2, 2), (2, 1), (1, 2)],
                         ids=["2-to-3-ranks", "2-to-2-ranks", "sharded-to-one-process", "one-process-to-sharded"])
def test_a_checkpoint_resumes_on_another_number_of_ranks(demo_cfg, demo_model, checkpointed, wrote, resumes):
    """Checkpoint after one step, then a second step; a trainer of another number of ranks (or of the other kind)
    restored from the checkpoint takes the same second step: the AdamW moments and the schedule came back. Within
    1e-5 (float32) across numbers of ranks; bit for bit on the same number."""
    from gymrl.models.checkpoint import load_policy
    from gymrl.train.checkpoint import SHARDS

    folder, expected, expected_lr, batch = checkpointed(wrote)
    assert (folder / SHARDS).is_dir() == (wrote > 1) and (folder / "policy" / "config.json").is_file()
    trainer = start_trainer(demo_cfg, demo_model, resumes)
    try:
        saved = trainer.load_checkpoint(folder)
        assert saved["step"] == 1 and trainer.version == 1
        trainer.step(batch)
        got, lr = trainer_weights(trainer), trainer.learning_rate()
    finally:
        trainer.close()
    assert lr == pytest.approx(expected_lr, rel=1e-12)
    at_checkpoint = load_policy(folder / "policy")[0].state_dict()
    assert got.keys() == expected.keys()
    moved = 0.0
    for name, weight in got.items():
        if resumes == wrote:
            assert torch.equal(weight, expected[name]), (name, float((weight - expected[name]).abs().max()))
        else:
            torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=0, msg=name)
        moved = max(moved, float((weight - at_checkpoint[name]).abs().max()))
    assert moved > 1e-4  # the second step moved the weights: it is what was compared


@pytest.mark.slow
def test_gymrl_export_writes_a_sharded_checkpoints_policy(checkpointed, tmp_path):
    """``gymrl export`` of a sharded trainer's checkpoint: a plain HF folder (no shards) with the checkpoint's
    weights."""
    from typer.testing import CliRunner

    from gymrl.cli import app
    from gymrl.models.checkpoint import load_policy

    folder = checkpointed(2)[0]
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", str(folder), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and not (out / "shards").exists()
    exported = load_policy(out)[0].state_dict()
    saved = load_policy(folder / "policy")[0].state_dict()
    assert exported.keys() == saved.keys()
    for name, weight in saved.items():
        assert torch.equal(exported[name], weight), name


def test_what_one_trainer_kind_cannot_resume_of_the_other_is_refused(demo_model, tmp_path):
    """The sharded trainer trains no LoRA adapters and no MTP layer: a one-process checkpoint that has them is refused
    on workers > 1, a sharded one under train.lora or an MTP optimizer group on workers=1, each naming the key; a
    sharded checkpoint whose shards are broken is a CheckpointError naming the checkpoint."""
    from gymrl.config import LoraConfig
    from gymrl.models.checkpoint import load_policy
    from gymrl.models.lora import apply_lora
    from gymrl.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    policy, tokenizer = load_policy(demo_model)
    params = list(policy.parameters())
    two_groups = torch.optim.AdamW([{"params": params[:-1]}, {"params": params[-1:]}])  # as with an MTP group
    scheduler = torch.optim.lr_scheduler.LambdaLR(two_groups, lambda step: 1.0)
    mtp = save_checkpoint(tmp_path / "mtp", 1, policy, tokenizer, two_groups, scheduler, {})
    with pytest.raises(CheckpointError, match=r"MTP layer \(train.mtp_loss_weight > 0\).*resume it with "
                                              "train.workers=1"):
        load_checkpoint(mtp, policy, None, None, sharded=True)
    sharded = save_checkpoint(tmp_path / "sharded", 1, policy, tokenizer, None, None,
                              {"rank_scheduler": scheduler.state_dict()}, write_shards=lambda folder: folder.mkdir())
    with pytest.raises(CheckpointError, match="resume it with train.mtp_loss_weight 0"):
        load_checkpoint(sharded, policy, two_groups, scheduler)
    one_group = torch.optim.AdamW(policy.parameters())
    with pytest.raises(CheckpointError, match=f"cannot restore checkpoint '{sharded}'"):  # shards/ has no shards
        load_checkpoint(sharded, policy, one_group, torch.optim.lr_scheduler.LambdaLR(one_group, lambda step: 1.0))
    lora = apply_lora(policy, LoraConfig(r=2))
    with pytest.raises(CheckpointError, match="resume it without train.lora"):
        load_checkpoint(sharded, lora, None, None)
    adapters = save_checkpoint(tmp_path / "lora", 1, lora, tokenizer, None, None, {})
    with pytest.raises(CheckpointError, match=r"LoRA adapters \(train.lora\).*resume it with train.workers=1"):
        load_checkpoint(adapters, lora, None, None, sharded=True)


def test_activation_checkpointing_takes_the_same_step(demo_cfg, demo_model):
    """train.activation_checkpointing recomputes the layers' activations in the backward pass: the one-process
    trainer's step (loss, gradient norm, weights) is the one it takes without."""
    from gymrl.train.trainer import GRPOTrainer

    results = []
    for checkpointing in (False, True):
        cfg = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={
            "dtype": "float32", "micro_batch_size": 4, "activation_checkpointing": checkpointing})})
        trainer = GRPOTrainer(engineless_session(cfg, demo_model))
        assert trainer.policy.is_gradient_checkpointing == checkpointing
        result = trainer.step(hand_made_batch(trainer.policy.config.vocab_size))
        results.append((result, trainer.policy.state_dict()))
    (plain, plain_weights), (recomputed, recomputed_weights) = results
    assert recomputed.loss == pytest.approx(plain.loss, abs=1e-6) and plain.grad_norm > 0
    assert recomputed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(recomputed_weights[name], weight, atol=1e-6, rtol=0, msg=name)
