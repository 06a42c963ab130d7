"""Load and save policy checkpoints: plain HF folders (config.json, safetensors, tokenizer files).

The same code loads the built tiny model and real HF checkpoints; nothing is downloaded.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_policy(path: str | Path) -> tuple[torch.nn.Module, object]:
    """(model in float32, tokenizer) from a local checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at '{path}'")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not an HF checkpoint: '{path}' has no config.json")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def save_policy(model, tokenizer, path: str | Path) -> Path:
    """Write the checkpoint to ``path`` atomically: built beside it, then renamed over any old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)  # put the previous checkpoint back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and path.exists():
            shutil.rmtree(old, ignore_errors=True)
    return path
