"""HF checkpoint folders as files: inspected without loading a weight (config.json and safetensors headers),
written atomically, and tensors named as ``save_pretrained`` writes them (which vLLM's loader reads).

Below the model code: the dry run reads checkpoints through this module, and loading or saving a policy
(``gymrl.models.checkpoint``) and the MTP layer (``gymrl.models.mtp``) build on it."""

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and folder under ``path`` to disk. Done before the rename that publishes a folder:
    otherwise a power loss can persist the rename but not the data, leaving a complete-looking folder of
    empty or torn files."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path`` by renames on one filesystem. An old ``path`` is moved
    aside first and removed only once the new one is in place; if the rename fails it is put back."""
    old = None
    try:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)  # put the previous one back
        raise
    _fsync(path.parent)  # the rename itself is durable only once the parent folder is flushed
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_tensors(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors``, named as in ``model.state_dict()``, under the names and layout ``save_pretrained`` writes
    (which vLLM's loader reads). transformers 5 keeps some weights fused in memory, e.g. a DeepSeek-V3 MoE
    layer's experts as one 3-D tensor, and splits them per expert on save; this is its own reverse conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    return {name: t.contiguous() for name, t in revert_weight_conversion(model, tensors).items()}


# Fields in which HF configs give their number of MTP (next-token prediction) layers; vLLM's speculative
# config reads the same ones (num_nextn_predict_layers: DeepSeek-V3, Nemotron-H; mtp_num_hidden_layers: Qwen3.5).
MTP_FIELDS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder says about itself without loading a weight: its config.json and the
    headers of its safetensors files."""

    path: Path
    architectures: list[str]
    model_type: str
    mtp_layers: int  # 0 when the config names none
    mtp_field: str | None  # the config field that gave mtp_layers
    num_parameters: int | None  # from the safetensors headers; None without safetensors files
    weight_bytes: int | None
    weight_dtypes: list[str]
    has_tokenizer: bool
    mla: bool = False  # DeepSeek-style multi-head latent attention (the config names a kv_lora_rank)
    dtype: str | None = None  # the dtype config.json declares (``dtype``, or transformers 4's ``torch_dtype``)
    mamba: bool = False  # a Mamba-2 hybrid (Nemotron-H with an ``M`` layer)
    relu2_moe: bool = False  # Nemotron-H's non-gated MoE in the model or its MTP layer (vLLM: GPU builds only)


def mtp_layers(config: dict) -> tuple[int, str | None]:
    """(MTP layers, the field that says so) of an HF config dict, its text_config included."""
    for section in (config, config.get("text_config") or {}):
        for name in MTP_FIELDS:
            if isinstance(section.get(name), int) and section[name] > 0:
                return section[name], name
    return 0, None


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read ``config.json`` and the safetensors headers (a few KB each); FileNotFoundError without a config."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.path: no HF checkpoint (config.json) at '{path}'")
    config = json.loads(config_file.read_text())
    params = nbytes = 0
    dtypes: set[str] = set()
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        for name, entry in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            params += math.prod(entry["shape"])
            nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
            dtypes.add(entry["dtype"])
    layers, field = mtp_layers(config)
    tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    mla = any(section.get("kv_lora_rank") is not None for section in (config, config.get("text_config") or {}))
    return CheckpointInfo(path, list(config.get("architectures") or []), str(config.get("model_type", "?")), layers,
                          field, params if files else None, nbytes if files else None, sorted(dtypes), tokenizer, mla,
                          config.get("dtype") or config.get("torch_dtype"), *_nemotron_h_layers(config))


def _nemotron_h_layers(config: dict) -> tuple[bool, bool]:
    """(any Mamba-2 layer, any MoE layer in the model or its MTP layer) of a Nemotron-H config: Nemotron-3's
    ``hybrid_override_pattern`` / ``mtp_hybrid_override_pattern`` (M Mamba-2, E MoE), or the layer lists transformers
    5 writes instead (``linear_attention`` there is Nemotron-H's Mamba-2 mixer)."""
    if config.get("model_type") != "nemotron_h":
        return False, False
    main = (config.get("hybrid_override_pattern") or "") + "".join(
        {"mamba": "M", "linear_attention": "M", "moe": "E"}.get(k, "") for k in config.get("layers_block_type") or [])
    mtp = (config.get("mtp_hybrid_override_pattern") or "") + "".join(
        "E" for k in config.get("mtp_layers_block_type") or [] if k == "moe")
    return "M" in main, "E" in main + mtp
