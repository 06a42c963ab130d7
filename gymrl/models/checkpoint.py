"""Load and save policy checkpoints: plain HF folders (config.json, safetensors, tokenizer files).

The same code loads the built tiny model and real HF checkpoints; nothing is downloaded.
"""

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gymrl.models.checkpoint_files import fsync_tree, replace_dir
from gymrl.models.lora import plain_model
from gymrl.models.mtp import write_mtp_layer


def load_policy(path: str | Path, dtype: str = "float32") -> tuple[torch.nn.Module, object]:
    """(model in ``dtype``, tokenizer) from a local checkpoint folder. Loaded in its dtype rather than cast after:
    buffers that transformers computes in float32 (rotary frequencies) stay so."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at '{path}'")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not an HF checkpoint: '{path}' has no config.json")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def save_policy(model, tokenizer, path: str | Path, mtp_layer=None) -> Path:
    """Write the checkpoint to ``path`` atomically: built beside it, flushed to disk, then renamed over any old one. A LoRA policy
    is saved merged, as a plain HF model (transformers loads it without peft, vLLM serves it). An MTP layer the
    trainer trains goes in too, where the model's own checkpoints keep it (vLLM's mtp drafts with it)."""
    model = plain_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if mtp_layer is not None:
            write_mtp_layer(model, mtp_layer, tmp)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        fsync_tree(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
