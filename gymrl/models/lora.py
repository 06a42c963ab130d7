"""LoRA on the policy (peft): the trainer trains only the adapters; the engines and the saved checkpoint get
plain weights with the adapters merged in, so vLLM serves the policy as it serves any HF checkpoint.

peft is imported only where a LoRA policy is made: this module is also imported by the engines' workers
(through weight_sync), where a plain policy needs no peft (its import takes seconds).
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

import torch
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from gymrl.config import LoraConfig


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model; without peft imported nothing can be one."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model):
    """The HF model under a peft wrapper (its modules hold the LoRA layers), or ``model`` itself."""
    return model.get_base_model() if is_lora(model) else model


def check_targets(model, cfg: LoraConfig) -> None:
    """Check ``train.lora.target_modules`` against the model's linear modules (matched as peft does: the full
    name or its dotted suffix). Every name set in the config must match; of the default list, one is enough
    (it names the projections of several architectures). A tied output head is refused: its delta would move
    the input embeddings with it, and vLLM ties the head to them itself."""
    linear = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    tied = None
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        tied = next(name for name, m in model.named_modules() if m is model.get_output_embeddings())
        linear.remove(tied)
    available = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))

    def matches(target: str, name: str) -> bool:
        return name == target or name.endswith("." + target)

    for target in cfg.target_modules:
        if tied is not None and matches(target, tied):
            raise ValueError(f"train.lora.target_modules: '{target}' is the output head, tied to the input embeddings "
                             f"(tie_word_embeddings): a LoRA delta on it would change the embeddings too; the model's "
                             f"linear modules are: {available}")
    unmatched = [t for t in cfg.target_modules if not any(matches(t, name) for name in linear)]
    if len(unmatched) == len(cfg.target_modules) or (unmatched and "target_modules" in cfg.model_fields_set):
        raise ValueError(f"train.lora.target_modules: {unmatched} match no linear module of the model; its linear "
                         f"modules are: {available}")


def apply_lora(model, cfg: LoraConfig):
    """``model`` wrapped by peft with LoRA adapters on ``cfg.target_modules``; only the adapters require grad.
    peft injects the adapters into ``model`` itself."""
    import peft

    check_targets(model, cfg)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    ))


def adapter_state(model) -> dict[str, torch.Tensor] | None:
    """A LoRA policy's trainable tensors (its adapters) under the peft model's names, for resumable checkpoints
    (the checkpoint's HF folder holds the merged model, which cannot be split back); None for a plain model."""
    if not is_lora(model):
        return None
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The policy's weights under the plain model's names, each LoRA-adapted weight as W + its adapters' delta.

    The deltas come from ``get_delta_weight`` into new tensors: peft's merge/unmerge would add and subtract
    them in place, and in float32 the base weights then drift a little on every push. A LoRA layer adapts its
    ``weight``; peft's ``ParamWrapper`` (fused MoE experts) adapts the parameter it names, one per wrapper,
    nested. For a model without LoRA this is its ``state_dict()``."""
    if not is_lora(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    def plain_name(name: str) -> str:  # peft keeps each wrapped module (or wrapper) as ``base_layer``
        return ".".join(part for part in name.split(".") if part != "base_layer")

    base = model.get_base_model()
    merged = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                param = getattr(module, "parameter_name", "weight")
                weight = getattr(module.get_base_layer(), param).detach()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter)
                merged[plain_name(f"{name}.{param}")] = weight
    out = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:  # the adapters themselves: folded into their layer's weight above
            continue
        key = plain_name(key)
        out[key] = merged.get(key, tensor)
    return out


def plain_model(model):
    """A plain HF model with the policy's merged weights, for saving: a copy for a LoRA policy (whose
    adapters keep training), ``model`` itself otherwise."""
    if not is_lora(model):
        return model
    merged = merged_state_dict(model)
    plain = copy.deepcopy(model).unload()  # the base layers back in place of the LoRA ones, unmerged
    plain.load_state_dict(merged)
    return plain
