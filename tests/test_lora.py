"""LoRA policies (real peft): only the adapters train, the merged weights are exactly peft's merge without
touching the model, a push of them into the live vLLM engine gives the trainer's logprobs, and a run's
checkpoint is a plain HF model."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gymrl.config import ConfigError, LoraConfig, load_config
from gymrl.models.checkpoint import load_policy, save_policy
from gymrl.models.lora import apply_lora, check_targets, merged_state_dict
from gymrl.train.loop import train
from gymrl.train.policy import pad_batch, token_logprobs
from gymrl.train.trainer import GRPOTrainer

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# As in tests/test_engine.py: engine and trainer agree to ~1e-6 in float32; one step moves logprobs > 1e-2.
LOGPROB_TOL = 1e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def plain(demo_model):
    model, tokenizer = load_policy(demo_model)
    return model, tokenizer


def _with_adapter_weights(model, seed: int = 0):
    """A LoRA policy whose adapters are nonzero (peft starts B at 0, so a fresh adapter merges to W)."""
    lora = apply_lora(model, LoraConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return lora


def test_only_the_adapters_train(plain):
    model, _ = plain
    total = sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, LoraConfig())
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n for n in dict(lora.named_parameters()) if ".lora_" in n} == trainable
    # Every attention and MLP projection of every layer got an adapter (A and B each).
    layers = model.config.num_hidden_layers
    assert len(trainable) == 2 * len(TARGETS) * layers
    assert sum(lora.get_parameter(n).numel() for n in trainable) < 0.5 * total


def test_merged_state_dict_is_peft_merge_and_leaves_the_model_alone(plain):
    model, _ = plain
    names = list(model.state_dict())
    assert merged_state_dict(model).keys() == model.state_dict().keys()  # a plain model: its own state dict
    lora = _with_adapter_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # peft's names: base_layer, lora_A/B

    merged = merged_state_dict(lora)
    assert list(merged) == names
    expected = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert expected.keys() == merged.keys()
    for name in names:
        assert torch.allclose(merged[name], expected[name], atol=1e-6, rtol=0), name
    adapted = [n for n in names if n.endswith(tuple(f"{t}.weight" for t in TARGETS))]
    assert len(adapted) == len(TARGETS) * model.config.num_hidden_layers
    base = {k.replace(".base_layer.", "."): v for k, v in before.items() if ".lora_" not in k}
    assert base.keys() == merged.keys()
    assert all((merged[n] - base[n]).abs().max() > 1e-3 for n in adapted)  # the deltas are in
    # The model itself is untouched: same tensors, bit for bit, and its forward still applies the adapters.
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.merged for m in lora.modules() if hasattr(m, "merged_adapters"))


def test_saved_lora_policy_is_a_plain_merged_checkpoint(plain, tmp_path):
    model, tokenizer = plain
    lora = _with_adapter_weights(model)
    merged = merged_state_dict(lora)
    save_policy(lora, tokenizer, tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", dtype=torch.float32, local_files_only=True)
    assert type(loaded) is type(model)
    state = loaded.state_dict()
    assert state.keys() == merged.keys()
    assert all(torch.equal(state[k], merged[k]) for k in merged)
    ids = torch.tensor([tokenizer.encode("<think>3+5</think><answer>8</answer>")])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-5)


def test_lora_config_validates_and_bad_targets_name_the_key(plain):
    cfg = load_config(DEMO_CONFIG, {"train.lora.r": 8, "train.lora.alpha": 16})
    assert cfg.train.lora == LoraConfig(r=8, alpha=16)
    assert load_config(DEMO_CONFIG).train.lora is None
    with pytest.raises(ConfigError, match=r"unknown key 'train.lora.rank'"):
        load_config(DEMO_CONFIG, {"train.lora.rank": 8})
    model, _ = plain
    check_targets(model, LoraConfig())
    check_targets(model, LoraConfig(target_modules=["q_proj", "model.layers.0.mlp.down_proj"]))
    # No name matches, or one listed name matches nothing (a typo would silently train fewer modules).
    for targets in (["query", "value"], ["q_proj", "gate_prj"]):
        with pytest.raises(ValueError, match=r"train.lora.target_modules: .* match no linear module") as err:
            check_targets(model, LoraConfig(target_modules=targets))
        assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(err.value)
    # The tiny model ties lm_head to the embeddings: a delta on it could not be pushed or saved apart.
    with pytest.raises(ValueError, match=r"train.lora.target_modules: 'lm_head' is the output head, tied"):
        check_targets(model, LoraConfig(target_modules=["q_proj", "lm_head"]))


def _lora_session(s, **train):
    """The shared session with train.lora on and a copy of its policy: peft injects adapters into the model it
    wraps, and the shared policy must stay plain for the other tests."""
    cfg = s.cfg.model_copy(update={"train": s.cfg.train.model_copy(update={"lora": LoraConfig(), **train})})
    return dataclasses.replace(s, cfg=cfg, policy=copy.deepcopy(s.policy))


def test_pushed_merged_weights_give_the_engine_the_trainers_logprobs(fresh_session):
    s = fresh_session
    task = s.envs["arithmetic"].tasks("eval")[0]
    prompt = s.runner.prompt_ids(task)
    completion = s.tokenizer.encode("<think>1+1</think><answer>2</answer>") + [s.tokenizer.eos_token_id]
    sequence = prompt + completion
    ids, attn, mask = pad_batch([prompt], [completion], s.tokenizer.pad_token_id)
    before = torch.tensor(s.pool.score([sequence])[0])

    trainer = GRPOTrainer(_lora_session(s, learning_rate=1e-2))
    with torch.no_grad():  # a fresh adapter is the identity
        assert torch.allclose(token_logprobs(trainer.policy, ids, attn)[0], before, atol=LOGPROB_TOL)
    # One step of the trainer's own optimizer: raise the likelihood of this completion.
    loss = -(token_logprobs(trainer.policy, ids, attn) * mask).sum()
    loss.backward()
    trainer.optimizer.step()
    trainer.version += 1
    assert trainer.push_weights() > 0
    assert s.pool.stats()[0].policy_version == 1

    with torch.no_grad():
        ours = token_logprobs(trainer.policy, ids, attn)[0]
    after = torch.tensor(s.pool.score([sequence])[0])  # every prompt and completion token
    assert (after - before).abs().max() > 1e-2, "the push did not change the engine's logprobs"
    assert torch.allclose(after, ours, atol=LOGPROB_TOL), (after - ours).abs().max()
    # Tokens the engine samples now carry the merged policy's logprobs.
    batch = s.runner.run(s.envs["arithmetic"].tasks("train")[:2], 4, s.cfg.sampling, trainer.version)
    for r in batch.rollouts:
        rid, rattn, rmask = pad_batch([r.prompt_ids], [r.completion_ids], s.tokenizer.pad_token_id)
        with torch.no_grad():
            lp = token_logprobs(trainer.policy, rid, rattn)[0][rmask[0].bool()]
        assert torch.allclose(lp, torch.tensor(r.logprobs), atol=LOGPROB_TOL), (lp - torch.tensor(r.logprobs)).abs().max()


def test_a_short_lora_run_saves_a_plain_merged_checkpoint(fresh_session, tmp_path):
    """`gymrl train` with train.lora, 2 steps on the demo: the adapters learn, only the adapted weights move,
    and the checkpoint loads with plain transformers."""
    s = _lora_session(fresh_session, steps=2, prompts_per_step=4)
    s.cfg = s.cfg.model_copy(update={"run_dir": tmp_path / "run", "eval": s.cfg.eval.model_copy(update={"max_tasks": 4})})
    summary = train(s)
    assert summary["policy_version"] == 2
    checkpoint = tmp_path / "run" / "checkpoint"
    assert not (checkpoint / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True).state_dict()
    initial = fresh_session.initial_state
    assert saved.keys() == initial.keys()
    moved = {k for k in saved if not torch.equal(saved[k], initial[k])}
    assert moved == {k for k in saved if k.endswith(tuple(f"{t}.weight" for t in TARGETS))}, moved


def test_a_lora_checkpoint_resumes_its_adapters_and_exports_merged(plain, tmp_path):
    """The resumable state holds the adapters (the merged HF folder cannot be split back into base + adapters);
    loading it into a fresh LoRA policy on the base model gives the same merged weights."""
    from gymrl.train.checkpoint import load_checkpoint, save_checkpoint

    model, tokenizer = plain
    trained = _with_adapter_weights(copy.deepcopy(model), seed=3)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad])
    path = save_checkpoint(tmp_path, 1, trained, tokenizer, optimizer, None, {})
    fresh = apply_lora(copy.deepcopy(model), LoraConfig())
    load_checkpoint(path, fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]), None)
    for (name, a), b in zip(merged_state_dict(fresh).items(), merged_state_dict(trained).values()):
        assert torch.equal(a, b), name
    exported, _ = load_policy(path / "policy")  # the HF folder is the merged model
    for (name, a), b in zip(exported.state_dict().items(), merged_state_dict(trained).values()):
        torch.testing.assert_close(a, b, msg=name)
