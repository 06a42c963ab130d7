"""The memory plan of ``gymrl train --dry-run``: bytes per trainer rank and per engine GPU, and the fewest H100s and
H200s a config needs, from the checkpoint's config.json alone.

The model is built on PyTorch's meta device (every parameter's shape, no byte allocated; half a second for
Nemotron-3 Super), with its MTP layer when the checkpoint names one, so the counts are those of the modules the
trainer and vLLM build: 31,577,937,344 parameters for Nemotron-3 Nano, 120,668,687,360 plus a 2,942,324,736-parameter
MTP layer for Super (their safetensors headers say the same).

What a trainer rank holds (N = train.workers; every line but the activations is divided by N):

- weights: the policy in train.dtype; with N > 1 on cuda in bfloat16 the sharded trainer keeps float32 shards
  (its AdamW master weights) and computes in bfloat16 (gymrl/train/sharded.py). The in-process trainer (N = 1)
  also loads the checkpoint's MTP layer, trained only with train.mtp_loss_weight > 0.
- gradients and AdamW's two moments: as wide as the weights they train; with train.lora only the adapters train,
  and peft keeps them in float32 (4 + 4 + 8 bytes a parameter).
- reference: with train.beta > 0, a frozen copy of the policy.
- gathered layers (N > 1): FSDP2 all-gathers the root unit (embeddings, final norm, head) and one decoder layer at
  a time, prefetching the next: root + 2 x the largest layer in the compute dtype, plus that layer's full
  gradient before its reduce-scatter.
- activations, an estimate: a micro-batch is padded to its longest sequence, at most engine.max_model_len tokens, so
  tokens = micro_batch_size x max_model_len and it keeps tokens x hidden_size x sum over layers of
  ACTIVATION_FACTORS[layer kind] x width / 2 bytes for backward; with train.activation_checkpointing, each layer's
  input (tokens x hidden_size x width) and one layer's in full. Plus tokens x vocab_size x 2 x width bytes of
  logits and their gradient, and two float32 chunks of LOGPROB_CHUNK_ELEMENTS (the logprobs are computed a chunk
  at a time).

An engine GPU holds weights / tensor_parallel_size (the MTP layer too when it drafts with it); vLLM takes
gpu_memory_utilization of the GPU, and what the weights leave is its KV cache (and its own activations): it must
hold at least one max_model_len sequence (attention layers' keys and values, Mamba layers' state) or vLLM refuses
to start.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from gymrl.config import EngineConfig, LoraConfig, RunConfig
from gymrl.models.checkpoint_files import CheckpointInfo

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes a decoder layer keeps for backward per token and hidden unit at 16 bits (without activation checkpointing), by
# the layer's kind. mamba and moe: measured with autograd's saved-tensor hooks (parameters left out) on transformers
# 5.19's Nemotron-H layers in bfloat16 (two-layer models of one kind, the real dimensions, experts cut to top-k + 2,
# 2048 tokens, on CPU), whose Mamba-2 mixer runs its PyTorch reference path without the mamba_ssm kernels (gymrl
# installs none): 257 and 104 at Nemotron-3 Super's dimensions, 201 and 64 at Nano's; the larger are used. attention and mlp: 34, Korthikanti et al. 2022's whole transformer layer (flash attention: no seq^2 term).
ACTIVATION_FACTORS = {"mamba": 257, "moe": 104, "attention": 34, "mlp": 34}
# The trainer's logprobs run in float32 this many logits at a time (gymrl.train.policy.TokenLogprob): 256 MiB, e.g.
# 512 positions of a 131k vocabulary; the plan counts two such chunks (a chunk and its softmax).
LOGPROB_CHUNK_ELEMENTS = 2**26
ADAPTER_BYTES = 4  # peft keeps LoRA adapters of a bfloat16 or float16 model in float32
NODE_GPUS = 8
# Memory as sold, in decimal GB: the cards report a little more (about 79.6 GiB = 85.5 GB for an H100 SXM, 140 GiB =
# 150 GB for an H200), which leaves the CUDA context and allocator slack out of the plan.
GPU_KINDS = {"H100": 80e9, "H200": 141e9}
TENSOR_PARALLEL = (1, 2, 4, 8)  # within one node


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a model, read from its config.json by building it on the meta device."""

    params: int  # the main model's parameters
    mtp_params: int  # its MTP layer's (0 without one)
    root_params: int  # outside the decoder layers: embeddings, final norm, head
    largest_layer: int  # the biggest decoder layer's parameters
    lora_params: int  # the adapters train.lora adds (0 without LoRA)
    hidden: int
    layers: int
    vocab: int
    layer_kinds: dict[str, int]  # decoder layers by their mixer's class, e.g. {"attention": 6, "mamba": 23, ...}
    kv_elems_per_token: int  # keys and values of all attention layers, per token
    kv_heads: int
    mamba_conv_elems: int  # Mamba layers' cached conv window, per sequence (in the engine's dtype)
    mamba_ssm_elems: int  # and their SSM state (float32)


def _module_names(layer: torch.nn.Module) -> str:
    return " ".join(type(m).__name__.lower() for m in layer.modules())


def _layer_kind(names: str) -> str:
    """A decoder layer's kind from its modules' class names: mamba, moe, attention or mlp (Nemotron-H's layers are
    one mixer each; a transformer layer with attention and experts counts as moe)."""
    return next((kind for kind in ("mamba", "moe", "attention") if kind in names), "mlp")


def lora_params(model: torch.nn.Module, cfg: LoraConfig) -> int:
    """Adapter parameters peft adds: r x (in + out) for every linear module ``cfg.target_modules`` matches (the
    targets checked as a run checks them)."""
    from gymrl.models.lora import check_targets

    check_targets(model, cfg)
    return sum(cfg.r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in cfg.target_modules))


def model_shape(path: Path, info: CheckpointInfo, lora: LoraConfig | None) -> ModelShape | None:
    """Build the model of ``path``'s config.json on the meta device (no weight read, no byte allocated) and measure
    it; None for a model the installed transformers cannot build (an unknown model_type) or whose decoder layers
    are not at ``base_model.layers``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gymrl.models.mtp import mtp_layer_class

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
        except ValueError:
            return None
        config = model.config
        layers = getattr(model.base_model, "layers", None)
        if layers is None:  # not a decoder of the usual layout (model.layers)
            return None
        mtp_class = mtp_layer_class(info.model_type) if info.mtp_layers else None
        mtp = mtp_class(config) if mtp_class is not None else None
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    params = sum(p.numel() for p in model.parameters())
    names = [_module_names(layer) for layer in layers]
    kinds = [_layer_kind(n) for n in names]
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    mamba = kinds.count("mamba")
    conv = ssm = 0
    if mamba:  # Nemotron-H's Mamba-2 cache per sequence: the conv window over x, B and C, and the SSM state
        inner = text.mamba_num_heads * text.mamba_head_dim
        conv = mamba * (inner + 2 * text.n_groups * text.ssm_state_size) * (text.conv_kernel - 1)
        ssm = mamba * inner * text.ssm_state_size
    return ModelShape(
        params=params, mtp_params=sum(p.numel() for p in mtp.parameters()) if mtp is not None else 0,
        root_params=params - sum(per_layer), largest_layer=max(per_layer),
        lora_params=lora_params(model, lora) if lora is not None else 0,
        hidden=text.hidden_size, layers=len(layers), vocab=text.vocab_size,
        layer_kinds={k: kinds.count(k) for k in sorted(set(kinds))},
        kv_elems_per_token=sum("attention" in n for n in names) * 2 * kv_heads * head_dim, kv_heads=kv_heads,
        mamba_conv_elems=conv, mamba_ssm_elems=ssm,
    )


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    how: str  # the arithmetic, as the plan prints it


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def trainer_memory(cfg: RunConfig, shape: ModelShape, workers: int | None = None) -> list[Part]:
    """One trainer rank's memory, part by part, for ``workers`` ranks (default: train.workers)."""
    tr = cfg.train
    n = tr.workers if workers is None else workers
    width = DTYPE_BYTES[tr.dtype]
    mixed = n > 1 and tr.device == "cuda" and tr.dtype == "bfloat16"  # float32 shards, bfloat16 compute
    store = 4 if mixed else width
    of_n = f" / {n} ranks" if n > 1 else ""
    kept = f"{store} bytes" + (" (float32 shards)" if mixed else f" ({tr.dtype})")
    loaded = shape.params + (shape.mtp_params if n == 1 else 0)  # only the in-process trainer loads the MTP layer
    what = f"{count(loaded)} x {kept}{of_n}"
    parts = []
    if tr.lora is not None:
        a = shape.lora_params
        parts.append(Part("weights", (loaded * store + a * ADAPTER_BYTES) / n,
                          f"{what} + {count(a)} adapters x {ADAPTER_BYTES}{of_n}"))
        parts.append(Part("gradients", a * ADAPTER_BYTES / n, f"LoRA adapters only: {count(a)} x {ADAPTER_BYTES}{of_n}"))
        parts.append(Part("AdamW moments", 2 * a * ADAPTER_BYTES / n, f"2 x {count(a)} x {ADAPTER_BYTES}{of_n}"))
    else:
        trained = shape.params + (shape.mtp_params if n == 1 and tr.mtp_loss_weight > 0 else 0)
        parts.append(Part("weights", loaded * store / n, what))
        parts.append(Part("gradients", trained * store / n, f"{count(trained)} x {store}{of_n}"))
        parts.append(Part("AdamW moments", 2 * trained * store / n, f"2 x {count(trained)} x {store}{of_n}"))
    if tr.beta > 0:
        parts.append(Part("reference", shape.params * store / n, f"beta > 0: {count(shape.params)} x {store}{of_n}"))
    if n > 1:
        gathered = (shape.root_params + 2 * shape.largest_layer) * width + shape.largest_layer * store
        parts.append(Part("gathered layers", gathered,
                          f"(root {count(shape.root_params)} + 2 x largest layer {count(shape.largest_layer)}) x {width} "
                          f"+ its gradient x {store}"))
    tokens = tr.micro_batch_size * cfg.engine.max_model_len
    per_hidden = sum(n * ACTIVATION_FACTORS[kind] for kind, n in shape.layer_kinds.items())
    layers = " + ".join(f"{n} {kind} x {ACTIVATION_FACTORS[kind]}" for kind, n in shape.layer_kinds.items())
    scale = "" if width == 2 else f" x {width // 2} ({tr.dtype})"
    micro = f"{tokens} tokens (micro_batch_size {tr.micro_batch_size} x max_model_len {cfg.engine.max_model_len})"
    if tr.activation_checkpointing:  # each layer's input is kept, one layer at a time is recomputed in full
        largest = max(ACTIVATION_FACTORS[kind] for kind in shape.layer_kinds)
        layer_count = sum(shape.layer_kinds.values())
        parts.append(Part("activations", tokens * shape.hidden * (layer_count * width + largest * width / 2),
                          f"estimate, train.activation_checkpointing: {micro} x hidden {shape.hidden} x ({layer_count} "
                          f"layer inputs x {width} + one layer recomputed, {largest} bytes at 16 bits{scale})"))
    else:
        parts.append(Part("activations", tokens * shape.hidden * per_hidden * width / 2,
                          f"estimate: {micro} x hidden {shape.hidden} x ({layers} bytes at 16 bits){scale}"))
    parts.append(Part("logits", tokens * shape.vocab * 2 * width + 2 * LOGPROB_CHUNK_ELEMENTS * 4,
                      f"{tokens} tokens x vocab {shape.vocab} x 2 x {width} bytes (the logits and their gradient) + "
                      f"2 float32 chunks of {LOGPROB_CHUNK_ELEMENTS:,} (the logprobs, a chunk at a time)"))
    return parts


def engine_width(eng: EngineConfig, info: CheckpointInfo) -> int:
    """Bytes per weight in the engine: engine.dtype, or with auto the dtype config.json declares (else bfloat16)."""
    return DTYPE_BYTES[info.dtype if eng.dtype == "auto" and info.dtype in DTYPE_BYTES else
                       eng.dtype if eng.dtype != "auto" else "bfloat16"]


@dataclass(frozen=True)
class EngineMemory:
    weights: float  # per GPU
    sequence: float  # KV cache and Mamba state of one max_model_len sequence, per GPU
    left: float | None  # what gpu_memory_utilization leaves after the weights, per GPU (None: no GPU size given)

    @property
    def fits(self) -> bool:
        return self.left is not None and self.left >= self.sequence


def engine_memory(eng: EngineConfig, shape: ModelShape, info: CheckpointInfo, gpu_bytes: float | None,
                  tensor_parallel: int | None = None) -> EngineMemory:
    """One engine GPU: its share of the weights and of one sequence's cache. vLLM shards attention heads over the
    GPUs (replicating key/value heads past their number) and Mamba heads likewise; the SSM state is float32."""
    tp = tensor_parallel or eng.tensor_parallel_size
    width = engine_width(eng, info)
    drafts = eng.speculative_config is not None and eng.speculative_config.method == "mtp"
    weights = (shape.params + (shape.mtp_params if drafts else 0)) * width / tp
    kv = shape.kv_elems_per_token * width / min(tp, shape.kv_heads)
    sequence = kv * eng.max_model_len + (shape.mamba_conv_elems * width + shape.mamba_ssm_elems * 4) / tp
    left = gpu_bytes * eng.gpu_memory_utilization - weights if gpu_bytes else None
    return EngineMemory(weights, sequence, left)


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int | None  # None: no engine fits on one node
    ranks: int | None  # None: a trainer rank does not fit at any number of ranks
    reason: str = ""

    def gpus(self, num_engines: int) -> int | None:
        if self.tensor_parallel is None or self.ranks is None:
            return None
        return num_engines * self.tensor_parallel + self.ranks


def fewest_gpus(cfg: RunConfig, shape: ModelShape, info: CheckpointInfo, gpu_bytes: float) -> Layout:
    """The smallest tensor_parallel_size at which an engine fits, and the fewest trainer ranks (each on a GPU of
    its own) at which one rank fits, on GPUs of ``gpu_bytes``."""
    tp = next((t for t in TENSOR_PARALLEL if engine_memory(cfg.engine, shape, info, gpu_bytes, t).fits), None)
    fixed = sum(p.bytes for p in trainer_memory(cfg, shape, 2) if p.name in ("gathered layers", "activations",
                                                                               "logits"))
    if fixed >= gpu_bytes:
        return Layout(tp, None, f"activations, logits and gathered layers alone take {gb(fixed)}")
    ranks = 1
    while sum(p.bytes for p in trainer_memory(cfg, shape, ranks)) > gpu_bytes:
        ranks += 1
    return Layout(tp, ranks)


def describe_layout(cfg: RunConfig, layout: Layout) -> str:
    """``layout`` in words: the GPUs it takes and whether they fit one node of NODE_GPUS, or two."""
    eng = cfg.engine
    engines = (f"{eng.num_engines} engine(s) x {layout.tensor_parallel} GPU(s) (engine.tensor_parallel_size "
               f"{layout.tensor_parallel})" if layout.tensor_parallel else
               f"an engine does not fit on {TENSOR_PARALLEL[-1]} GPUs")
    trainer = (f"{layout.ranks} trainer rank(s) (train.workers {layout.ranks})" if layout.ranks else
               f"no number of trainer ranks fits ({layout.reason})")
    total = layout.gpus(eng.num_engines)
    if total is None:
        return f"{engines} + {trainer}: does not fit"
    where = ("one node" if total <= NODE_GPUS else "two nodes" if total <= 2 * NODE_GPUS else
             f"{-(-total // NODE_GPUS)} nodes")
    return f"{engines} + {trainer} = {total} GPUs: {where} of {NODE_GPUS}"


# Measured, not planned: what a trainer process holds (`gymrl bench --suite scale` compares them across ranks).
def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of ``module``'s parameters and of ``optimizer``'s state (AdamW: both moments and
    the step): a sharded tensor's (FSDP2's DTensor) local shard only, a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    return {"param_bytes": sum(nbytes(p) for p in module.parameters()),
            "optim_bytes": sum(nbytes(v) for state in optimizer.state.values() for v in state.values()
                               if isinstance(v, torch.Tensor))}


def process_memory(reset_peak: bool = False) -> dict[str, int]:
    """This process's resident bytes now (``rss``, VmRSS; ``rss_shared``, RssShmem: shared memory such as Ray's
    object store mapped in) and at their peak (``peak_rss``, VmHWM), from /proc/self/status (Linux); ``reset_peak``
    then restarts the peak from the current size (/proc/self/clear_refs)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM", "RssShmem")}
    if reset_peak:
        Path("/proc/self/clear_refs").write_text("5")
    return {"rss": kib["VmRSS"], "rss_shared": kib["RssShmem"], "peak_rss": kib["VmHWM"]}
