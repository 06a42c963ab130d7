"""DeepSeek-V3's multi-token-prediction (MTP) layer, trained on a frozen tiny model so vLLM's ``mtp`` drafts
get accepted.

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

Training: a draft is accepted when it equals what the main model would produce, so the layer learns the
main model's next-token distribution at t+1 (soft targets, as EAGLE trains its draft head on the target
model's outputs; Li et al. 2024), not the data's token, on the positions the model generates.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

from gymrl.models.checkpoint import checkpoint_tensors
from gymrl.models.sft import SftData, fit


class SharedHead(nn.Module):
    """The final norm before the (shared) LM head; DeepSeek's checkpoints also carry a copy of the head."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(hidden_size, eps=eps)


class MTPLayer(DeepseekV3DecoderLayer):
    """One MTP module. Called as a module it is the plain decoder block; :meth:`draft` is the whole layer."""

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


def new_mtp_layer(model, seed: int) -> MTPLayer:
    """A randomly initialised MTP layer for ``model`` (a DeepseekV3ForCausalLM), initialised the way the
    model initialises its own layers, from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = MTPLayer(model.config).to(torch.float32)
        layer.apply(model._init_weights)
    return layer.to(model.device)


def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device).triu(1)[None, None]


def _drafts(model, layer: MTPLayer, data: SftData, idx: torch.Tensor):
    """(draft logits, the main model's logits for the same token, loss positions) of the rows ``idx``:
    at position t the draft predicts token t+2, which the main model predicts at t+1."""
    ids, mask, labels = data.ids[idx], data.mask[idx], data.labels[idx]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
        target = model.lm_head(hidden[:, 1:])
        length = ids.shape[1] - 1
        positions = torch.arange(length, device=ids.device)[None].expand(ids.shape[0], -1)
        rope = model.model.rotary_emb(hidden, positions)
        next_embeds = model.model.embed_tokens(ids[:, 1:])
    drafted = layer.draft(hidden[:, :-1], next_embeds, positions, rope, _causal_mask(length, ids.device))
    logits = model.lm_head(drafted)
    # Token t+2 must be one the model generates (its own turns); the last position has no t+2.
    where = F.pad(labels[:, 2:] != -100, (0, 1), value=False)
    return logits[where], target[where]


def mtp_loss(model, layer: MTPLayer, data: SftData, idx: torch.Tensor) -> torch.Tensor:
    """KL(main model's next-token distribution at t+1 || draft at t), mean over the loss positions."""
    logits, target = _drafts(model, layer, data, idx)
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")


@torch.no_grad()
def agreement(model, layer: MTPLayer, data: SftData, idx: torch.Tensor) -> float:
    """Share of positions where the draft's top token is the main model's (teacher-forced, first draft step):
    what a greedy first draft token's acceptance would be on these sequences."""
    logits, target = _drafts(model, layer, data, idx)
    return (logits.argmax(-1) == target.argmax(-1)).float().mean().item()


def train_mtp_layer(model, data: SftData, steps: int, lr: float, batch_size: int, seed: int,
                    holdout: int = 256) -> tuple[MTPLayer, dict]:
    """A new MTP layer for the frozen ``model``, trained ``steps`` steps on ``data`` (all rows but the last
    ``holdout``, which measure the draft's agreement with the model before and after)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layer = new_mtp_layer(model, seed)
    held = torch.arange(len(data) - min(holdout, len(data) // 4), len(data))
    train_rows = len(data) - len(held)
    report = {"steps": steps, "agreement_before": round(agreement(model, layer, data, held), 4)}
    if steps:
        layer.train()
        ema = fit(layer.parameters(), lambda idx: mtp_loss(model, layer, data, idx), train_rows, steps, lr,
                  batch_size, seed, "tiny-model MTP head")
        report["final_loss_ema"] = round(ema, 4)
        layer.eval()
    report["agreement_after"] = round(agreement(model, layer, data, held), 4)
    for p in model.parameters():
        p.requires_grad_(True)
    return layer, report


def write_mtp_layer(model, layer: MTPLayer, checkpoint: Path) -> list[str]:
    """Add the layer to the checkpoint's ``model.safetensors`` as ``model.layers.{num_hidden_layers}.*``, its
    experts split per expert as ``save_pretrained`` writes the main model's. Returns the names written."""
    first = model.config.num_hidden_layers
    tensors = checkpoint_tensors(model, {f"model.layers.{first}.{name}": t.detach().cpu()
                                         for name, t in layer.state_dict().items()})
    file = Path(checkpoint) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: expected a single-file checkpoint")
    save_file({**load_file(file), **tensors}, file, metadata={"format": "pt"})
    return sorted(tensors)
