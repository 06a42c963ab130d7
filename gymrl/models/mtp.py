"""Multi-token-prediction (MTP) layers trained on a frozen tiny model so that vLLM's ``mtp`` drafts get accepted,
and read from and written to checkpoints where each family's own checkpoints keep them.

Training: a draft is accepted when it equals what the main model would produce, so the layer learns the
main model's next-token distribution at t+1 (soft targets, as EAGLE trains its draft head on the target
model's outputs; Li et al. 2024), not the data's token, on the positions the model generates.

The layers are DeepSeek-V3's (``gymrl.models.mtp_deepseek``) and Nemotron-H's (``gymrl.models.mtp_nemotron_h``);
both train, load and save through the functions here: each layer class says where its checkpoint keeps it
(``checkpoint_prefix``), how its experts fuse (``fused``) and how it drafts from the main model's hidden states
(``draft_hidden``).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from gymrl.models.checkpoint_files import checkpoint_tensors
from gymrl.models.mtp_deepseek import MTPLayer
from gymrl.models.mtp_nemotron_h import NemotronHMTPLayer
from gymrl.models.sft import SftData, fit


def mtp_layer_class(model_type: str) -> type[nn.Module] | None:
    """The MTP layer class of a model family (its config's ``model_type``), or None for a family without one here."""
    if model_type == "deepseek_v3":
        return MTPLayer
    if model_type == "nemotron_h":
        return NemotronHMTPLayer
    return None


def new_mtp_layer(model, seed: int) -> nn.Module:
    """A randomly initialised MTP layer for ``model`` (DeepseekV3ForCausalLM or NemotronHForCausalLM), initialised
    the way the model initialises its own layers, from ``seed``."""
    cls = mtp_layer_class(model.config.model_type)
    if cls is None:
        raise ValueError(f"no MTP layer for model type {model.config.model_type!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = cls(model.config).to(torch.float32)
        layer.apply(model._init_weights)
    return layer.to(model.device)


def draft_logits(model, layer: nn.Module, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The draft's logits at every position t < T-1 (each predicting token t+2), from the main model's normed
    hidden states ``hidden`` [B, T, H] of the right-padded ``ids`` [B, T]. Only the layer gets gradients: the
    hidden states, the embedding and the LM head it borrows from ``model`` are used detached, so training the
    draft never moves the main model."""
    return F.linear(layer.draft_hidden(model, ids, hidden), model.lm_head.weight.detach())


def draft_kl(draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || draft) per position, from logits [..., V]: how far the draft is from the distribution the
    main model samples its next token from."""
    return F.kl_div(F.log_softmax(draft.float(), -1), F.log_softmax(target.detach().float(), -1), log_target=True,
                    reduction="none").sum(-1)


def _drafts(model, layer: nn.Module, data: SftData, idx: torch.Tensor):
    """(draft logits, the main model's logits for the same token, loss positions) of the rows ``idx``:
    at position t the draft predicts token t+2, which the main model predicts at t+1."""
    ids, mask, labels = data.ids[idx], data.mask[idx], data.labels[idx]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # normed
        target = model.lm_head(hidden[:, 1:])
    logits = draft_logits(model, layer, ids, hidden)
    # Token t+2 must be one the model generates (its own turns); the last position has no t+2.
    where = F.pad(labels[:, 2:] != -100, (0, 1), value=False)
    return logits[where], target[where]


def mtp_loss(model, layer: nn.Module, data: SftData, idx: torch.Tensor) -> torch.Tensor:
    """KL(main model's next-token distribution at t+1 || draft at t), mean over the loss positions."""
    logits, target = _drafts(model, layer, data, idx)
    return draft_kl(logits, target).mean()


@torch.no_grad()
def agreement(model, layer: nn.Module, data: SftData, idx: torch.Tensor, batch_size: int) -> float:
    """Share of positions where the draft's top token is the main model's (teacher-forced, first draft step):
    what a greedy first draft token's acceptance would be on these sequences. Runs ``batch_size`` rows at a
    time: transformers' PyTorch Mamba-2 scan holds batch x chunks x chunk^2 x heads x state floats (all 256
    held-out rows of the Nemotron-H bench at once asked an H200 for 128 GiB)."""
    hits = positions = 0
    for part in idx.split(batch_size):
        logits, target = _drafts(model, layer, data, part)
        hits += (logits.argmax(-1) == target.argmax(-1)).sum().item()
        positions += len(target)
    return hits / positions if positions else 0.0


def train_mtp_layer(model, data: SftData, steps: int, lr: float, batch_size: int, seed: int,
                    holdout: int = 256) -> tuple[nn.Module, dict]:
    """A new MTP layer for the frozen ``model``, trained ``steps`` steps on ``data`` (all rows but the last
    ``holdout``, which measure the draft's agreement with the model before and after)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layer = new_mtp_layer(model, seed)
    held = torch.arange(len(data) - min(holdout, len(data) // 4), len(data))
    train_rows = len(data) - len(held)
    report = {"steps": steps, "agreement_before": round(agreement(model, layer, data, held, batch_size), 4)}
    if steps:
        layer.train()
        ema = fit(layer.parameters(), lambda idx: mtp_loss(model, layer, data, idx), train_rows, steps, lr,
                  batch_size, seed, "tiny-model MTP head")
        report["final_loss_ema"] = round(ema, 4)
        layer.eval()
    report["agreement_after"] = round(agreement(model, layer, data, held, batch_size), 4)
    for p in model.parameters():
        p.requires_grad_(True)
    return layer, report


def mtp_checkpoint_tensors(model, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's tensors under checkpoint names (DeepSeek-V3: ``model.layers.{num_hidden_layers}.*``, Nemotron-H:
    ``mtp.*``), experts split per expert as ``save_pretrained`` writes the main model's (the names and layout
    vLLM's MTP loader reads)."""
    prefix = layer.checkpoint_prefix(model.config)
    return checkpoint_tensors(model, {f"{prefix}{name}": t.detach().cpu() for name, t in layer.state_dict().items()})


def write_mtp_layer(model, layer: nn.Module, checkpoint: Path) -> list[str]:
    """Add the layer to the checkpoint's ``model.safetensors`` under :func:`mtp_checkpoint_tensors`' names.
    Returns the names written."""
    tensors = mtp_checkpoint_tensors(model, layer)
    file = Path(checkpoint) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: expected a single-file checkpoint")
    save_file({**load_file(file), **tensors}, file, metadata={"format": "pt"})
    return sorted(tensors)


def check_mtp_training(model_type: str, mtp_layers: int, path: Path) -> None:
    """Training the MTP layer (``train.mtp_loss_weight > 0``) needs a DeepSeek-V3 or Nemotron-H checkpoint with one."""
    if mtp_layer_class(model_type) is None or mtp_layers < 1:
        raise ValueError(f"train.mtp_loss_weight: training an MTP layer needs a DeepSeek-V3-family checkpoint with MTP "
                         f"layers (or a Nemotron-H one); {path} is '{model_type}' with {mtp_layers} (use build_tiny: "
                         "{architecture: deepseek_v3}, or set train.mtp_loss_weight: 0)")


def load_mtp_layer(model, checkpoint: Path) -> nn.Module:
    """The MTP layer stored in ``checkpoint`` (as :func:`write_mtp_layer` and the family's own checkpoints store
    it), for ``model``. transformers drops these tensors when it loads the model; this reads them and fuses the
    per-expert tensors back into the layout transformers keeps in memory."""
    cls = mtp_layer_class(model.config.model_type)
    if cls is None:
        raise ValueError(f"no MTP layer for model type {model.config.model_type!r}")
    prefix = cls.checkpoint_prefix(model.config)
    tensors = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors |= {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"{checkpoint}: no MTP layer in its safetensors files (no '{prefix}*' tensors)")
    for shared in cls.shared_tensors:  # copies of the main model's, which vLLM shares
        tensors.pop(shared, None)
    tensors = cls.fused(tensors, model.config)
    layer = new_mtp_layer(model, seed=0)
    layer.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return layer
