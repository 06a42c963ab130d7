"""train.weight_sync: the choice of the way a push goes, and the broadcast push into a real (CPU) vLLM engine,
which on CPU runs over gloo: the same code that runs over NCCL between GPUs."""

from pathlib import Path

import pytest
import torch

from gymrl.config import load_config
from gymrl.resources import ray_gpus, trainer_gpu
from gymrl.train.policy import pad_batch, token_logprobs
from gymrl.train.weight_push import WeightPusher, WeightSyncError, choose_method

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

LOGPROB_TOL = 2e-3


def test_auto_picks_bytes_on_cpu_and_refuses_what_the_placement_cannot_do():
    assert choose_method("auto", None, [None]) == "bytes"  # the trainer on CPU
    assert choose_method("broadcast", None, [None, None]) == "broadcast"
    gpu = "GPU-1"  # the trainer's
    assert choose_method("auto", gpu, ["GPU-1"]) == "ipc"
    assert choose_method("auto", gpu, ["GPU-0", "GPU-2"]) == "broadcast"
    assert choose_method("auto", gpu, ["GPU-0", "GPU-1"]) == "bytes"  # neither ipc nor NCCL reaches both
    with pytest.raises(WeightSyncError, match="ipc needs every engine on the trainer's GPU"):
        choose_method("ipc", gpu, ["GPU-0"])
    with pytest.raises(WeightSyncError, match="NCCL refuses two members on one GPU"):
        choose_method("broadcast", gpu, ["GPU-1"])


@pytest.mark.parametrize(("gpus", "engines", "trainer", "ray"), [(2, 1, 1, 1), (1, 1, 0, None), (4, 2, 3, 3),
                                                                 (2, 2, 0, None)])
def test_the_trainer_takes_the_last_gpu_when_the_engines_leave_one(gpus, engines, trainer, ray):
    cfg = load_config(DEMO_CONFIG, {"engine.device": "cuda", "engine.num_engines": engines, "train.device": "cuda",
                                    "engine.dtype": "bfloat16", "train.dtype": "bfloat16"})
    assert trainer_gpu(cfg, gpus) == trainer
    assert ray_gpus(cfg, gpus) == ray  # Ray hands out GPUs 0 .. ray - 1: never the trainer's own
    assert trainer_gpu(load_config(DEMO_CONFIG), gpus) is None


def test_a_broadcast_push_gives_the_engine_the_trainers_logprobs(fresh_session):
    s = fresh_session
    task = s.envs["arithmetic"].tasks("eval")[0]
    prompt = s.runner.prompt_ids(task)
    completion = s.tokenizer.encode("<think>2+2</think><answer>4</answer>") + [s.tokenizer.eos_token_id]
    ids, attn, _ = pad_batch([prompt], [completion], s.tokenizer.pad_token_id)
    before = torch.tensor(s.pool.score([prompt + completion])[0])
    with torch.no_grad():
        for p in s.policy.parameters():
            p.mul_(1.05)
        ours = token_logprobs(s.policy, ids, attn)[0]

    pusher = WeightPusher(s.pool, "broadcast", torch.device("cpu"), s.cfg.engine.dtype)
    for version in (1, 2):  # the second push reuses the group formed by the first
        assert pusher.push(s.policy, None, version, recompute_kv=False) > 0
        assert pusher.method == "broadcast" and pusher._group is not None
        assert s.pool.stats()[0].policy_version == version
        after = torch.tensor(s.pool.score([prompt + completion])[0])
        assert (after - before).abs().max() > 1e-2, "the push did not change the engine's logprobs"
        assert torch.allclose(after, ours, atol=LOGPROB_TOL), (after - ours).abs().max()
    # A restarted engine is loaded from the replayed blob of the newest push, not the broadcast payload.
    replay = s.pool._weights()
    assert replay[1:] == (2, False)
