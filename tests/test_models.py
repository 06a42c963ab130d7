"""Tokenizer, tiny-model build (deterministic, cached, atomic) and checkpoint loading.

One small build is shared by the module; the default spec's longer warm-up is measured outside the
suite (see the report in the built folder's warmup.json).
"""

import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file

import gymrl.models.tiny as tiny
from environments.arithmetic import Tasks
from gymrl.envs.base import Environment
from gymrl.models.checkpoint import load_policy, save_policy
from gymrl.models.spec import TinyModelSpec
from gymrl.models.tiny import build_tiny_model, is_complete, model_dir_name
from gymrl.models.tokenizer import build_tokenizer
from rewards.arithmetic import score_arithmetic

SMALL = TinyModelSpec(warmup_examples=2000, warmup_steps=150, warmup_batch_size=32, warmup_lr=5e-3)
FORMAT = re.compile(r"^<think>(\d+[+-]\d+)</think><answer>(-?\d+)</answer>$")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain little from a second thread, and on a busy 2-core machine OpenMP threads that
    wait on each other make each step up to 25x slower; one thread keeps the suite fast either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env():
    return Environment("arithmetic", Tasks())


@pytest.fixture(scope="module")
def built(env, tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return cache, build_tiny_model(SMALL, env, cache)


@pytest.fixture(scope="module")
def policy(built):
    return load_policy(built[1])


@pytest.fixture(scope="module")
def tokenizer(env):
    corpus = [f"<|im_start|>user\n{ex.messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n{ex.response}<|im_end|>\n"
              for ex in env.warmup_examples(300, 0)]
    return build_tokenizer(corpus)


def test_tokenizer_round_trips_any_text(tokenizer):
    for text in ["What is 12+345?", "héllo  wörld\n\t😀 <think>x</think><answer>-7</answer>", "<|im_end|>\n"]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer) == 384


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer("<answer>1234</answer>", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4"]


def test_special_tokens_and_think_tags_survive_skip_special(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("<think>1+2</think><answer>3</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<think>") and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>1+2</think><answer>3</answer>"


def test_tool_call_tags_are_atomic_only_when_the_corpus_has_tool_calls(tokenizer):
    corpus = ["<tool_call>\n<function=f>\n</function>\n</tool_call> and <answer>1</answer>"] * 20
    with_tools = build_tokenizer(corpus)
    ids = with_tools("<tool_call>x</tool_call>", add_special_tokens=False)["input_ids"]
    assert ids[0] == with_tools.convert_tokens_to_ids("<tool_call>") == 5 and ids[-1] == 6
    assert with_tools.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"  # kept, like <think>
    assert len(with_tools) == 384
    assert "<tool_call>" not in tokenizer.get_vocab()  # a corpus without tool calls: the tokenizer as before


def test_chat_template_renders_tools_as_one_short_line(tokenizer):
    tools = [{"type": "function", "function": {"name": "kv_set", "parameters": {"properties": {"key": {}, "value": {}}}}},
             {"type": "function", "function": {"name": "now"}}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, tokenize=False)
    assert text == "<|im_start|>system\nTools: kv_set(key, value) now()<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_matches_nemotron_format(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    base = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
    render = lambda **kw: tokenizer.apply_chat_template(messages, tokenize=False, **kw)  # noqa: E731
    assert render() == base
    assert render(add_generation_prompt=True) == base + "<|im_start|>assistant\n"
    assert render(add_generation_prompt=True, enable_thinking=True) == base + "<|im_start|>assistant\n"
    assert render(add_generation_prompt=True, enable_thinking=False) == base + "<|im_start|>assistant\n<think></think>"


def test_tokenizer_is_deterministic(env):
    corpus = [ex.response for ex in env.warmup_examples(500, 3)]
    assert build_tokenizer(corpus).backend_tokenizer.to_str() == build_tokenizer(corpus).backend_tokenizer.to_str()


def test_spec_rejects_bad_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        TinyModelSpec(head_dim=16)
    with pytest.raises(ValueError, match="extra"):
        TinyModelSpec(hidden=3)


def test_qwen2_cache_names_did_not_move(env):
    # Names of builds made before deepseek_v3 existed: a qwen2 spec must still find them in the cache.
    assert model_dir_name(TinyModelSpec(), env) == "tiny-8644e1889bb2"
    assert model_dir_name(SMALL, env) == "tiny-a039cd5c2cae"


def test_spec_fields_belong_to_their_architecture():
    deepseek = TinyModelSpec(architecture="deepseek_v3")
    assert (deepseek.tie_word_embeddings, deepseek.warmup_steps, deepseek.warmup_batch_size) == (False, 600, 32)
    assert TinyModelSpec(architecture="deepseek_v3", warmup_steps=5).warmup_steps == 5
    with pytest.raises(ValueError, match="mtp_steps applies to architecture deepseek_v3 and nemotron_h only"):
        TinyModelSpec(mtp_steps=10)
    with pytest.raises(ValueError, match="head_dim applies to architecture qwen2 and nemotron_h only"):
        TinyModelSpec(architecture="deepseek_v3", head_dim=32)
    for spec in (TinyModelSpec(), deepseek):  # a run's saved config.json holds every field: --resume reads it back
        assert TinyModelSpec.model_validate_json(spec.model_dump_json()) == spec
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        TinyModelSpec(architecture="deepseek_v3", tie_word_embeddings=True)


def test_build_writes_a_complete_checkpoint(built):
    cache, path = built
    assert path.parent == cache and path.name.startswith("tiny-") and is_complete(path)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp dirs left behind
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["hidden_size"] == 128
    assert config["eos_token_id"] == 2
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"] and tok_config["eos_token"] == "<|im_end|>"
    assert all(t.dtype == torch.float32 for t in load_file(path / "model.safetensors").values())


def test_build_is_deterministic(env, tmp_path):
    spec = TinyModelSpec(warmup_examples=200, warmup_steps=4, warmup_batch_size=16)
    a = build_tiny_model(spec, env, tmp_path / "a")
    b = build_tiny_model(spec, env, tmp_path / "b")
    assert a.name == b.name
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = build_tiny_model(spec.model_copy(update={"seed": 1}), env, tmp_path / "a")
    assert other != a and (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_cache_hit_does_not_rebuild(built, env, monkeypatch):
    cache, path = built

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "_build_into", boom)
    started = time.perf_counter()
    assert build_tiny_model(SMALL, env, cache) == path
    assert time.perf_counter() - started < 1.0
    # a different env config is a different model
    with pytest.raises(AssertionError, match="rebuilt"):
        build_tiny_model(SMALL, Environment("arithmetic", Tasks(warmup_correct=0.5)), cache)


def test_failed_build_leaves_nothing(env, tmp_path, monkeypatch):
    def crash(spec, env, out, *device):
        (out / "config.json").write_text("{}")
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(tiny, "_build_into", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_tiny_model(SMALL, env, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_policy_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_policy(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path.name}.*config.json"):
        load_policy(tmp_path)


def test_save_policy_round_trips_and_replaces(policy, tmp_path):
    model, tokenizer = policy
    target = tmp_path / "ckpt"
    save_policy(model, tokenizer, target)
    save_policy(model, tokenizer, target)  # over an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    again, tok = load_policy(target)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok.chat_template == tokenizer.chat_template


def test_warm_model_answers_in_format(policy, env):
    model, tokenizer = policy
    tasks = env.tasks("eval")[:12]
    for task in tasks:
        prompt = tokenizer.apply_chat_template(task.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(prompt) :].tolist()
        assert new[-1] == tokenizer.eos_token_id, "the model must learn to stop"
        text = tokenizer.decode(new, skip_special_tokens=True)
        match = FORMAT.match(text)
        assert match and match.group(1) == task.id, text
        reason = score_arithmetic(text, task.row["expected"]).reason
        assert reason == "correct" or reason.startswith("answered "), reason
