"""DeepSeek-V3's multi-token-prediction (MTP) layer, the torch twin of vLLM's, trained by ``gymrl.models.mtp``.

The layer (DeepSeek-V3 technical report, section 2.2) predicts the token after next: at position t it
combines the main model's last hidden state h_t with the embedding of token t+1,

    x = eh_proj([enorm(emb(token_{t+1})), hnorm(h_t)]),  h' = block(x),  logits = head(shared_head.norm(h'))

where ``block`` is one more DeepSeek-V3 decoder layer (MLA attention + MoE) and ``head`` is the main model's
LM head. This is the computation of vLLM's ``DeepSeekMultiTokenPredictorLayer``
(vllm/model_executor/models/deepseek_mtp.py), detail for detail: the embedding at position 0 is zeroed,
h_t is the main model's hidden state after its final norm, the block's rotary positions are the main
model's, and ``shared_head.norm(h')`` is also the hidden state a second draft step starts from. vLLM
shares the embedding and the LM head with the main model, so the layer owns neither.

The parameter names are the checkpoint's: the layer is a transformers ``DeepseekV3DecoderLayer`` (its
``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``) plus ``enorm``, ``hnorm``,
``eh_proj`` and ``shared_head.norm``, stored as ``model.layers.{num_hidden_layers}.*`` like DeepSeek-V3's
own checkpoint, which is where vLLM looks for them.
"""

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm


class SharedHead(nn.Module):
    """The final norm before the (shared) LM head; DeepSeek's checkpoints also carry a copy of the head."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(hidden_size, eps=eps)


class MTPLayer(DeepseekV3DecoderLayer):
    """One DeepSeek-V3 MTP module. Called as a module it is the plain decoder block; :meth:`draft` is the whole
    layer."""

    # Copies of the main model's tensors that DeepSeek's checkpoints carry in the layer; vLLM shares the model's.
    shared_tensors: tuple[str, ...] = ("embed_tokens.weight", "shared_head.head.weight")

    def __init__(self, config):
        super().__init__(config, layer_idx=config.num_hidden_layers)
        self.enorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(config.hidden_size * 2, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config.hidden_size, config.rms_norm_eps)

    def draft(self, hidden: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
              position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """The normed hidden state that predicts token t+2, from h_t (``hidden``) and the embedding of token t+1."""
        next_embeds = torch.where(positions[..., None] == 0, 0, next_embeds)  # as vLLM: position 0 sees no token
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        x = self(x, attention_mask=attention_mask, position_embeddings=position_embeddings)
        return self.shared_head.norm(x)

    def draft_hidden(self, model, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`draft` at every position t < T-1 of the right-padded ``ids`` [B, T], from the main model's normed
        hidden states ``hidden`` [B, T, H]; the main model's rotary embedding and token embedding, used detached."""
        length = ids.shape[1] - 1
        positions = torch.arange(length, device=ids.device)[None].expand(ids.shape[0], -1)
        with torch.no_grad():
            rope = model.model.rotary_emb(hidden, positions)
            next_embeds = model.model.embed_tokens(ids[:, 1:])
        return self.draft(hidden[:, :-1].detach(), next_embeds, positions, rope, causal_mask(length, ids.device))

    @staticmethod
    def checkpoint_prefix(config) -> str:
        return f"model.layers.{config.num_hidden_layers}."

    @staticmethod
    def fused(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (per-expert) in the layout transformers keeps in memory: experts stacked, gate and
        up concatenated, as its DeepSeek-V3 conversion does."""
        stack_experts(tensors, "mlp.experts.", ("gate", "up", "down"), config.n_routed_experts)
        gate, up = tensors.pop("mlp.experts.gate_proj"), tensors.pop("mlp.experts.up_proj")
        tensors["mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        return tensors


def stack_experts(tensors: dict[str, torch.Tensor], prefix: str, kinds: tuple[str, ...], experts: int) -> None:
    """In place: ``{prefix}{e}.{kind}_proj.weight`` for every expert e -> one ``{prefix}{kind}_proj`` [E, out, in]."""
    for kind in kinds:
        tensors[f"{prefix}{kind}_proj"] = torch.stack([tensors.pop(f"{prefix}{e}.{kind}_proj.weight")
                                                       for e in range(experts)])


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device).triu(1)[None, None]
