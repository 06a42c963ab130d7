"""Nemotron-H's MTP layer (NVIDIA Nemotron-3): the torch twin of vLLM 0.22's ``NemotronHMTP``, trained on the
frozen tiny model by ``gymrl.models.mtp`` like the DeepSeek-V3 one.

vLLM (vllm/model_executor/models/nemotron_h_mtp.py, 0.22.0) builds one MTP step from the config's
``mtp_hybrid_override_pattern`` (transformers: ``mtp_layers_block_type``), one sub-layer per character, ``*`` an
attention layer and ``E`` a MoE layer (any other character is NotImplementedError there). At position t, with h_t
the target model's hidden state after its final norm ``norm_f`` and e the embedding of token t+1 (the target's
embedding, which the proposer shares: llm_base_proposer ``_maybe_share_embeddings``, "Detected MTP model"):

    x = eh_proj(cat([enorm(e), hnorm(h_t)]))         first sub-layer, ``has_start_projections``: embedding FIRST
    x = x + mixer_i(norm_i(x))                        every sub-layer (pre-norm; vLLM carries x as ``residual``
                                                      and adds it in the next ``norm(h, residual)``)
    out = final_layernorm(x)                          last sub-layer, ``has_end_norm``: ``hidden + residual``, norm
    logits = lm_head(out)                             ``NemotronHMTP.compute_logits``: the target's lm_head (shared)

and ``out`` is also the hidden state the next draft step starts from (llm_base_proposer.propose:
``hidden_states = ret_hidden_states``). Unlike DeepSeek's MTP, position 0's embedding is NOT zeroed, and no
rotary embedding exists anywhere (Nemotron-H attention has no position encoding). The mixers are transformers'
own Nemotron-H modules, whose computation is vLLM's:

- attention (``NemotronHAttention``): q/k/v/o projections without bias, causal softmax attention, scale
  head_dim**-0.5, no RoPE; vLLM fuses q/k/v into ``qkv_proj`` when loading (``stacked_params_mapping``).
- MoE (``NemotronHMoE``): router logits in float32 (vLLM ``GateLinear(force_fp32_compute=True)``), sigmoid
  scores, top-k chosen on scores + ``e_score_correction_bias`` but weighted by the plain scores, renormalised
  (``norm_topk_prob``), times ``routed_scaling_factor`` (vLLM: ``FusedMoE(scoring_func="sigmoid",
  use_grouped_topk=True, e_score_correction_bias=..., renormalize=norm_topk_prob)``, fused_moe/router/
  grouped_topk_router.py ``grouped_topk``); experts are non-gated ``down(relu(up(x))**2)`` (vLLM
  ``is_act_and_mul=False``, ``activation_without_mul("relu2")``); plus one shared expert of the same kind
  (vLLM: ``moe_shared_expert_intermediate_size * n_shared_experts`` wide, so the build keeps n_shared_experts 1).
- norms: ``NemotronHRMSNorm`` with ``layer_norm_epsilon`` (vLLM ``RMSNorm``).

Checkpoint names are ``mtp.layers.{i}.*`` (vLLM's ``NemotronHMTP.load_weights`` maps ``mtp.layers.`` to its
``model.layers.``): ``layers.0`` carries ``enorm``, ``hnorm``, ``eh_proj``; the last carries ``final_layernorm``;
each has ``norm`` and ``mixer.*`` named as in the main model's blocks, experts one per expert
(``mixer.experts.{e}.up_proj.weight``, ``.down_proj.weight``), as ``save_pretrained`` writes them.
"""

import torch
from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHAttention, NemotronHMoE, NemotronHRMSNorm

from gymrl.models.mtp_deepseek import causal_mask, stack_experts  # helpers both families' layers use

# vLLM's pattern characters (NemotronHMultiTokenPredictor) and transformers' layer-type names for them.
MIXERS = {"full_attention": NemotronHAttention, "moe": NemotronHMoE}


class NemotronHMTPBlock(nn.Module):
    """One sub-layer: vLLM's ``NemotronHMTPAttentionDecoderLayer`` or ``NemotronHMTPMoEDecoderLayer``."""

    def __init__(self, config, kind: str, layer_idx: int, first: bool, last: bool):
        super().__init__()
        if kind not in MIXERS:
            raise ValueError(f"Nemotron-H MTP layer type {kind!r}: vLLM builds only {sorted(MIXERS)}")
        self.kind = kind
        eps = config.layer_norm_epsilon
        if first:  # has_start_projections
            self.enorm = NemotronHRMSNorm(config.hidden_size, eps=eps)
            self.hnorm = NemotronHRMSNorm(config.hidden_size, eps=eps)
            self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=eps)
        self.mixer = MIXERS[kind](config, layer_idx=layer_idx)
        if last:  # has_end_norm
            self.final_layernorm = NemotronHRMSNorm(config.hidden_size, eps=eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """vLLM's forward of the sub-layer, with its (hidden, residual) pair: ``norm(h, residual)`` is vLLM's
        fused add-and-norm, which returns (norm(h + residual), h + residual)."""
        if hasattr(self, "eh_proj"):
            hidden = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        residual = hidden if residual is None else hidden + residual
        hidden = self.norm(residual)
        if self.kind == "full_attention":
            hidden, _ = self.mixer(hidden, attention_mask=attention_mask)
        else:
            hidden = self.mixer(hidden)
        if hasattr(self, "final_layernorm"):
            return self.final_layernorm(hidden + residual), None
        return hidden, residual


class NemotronHMTPLayer(nn.Module):
    """The MTP step of ``config.mtp_layers_block_type``; ``state_dict`` names are the checkpoint's minus ``mtp.``."""

    def __init__(self, config):
        super().__init__()
        kinds = list(config.mtp_layers_block_type)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(NemotronHMTPBlock(config, kind, n + i, i == 0, i == len(kinds) - 1)
                                    for i, kind in enumerate(kinds))

    @staticmethod
    def checkpoint_prefix(config) -> str:
        return "mtp."

    # Tensors a checkpoint may hold that are the main model's (vLLM shares them): none under mtp.* for Nemotron-H.
    shared_tensors: tuple[str, ...] = ()

    @staticmethod
    def fused(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (per-expert) in the layout transformers keeps in memory (experts stacked)."""
        for i, kind in enumerate(config.mtp_layers_block_type):
            if kind == "moe":
                stack_experts(tensors, f"layers.{i}.mixer.experts.", ("up", "down"), config.n_routed_experts)
        return tensors

    def draft_hidden(self, model, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state [B, T-1, H] that predicts token t+2 at every t < T-1, from the main model's normed
        hidden states ``hidden`` and the right-padded ``ids``; the embedding is the model's, used detached."""
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids[:, 1:])
        mask = causal_mask(ids.shape[1] - 1, ids.device)
        hidden, residual = hidden[:, :-1].detach(), None
        for block in self.layers:
            hidden, residual = block(embeds, hidden, residual, mask)
        return hidden
