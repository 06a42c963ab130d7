"""Multi-environment task sampling and per-environment metrics (no engine needed)."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from gymrl.config import load_config
from gymrl.envs.registry import load_environment
from gymrl.rollout.runner import Rollout, RolloutBatch
from gymrl.train.loop import TaskSampler
from gymrl.train.trainer import per_env

ROOT = Path(__file__).resolve().parents[1]


def fake_session(cfg):
    return SimpleNamespace(cfg=cfg, envs={e.name: load_environment(e.name, e.args) for e in cfg.envs})


def test_multi_env_config_is_valid_and_samples_by_weight():
    cfg = load_config(ROOT / "configs" / "multi_env.yaml")
    assert [e.name for e in cfg.envs] == ["arithmetic", "math", "sudoku"]
    sampler = TaskSampler(fake_session(cfg), seed=0, per_step=16)
    counts = Counter(t.env for b in range(200) for t in sampler.batch(b))
    total = sum(counts.values())
    assert abs(counts["arithmetic"] / total - 0.5) < 0.05
    assert abs(counts["math"] / total - 0.25) < 0.05 and abs(counts["sudoku"] / total - 0.25) < 0.05


def test_sampler_is_deterministic_and_distinct_within_an_env():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    sampler = TaskSampler(fake_session(cfg), seed=3, per_step=16)
    a = [t.id for t in sampler.batch(5)]
    b = [t.id for t in TaskSampler(fake_session(cfg), seed=3, per_step=16).batch(5)]  # batch 5 without 0-4
    assert a == b and len(set(a)) == 16
    assert [sampler.task_of(5 * 16 + i).id for i in range(16)] == a
    assert a != [t.id for t in sampler.batch(6)]
    held_out = {t.id for t in load_environment("arithmetic").tasks("eval")}
    assert not held_out & set(a)


def test_per_env_means():
    def rollout(env, reward):
        return Rollout("t", env, [1], [2], [1], [-0.1], "x", "stop", reward, "", 0)

    batch = RolloutBatch([rollout("a", 1.0), rollout("a", 0.0), rollout("b", 1.0)], 1, 0.0, 0.0)
    assert per_env(batch, "reward") == {"reward/a": 0.5, "reward/b": 1.0}


def test_duplicate_env_is_rejected():
    import pytest

    from gymrl.config import ConfigError

    with pytest.raises(ConfigError, match="each environment may appear once"):
        load_config(ROOT / "configs" / "demo.yaml", {"envs": [{"name": "math"}, {"name": "math"}]})


def test_learning_rate_schedules():
    from gymrl.train.trainer import lr_factor

    assert [lr_factor("constant", 0, 10, s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor("linear", 3, 10, s) for s in range(3)] == [0.25, 0.5, 0.75]  # warm-up from near 0
    assert lr_factor("linear", 0, 10, 5) == 0.5 and lr_factor("linear", 0, 10, 10) == 0.0
    assert lr_factor("cosine", 0, 10, 0) == 1.0 and abs(lr_factor("cosine", 0, 10, 5) - 0.5) < 1e-12
